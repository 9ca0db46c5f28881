"""The streaming triage pipeline: tiles in, patch probabilities and a research-use verdict out."""

from appliance.pipeline.result import PatchScore, TriageResult
from appliance.pipeline.session import TriageSession

__all__ = ["PatchScore", "TriageResult", "TriageSession"]
