"""The model card's sections on how the appliance decides: the case rule and threshold on virtual cores, the
stain curves and limit, and the other lab and scanner shifts (rendered from manifest.json by card.py)."""
from __future__ import annotations

from .card_text import fixed, interval
from .metrics import CASE_MIN_SENSITIVITY


def _rule_words(key: str) -> str:
    refined = key.endswith("_refined")
    base = key.removesuffix("_refined")
    if base.startswith("top") and base.endswith("pct"):
        words = f"top {base[3:-3]}% mean (k scaled by the core's tissue)"
    elif base.startswith("top"):
        words = f"top-{base[3:]} mean"
    else:
        words = {"region_area": "largest region, area", "region_mass": "largest region, mass",
                 "cells_above": "cells above the threshold, count",
                 "fraction_above": "cells above the threshold, fraction of the core"}.get(base, base)
    return words + (", refined" if refined else ", first stage")


def cores_section(manifest: dict) -> str:
    """"Case rule and threshold": every rule on the virtual cores, the final and early rules, the shipped call,
    the operating table and the bag proxy (empty without virtual cores)."""
    metrics, decision = manifest["metrics"], manifest["decision"]
    cores = metrics.get("virtual_cores")
    if not cores:
        return ""
    rules = sorted(cores["rules"].items(), key=lambda kv: (-kv[1]["specificity"], -kv[1]["auc"]))
    rule_rows = "\n".join(f"| {_rule_words(k)} | {v['auc']:.4f} | {v['threshold']:g} | {v['sensitivity']:.3f} | "
                          f"{v['specificity']:.3f} |{' **shipped**' if k == cores['final_rule'] else ''}"
                          for k, v in rules)
    operating_rows = "\n".join(f"| {r['target_sensitivity']:.2f} | {r['threshold']:g} | {r['sensitivity']:.3f} "
                               f"{interval(r['sensitivity_ci95'])} | {r['specificity']:.3f} "
                               f"{interval(r['specificity_ci95'])} |" for r in cores["operating_table"])
    call, final, early = cores["shipped_call"], cores["final"], cores["early"]
    by_idc = ", ".join(f"{k} IDC patches: {v:.1%}" for k, v in cores["sensitivity_by_idc_patches"].items())
    by_direction = ", ".join(f"{k} {v['auc']:.4f} ({v['cores']})" for k, v in cores["by_direction"].items())
    bag = metrics["case_level_out_of_fold"]
    early_words = (early.get("note") or f"{_rule_words(early['rule'])} >= {early['threshold']:g}: its threshold sits "
                   f"just above the highest out-of-fold negative core; it fired on {early['positive_cores_fired']} of "
                   f"{early['positive_cores']} positive cores and {early['negative_cores_fired']} negative ones")
    return f"""
## Case rule and threshold: virtual core biopsies

The bench sees core-needle biopsies, so the case rule and its threshold are chosen on **virtual cores**:
{cores['what']}. {cores['cores']} cores from {cores['slides']} slides: {cores['positive']} positive ({', '.join(f"{k}: {v}" for k, v in cores['positive_by_idc_patches'].items())} IDC
patches), {cores['negative']} negative, {cores['left_out_ambiguous']} strips left out as ambiguous; a median of
{cores['patches_per_core']['median']} patches per core ({cores['patches_per_core']['min']}-{cores['patches_per_core']['max']}).

Every rule at its own highest threshold with sensitivity >= {CASE_MIN_SENSITIVITY:g} on positive cores (out of fold, INT8):

| rule | core AUC | threshold | sensitivity | specificity |
|---|---:|---:|---:|---:|
{rule_rows}

**Final rule: {_rule_words(cores['final_rule'])}** (`decision.case_rule` = {decision['case_rule']}, k = {decision['top_k']}):
{cores['final_rule_choice']}. Core AUC **{final['auc']:.4f}** {interval(final['auc_ci95'])} (95% CI, bootstrap over
patients). `case_threshold` = **{decision['case_threshold']}**.

**Early positive** (`decision.early`): {early_words}. The verdict is *suspicious* when the early positive fired
**or** the final rule passes the case threshold, so the final rule can never reverse an early call: an early rule
that can only rise makes the early call final, and the final rule only adds calls.

The shipped call on the cores: sensitivity **{call['sensitivity']:.3f}** {interval(call['sensitivity_ci95'])}
({call['true_positive']}/{call['positive']}), specificity **{call['specificity']:.3f}** {interval(call['specificity_ci95'])}
({call['true_negative']}/{call['negative']}). Sensitivity by the IDC a positive core holds: {by_idc}. Core AUC by
direction: {by_direction}.

Operating table of the final rule (the threshold for each target sensitivity, out of fold):

| target sensitivity | threshold | sensitivity [95% CI] | specificity [95% CI] |
|---:|---:|---|---|
{operating_rows}

Second figure, the bag proxy ({bag['positive_bags']} positive and {bag['negative_bags']} negative bags: every
development patient, positive if it holds IDC, and every patient with IDC again with its IDC patches removed):
the shipped decision flags {bag['sensitivity']:.1%} of positive bags and clears {bag['specificity']:.1%} of
negative ones (bag AUC of the final rule {fixed(bag['bag_auc'])}). Sparse patients with one or two IDC patches
make poor cases for a core-biopsy threshold, which is why the threshold is no longer chosen on them.
"""


def stain_section(manifest: dict) -> str:
    """"Stain": the out-of-fold AUC against a turned haematoxylin under each transform, the limit, and what
    the stain QC reads under each."""
    stain = manifest["metrics"]["stain_shift"]
    curves = stain.get("curves", {"own_fit": stain["curve"]})
    names = list(curves)
    unturned = {n: curves[n][0]["pooled_auc"] for n in names}
    curve_rows = "\n".join(f"| {curves[names[0]][i]['angle_deg']:.0f} | " + " | ".join(
        f"{curves[n][i]['pooled_auc']:.4f} ({curves[n][i]['pooled_auc'] - unturned[n]:+.4f})" for n in names) + " |"
        for i in range(len(curves[names[0]])))
    judged = stain.get("qc_judged_on_complete_slides", {})
    judged_rows = "\n".join(f"| {r['angle_deg']:.0f} | " + " | ".join(
        f"{judged[n][i]['h_deg'][1]:.1f} ({judged[n][i]['h_deg'][0]:.1f}-{judged[n][i]['h_deg'][2]:.1f})"
        for n in judged) + " |" for i, r in enumerate(next(iter(judged.values()), [])))
    limits = ", ".join(f"{n} {v:g} deg" for n, v in stain.get("limits_deg", {}).items())
    return f"""
## Stain: what the model tolerates, and the QC limit

{stain['rule']}. Pooled out-of-fold AUC of the fold members (INT8, as the appliance runs them, no TTA), change
from unturned in brackets:

| H turned (deg) | {' | '.join(names)} |
|---:|{'|'.join('---:' for _ in names)}|
{curve_rows}

Where each curve falls by more than {stain['max_auc_drop']}: {limits} (turn degrees of each transform).
{_limit_words(manifest, stain)}

What the appliance's stain QC reads on the complete development slides under each transform (haematoxylin angle
to the reference, median and range over the slides):

| H turned (deg) | {' | '.join(judged)} |
|---:|{'|'.join('---:' for _ in judged)}|
{judged_rows}

The QC measures the case's own stain against the reference, so a slide that starts off the reference reads
differently from one that starts on it, and the fixed-basis turn moves a slide's fitted haematoxylin less than
its nominal angle. Every development patient through the QC (each patch as a tile):
{stain['development_patients_judged']} judged, worst angle {stain['development_worst_angle_deg']} deg, refused at the
limit: {stain['development_patients_refused'] or 'none'}.
"""


def _limit_words(manifest: dict, stain: dict) -> str:
    if manifest["metrics"].get("shift_gates"):
        return (f"The build's limit in turn degrees ({stain['limit_deg']} deg) is not the one in force: a turn is not "
                f"what the QC reads, so the limit is now set in the QC's own reading over three shifts (next section, "
                f"`stain.max_angle_deg` = {manifest['stain']['max_angle_deg']} deg).")
    return (f"**Limit: {stain['limit_deg']} deg** (`stain.max_angle_deg`, from {stain.get('limit_from', 'own_fit')}): "
            f"the appliance calls a case `stain-out-of-range` when its fitted H or E vector lies further than that "
            f"from the reference.")


def lab_shift_section(manifest: dict) -> str:
    """"Other lab and scanner differences": the out-of-fold AUC under fixed shifts, beside the lab-shift
    recipe's when this build is not that recipe, and whether the lab-shift augmentations were kept."""
    lab_shifts = manifest["metrics"].get("lab_shifts")
    if not lab_shifts:
        return ""
    augmentation = manifest["metrics"].get("augmentation_decision", {})
    kept_or_not = ""
    if "kept" in augmentation:
        with_, without = augmentation["with_labshift"], augmentation["without_labshift"]
        kept_or_not = (
            f"**Lab-shift augmentations** (training.LAB_SHIFT: scale x0.8-1.2, blur sigma 0-1 px, "
            f"brightness, contrast, gamma, JPEG quality 60-95, each on half of the patches, on top of the "
            f"stain turn): **{'kept' if augmentation['kept'] else 'not kept'}**. Rule: {augmentation['rule']}. Both "
            f"recipes built in full on the same folds and seed ({augmentation['labshift_build']}):\n\n"
            f"| | with lab shifts | without |\n|---|---:|---:|\n"
            f"| pooled OOF patch AUC (FP32, no TTA) | {with_['pooled_oof_auc']:.4f} | {without['pooled_oof_auc']:.4f} |\n"
            f"| virtual-core AUC, final rule (INT8) | {with_['virtual_core_auc']:.4f} | "
            f"{without['virtual_core_auc']:.4f} |\n"
            f"| virtual-core specificity at sensitivity >= {CASE_MIN_SENSITIVITY:g} (INT8) | "
            f"{with_['virtual_core_specificity']:.3f} | {without['virtual_core_specificity']:.3f} |\n")

    other = augmentation.get("labshift_lab_shifts") if augmentation.get("this_build") != "labshift" else None
    rows = "\n".join(f"| {k} | {v['what']} | {v['pooled_auc']:.4f} | {-v['drop']:+.4f} |"
                      + (f" {other[k]['pooled_auc']:.4f} | {-other[k]['drop']:+.4f} |" if other and k in other else "")
                      for k, v in lab_shifts.items() if isinstance(v, dict))
    head = ("| shift | what | pooled AUC | change | with lab-shift training | change |\n|---|---|---:|---:|---:|---:|"
            if other else "| shift | what | pooled AUC | change |\n|---|---|---:|---:|")
    return f"""
## Other lab and scanner differences

Out-of-fold pooled AUC of the fold members (INT8) under fixed shifts, made with Pillow/numpy code and parameters
that differ from the training augmentation's (idc_build/robustness.py); unshifted {lab_shifts['unshifted_pooled_auc']:.4f}:

{head}
{rows}

{kept_or_not}"""


def drift_section(manifest: dict) -> str:
    """The drift watch's development reference (models/tools/drift_reference.py), as the appliance uses it."""
    drift = manifest.get("drift")
    if not drift:
        return ""
    rows = "\n".join(f"| {k} | {s['n']} | {s['p05']:g} | {s['p50']:g} | {s['p95']:g} |"
                     for k, s in drift["measures"].items() if s)
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(drift["cannot_call"]["by_reason"].items())) or "none"
    return f"""
## Drift reference

What the appliance's drift watch compares a lab's recent cases with until the lab accepts a site validation
of its own (appliance/service/drift.py; docs/site-validation.md): {drift['what']}.

| measure | cases | 5th percentile | median | 95th percentile |
|---|---:|---:|---:|---:|
{rows}

Cannot call, of {drift['cannot_call']['cases']} cores: {reasons}.
"""
