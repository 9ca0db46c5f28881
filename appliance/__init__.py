"""Bench triage appliance: research-use triage of breast core-biopsy scans, streamed from the scanner."""

__version__ = "0.1.0"

from appliance.terms import RESEARCH_USE_NOTICE

__all__ = ["__version__", "RESEARCH_USE_NOTICE"]
