"""The daemon's live status as one typed value (``DaemonStatus``), at the bottom of the packages so that every
reader can hold it: the API serves it as JSON (appliance.api.schemas.StatusPublic), the metrics read it when
scraped, systemd's status line is written from it, and the terminal UI (which imports nothing of the daemon)
reads the JSON back into it, so the four never disagree on a key. What the layers above may ask of the daemon
is appliance.service.controls.DaemonControls."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CaseInFlight", "DaemonStatus", "LinkView", "ThresholdView"]


@dataclass(frozen=True)
class LinkView:
    """The scanner link: its state (firmware_bridge.status.LinkState), port, counters and last error."""

    state: str
    port: str
    counters: dict[str, Any] = field(default_factory=dict)
    last_error: str | None = None

    @property
    def up(self) -> bool:
        return self.state == "up"


@dataclass(frozen=True)
class CaseInFlight:
    """The case the daemon is receiving or has just called."""

    case_id: str
    tiles_received: int
    tiles_processed: int
    score: float
    early_positive: bool
    specimen_id: str | None = None
    tiles_expected: int | None = None
    verdict: str | None = None
    failed: str | None = None  # why the case failed (its call could not be made or stored)
    eta_s: float | None = None
    warnings: tuple[dict, ...] = ()  # QC found after the early call: {code, message, ...}


@dataclass(frozen=True)
class ThresholdView:
    """The case threshold in force: the model's, or a site's accepted operating point."""

    value: float
    source: str
    site_accepted_at: str | None = None
    site_report_sha256: str | None = None
    words: str = ""


@dataclass(frozen=True)
class DaemonStatus:
    """What the daemon is doing now. ``problem`` says why it takes no cases at all (a model that failed its
    checks); ``model`` and ``drift`` are the engine's model reference and the drift watch's report."""

    version: str
    problem: str | None = None
    link: LinkView | None = None
    case: CaseInFlight | None = None
    model: dict | None = None
    threshold: ThresholdView | None = None
    drift: dict | None = None
    storage: dict | None = None  # free_bytes, min_free_bytes, accepting_cases, reason

    @property
    def disk_free_bytes(self) -> int | None:
        return (self.storage or {}).get("free_bytes")

    @property
    def drift_warning(self) -> str | None:
        return (self.drift or {}).get("warning")

    def to_dict(self) -> dict:
        """As the API serves it (the keys of StatusPublic); what is unknown is left out."""
        out = {k: v for k, v in asdict(self).items() if v is not None}
        if self.case is not None:
            out["case"]["warnings"] = list(self.case.warnings)
        if self.storage is not None:
            out["disk_free_bytes"] = self.disk_free_bytes
        return out

    @classmethod
    def from_dict(cls, d: dict) -> DaemonStatus:
        """From the API's JSON (keys it does not hold, such as deliveries and the notice, are the API's own)."""
        link, case, threshold = d.get("link"), d.get("case"), d.get("threshold")
        return cls(
            version=d["version"], problem=d.get("problem"),
            link=LinkView(**link) if link else None,
            case=CaseInFlight(**{**case, "warnings": tuple(case.get("warnings") or ())}) if case else None,
            model=d.get("model"),
            threshold=ThresholdView(**threshold) if threshold else None,
            drift=d.get("drift"), storage=d.get("storage"))

    def line(self) -> str:
        """One line for systemd's STATUS=: the link and the case in flight, or NOT READY and why."""
        if self.problem:
            return f"NOT READY: {self.problem}"
        link = self.link.state if self.link else "down"
        c = self.case
        if c is None:
            return f"link {link}; no case yet"
        state = c.verdict or ("early positive" if c.early_positive else "running")
        return (f"link {link}; case {c.case_id}: {c.tiles_received}/{c.tiles_expected or '?'} tiles received, "
                f"{c.tiles_processed} processed, score {c.score:.3f}, {state}")
