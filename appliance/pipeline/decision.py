"""The call as pure functions of what a session has measured: the case score under the model's rule, the
final early positive at a tile, why a case cannot be called, and the verdict. No I/O, no clocks: the same
measurements give the same call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from appliance.model.metrics import top_k_mean
from appliance.pipeline.mil import LargestRegion, TopKMean
from appliance.pipeline.mil import case_score as mil_case_score
from appliance.pipeline.qc import Reason
from appliance.terms import CaseRule, ReasonCode, ThresholdSource, Verdict


@dataclass(frozen=True)
class ThresholdInForce:
    """The thresholds a case is called with: the model's (its manifest's), or a site's accepted operating
    point (``appliance site accept``), named with its date and report so every record says which decided."""

    threshold: float  # the final rule's
    early_threshold: float  # the early rule's
    source: ThresholdSource = ThresholdSource.MODEL
    site_accepted_at: str | None = None
    site_report_sha256: str | None = None

    @classmethod
    def of_model(cls, decision) -> "ThresholdInForce":
        return cls(decision.case_threshold, decision.early_rule.threshold)

    @classmethod
    def of_site(cls, decision, threshold: float, accepted_at: str, report_sha256: str) -> "ThresholdInForce":
        """A site's threshold for the final rule. When the early rule is the final rule itself (a first-stage
        top-k mean) the early positive uses it too, so the early call and the final one never disagree;
        an early rule of its own (on another scale) keeps the model's early threshold."""
        early = decision.early_rule
        same = (early.rule, early.top_k) == (decision.case_rule, decision.top_k)
        return cls(threshold, threshold if same else early.threshold, ThresholdSource.SITE, accepted_at,
                   report_sha256)

    def words(self) -> str:
        """'the model's threshold 0.706' or 'the site threshold 0.512 (accepted 2026-12-06)'."""
        if self.source == ThresholdSource.SITE:
            return f"the site threshold {self.threshold:.3f} (accepted {(self.site_accepted_at or '?')[:10]})"
        return f"the model's threshold {self.threshold:.3f}"


def case_score(rule: CaseRule, mil: TopKMean, region: LargestRegion | None) -> float:
    """The score under a first-stage ``rule`` (the early rule, and the final one when it is first-stage): each
    such rule's value can only rise as patches are added (a top-k mean of the k highest, a region that only
    grows or merges)."""
    if rule == CaseRule.TOP_K_MEAN:
        return mil.score
    if rule == CaseRule.TOP_K_MEAN_REFINED:
        raise ValueError("the refined rule is scored once, when the case ends (final_score)")
    if region is None:
        raise ValueError(f"the {rule} rule needs the case's largest region")
    return float(region.area) if rule == CaseRule.LARGEST_REGION_AREA else region.mass


def final_score(rule: CaseRule, top_k: int, early_score: float, refined: list[float] | None) -> float:
    """The final rule's score when the case ends: the top-k mean of the refined probabilities for the refined
    rule, else the first-stage rule's own score (the early rule is then the same rule)."""
    if rule != CaseRule.TOP_K_MEAN_REFINED:
        return early_score
    if refined is None:
        raise ValueError("the refined rule needs the context stage's probabilities")
    return top_k_mean(refined, top_k)


def whole_case_scores(decision, gx, gy, first, refined) -> tuple[float, float]:
    """(final score, early score) of a whole case under a manifest's decision, from its first-stage and
    refined probabilities at grid cells gx, gy: what a streaming case ends with, for offline evaluation and
    the model build."""
    early = decision.early_rule
    early_score = mil_case_score(early.rule, early.top_k, decision.region_threshold, gx, gy, first)
    if decision.case_rule == CaseRule.TOP_K_MEAN_REFINED:
        return top_k_mean(refined, decision.top_k), early_score
    return mil_case_score(decision.case_rule, decision.top_k, decision.region_threshold, gx, gy, first), early_score


def is_early_positive(*, qc_clean: bool, patches: int, min_patches: int, mil_full: bool, score: float,
                      threshold: float) -> bool:
    """Tile N gives a final early positive when every patch of tiles 1..N is scored and: their QC is clean
    (the stain judged on them), there are enough of them for a call, the top-k holds k patches, and the
    score passes the case threshold. Adding patches can never lower the score, so the call is final."""
    return qc_clean and patches >= min_patches and mil_full and score >= threshold


def ood_reasons(score: float | None, limit: float | None) -> list[Reason]:
    """The out-of-distribution gate: a case whose score passes the model's limit cannot be called."""
    if score is None or limit is None or score <= limit:
        return []
    return [Reason(ReasonCode.OUT_OF_DISTRIBUTION,
                   f"Unlike the cases the model was validated on: its own reading of this tissue scores {score:.2f} "
                   f"against a limit of {limit:.2f} (development cases read about 1). Check the stain, the "
                   f"section and the scanner's colour settings, and rescan; if it persists, read the case "
                   f"without the appliance.")]


def cannot_call_reasons(*, tiles: int, patches_scored: int, patches_seen: int, qc_reasons: list[Reason],
                        min_patches: int) -> list[Reason]:
    """Why the case cannot be called (empty when it can): no tiles, no tissue, QC findings, too little tissue."""
    if tiles == 0:
        return [Reason(ReasonCode.NO_TILES, "No tiles were received for this case; rescan.")]
    if patches_scored == 0:
        return [Reason(ReasonCode.NO_TISSUE, f"No tissue was found in {tiles} tiles ({patches_seen} patches): blank or "
                                    f"empty slide; check the slide and rescan.")]
    out = list(qc_reasons)
    if patches_scored < min_patches:
        out.append(Reason(ReasonCode.TOO_LITTLE_TISSUE,
                          f"Only {patches_scored} tissue patches were found; at least {min_patches} are needed "
                          f"for a call. Check the core is on the slide and rescan."))
    return out


class Call(NamedTuple):
    verdict: Verdict
    reasons: list[Reason]  # why it cannot be called (only with CANNOT_CALL)
    warnings: list[Reason]  # QC found after a final early positive: reported, not blocking


def make_call(*, early_positive: bool, reasons: list[Reason], score: float, threshold: float) -> Call:
    """The verdict. An early positive is final: it is suspicious whatever the final rule's score, and QC found
    after it becomes warnings. Otherwise any reason means cannot-call, and the final score against the case
    threshold decides the rest."""
    if early_positive:
        return Call(Verdict.SUSPICIOUS, [], list(reasons))
    if reasons:
        return Call(Verdict.CANNOT_CALL, list(reasons), [])
    return Call(Verdict.SUSPICIOUS if score >= threshold else Verdict.BENIGN, [], [])
