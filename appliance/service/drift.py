"""The drift watch: are the lab's recent cases still like those the model and the site validation saw?

The rule (DRIFT_RULE, also in docs/site-validation.md):

* The window is the last ``window`` finished cases (default 50), newest first; a measure is judged once at
  least MIN_CASES of them have a value for it.
* Each followed measure (the case score of callable cases, the stain's haematoxylin and eosin angles to the
  model's reference, focus, tissue area, the model's out-of-distribution score) drifts when the window's median is outside the reference's 5th-95th
  percentile range. A median of 25+ cases like the reference's sits near its 50th percentile; a median outside
  the middle 90% of single cases means most recent cases moved.
* Each cannot-call reason drifts when the window holds more of it than the reference's rate allows: a
  one-sided binomial test at level ALPHA, the reference rate floored at RATE_FLOOR.

The reference is the accepted site validation's when one is in force (the lab's own validated slides), else
the model's development distribution from its manifest. Pure functions: the same cases give the same findings.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from appliance.terms import Verdict

WINDOW = 50
MIN_CASES = 25
ALPHA = 0.001
RATE_FLOOR = 0.01
MEASURES = ("score", "stain_h_deg", "stain_e_deg", "focus", "tissue_mm2", "ood")
DRIFT_RULE = (f"over the last {WINDOW} finished cases (judged from {MIN_CASES} on): a measure (case score of "
              f"callable cases, stain angles, focus, tissue area, the model's out-of-distribution score) drifts when its median is outside the "
              f"reference's 5th-95th percentile range; a cannot-call reason drifts when its count is above the "
              f"reference rate (floored at {RATE_FLOOR:.0%}) by a one-sided binomial test at level {ALPHA}. "
              f"Reference: the accepted site validation, else the model's development cases.")


@dataclass(frozen=True)
class Finding:
    measure: str  # a MEASURES name, or "cannot-call:<code>"
    value: float  # the window's median (or count of the reason)
    low: float | None  # the reference range (a count's is None..the most the reference rate allows)
    high: float | None
    cases: int  # cases in the window with a value
    drifted: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def words(self) -> str:
        if self.measure.startswith("cannot-call:"):
            return (f"{self.measure}: {self.value:g} of the last {self.cases} cases (reference allows "
                    f"{self.high:g})")
        return (f"{self.measure}: median {self.value:.3g} over {self.cases} cases, outside "
                f"{self.low:.3g}-{self.high:.3g}")


def case_values(case: dict) -> dict[str, float]:
    """A stored case's followed measures (None-valued ones left out); the score only when it was called."""
    out = {k: v for k, v in (case.get("measures") or {}).items() if v is not None}
    if case.get("verdict") in (Verdict.SUSPICIOUS, Verdict.BENIGN) and case.get("score") is not None:
        out["score"] = float(case["score"])
    return out


def reason_codes(case: dict) -> list[str]:
    return [r["code"] for r in case.get("reasons") or []] if case.get("verdict") == Verdict.CANNOT_CALL else []


def reference_of(cases: list[dict], spread) -> dict:
    """A drift reference from finished cases: each measure's spread (``stats.spread``) and the cannot-call
    counts by reason."""
    values = [case_values(c) for c in cases]
    by_reason: dict[str, int] = {}
    for c in cases:
        for code in set(reason_codes(c)):
            by_reason[code] = by_reason.get(code, 0) + 1
    return {"cases": len(cases),
            "measures": {m: spread([v[m] for v in values if m in v]) for m in MEASURES},
            "cannot_call": {"cases": len(cases), "by_reason": by_reason}}


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


def watch(recent: list[dict], reference: dict, window: int = WINDOW) -> list[Finding]:
    """The findings over the newest ``window`` of ``recent`` (finished cases, newest first) against
    ``reference`` (``reference_of``, or the manifest's drift section)."""
    cases = recent[:window]
    findings = []
    values = [case_values(c) for c in cases]
    for m in MEASURES:
        ref = (reference.get("measures") or {}).get(m)
        seen = [v[m] for v in values if m in v]
        if ref is None or len(seen) < MIN_CASES:
            continue
        median = statistics.median(seen)
        findings.append(Finding(m, round(median, 4), ref["p05"], ref["p95"], len(seen),
                                not ref["p05"] <= median <= ref["p95"]))
    if len(cases) >= MIN_CASES:
        ref_cc = reference.get("cannot_call") or {}
        ref_n = max(int(ref_cc.get("cases") or 0), 1)
        codes = set(ref_cc.get("by_reason") or {}) | {code for c in cases for code in reason_codes(c)}
        for code in sorted(codes):
            rate = max((ref_cc.get("by_reason") or {}).get(code, 0) / ref_n, RATE_FLOOR)
            k = sum(code in reason_codes(c) for c in cases)
            allowed = next(j for j in range(len(cases) + 2) if j > len(cases) or binomial_tail(j + 1, len(cases), rate) < ALPHA)
            findings.append(Finding(f"cannot-call:{code}", k, None, allowed, len(cases),
                                    binomial_tail(k, len(cases), rate) < ALPHA if k else False))
    return findings


class DriftWatch:
    """The daemon's drift state: ``check`` re-judges the store's last cases after each call (and at start) and
    says when the set of drifted measures changed, so the change is an event once, not at every case."""

    def __init__(self, window: int = WINDOW):
        self.window = window
        self.reference_name = "none"
        self.findings: list[Finding] = []

    @property
    def drifted(self) -> list[Finding]:
        return [f for f in self.findings if f.drifted]

    def check(self, recent: list[dict], reference: dict | None, reference_name: str) -> bool:
        """Judge ``recent`` (newest first) against ``reference``; True when the drifted measures changed."""
        before = {f.measure for f in self.drifted}
        self.reference_name = reference_name if reference else "none"
        self.findings = watch(recent, reference, self.window) if reference else []
        return {f.measure for f in self.drifted} != before

    def status(self) -> dict:
        return {"reference": self.reference_name, "window": self.window, "rule": DRIFT_RULE,
                "drifted": [f.measure for f in self.drifted],
                "warning": ("Drift: " + "; ".join(f.words() for f in self.drifted)
                            + ". Check staining, scanner and focus; consider a new site validation.")
                if self.drifted else None,
                "findings": [f.to_dict() for f in self.findings]}


def reference_in_force(manifest, point: dict | None) -> tuple[dict | None, str]:
    """(reference, its name): the accepted site validation's for this model, else the model's development
    distribution (the manifest's ``drift``), else none."""
    if point is not None and point.get("model_sha256") == manifest.digest:
        report = point.get("report") or {}
        ref = report.get("drift_reference")
        if ref:
            return ref, f"site validation accepted {point['accepted_at'][:10]}"
    if manifest.drift:
        return manifest.drift, f"{manifest.name} {manifest.version} development cases"
    return None, "none"
