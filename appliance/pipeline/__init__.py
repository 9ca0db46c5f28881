"""The streaming triage pipeline: tiles in, patch probabilities and a research-use verdict out."""

from appliance.pipeline.session import TriageResult, TriageSession

__all__ = ["TriageResult", "TriageSession"]
