"""Bench triage appliance: research-use triage of breast core-biopsy scans, streamed from the scanner."""

__version__ = "0.1.0"

RESEARCH_USE_NOTICE = "For research and triage only. Not for diagnosis."

__all__ = ["__version__", "RESEARCH_USE_NOTICE"]
