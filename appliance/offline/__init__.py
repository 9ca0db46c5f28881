"""Entry points that work on files rather than the link: case sources, offline triage, evaluation, the demo."""
