"""The model card's sections on how the appliance decides: the case rule and threshold on virtual cores, the
stain curves and limit, and the other lab and scanner shifts (rendered from manifest.json by card.py)."""
from __future__ import annotations


def _f(x, nd=4):
    return "n/a" if x is None else f"{x:.{nd}f}"


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


def _ci(x) -> str:
    return f"[{x[0]:.3f}, {x[1]:.3f}]"


def cores_section(m: dict) -> str:
    mt, d = m["metrics"], m["decision"]
    vc = mt.get("virtual_cores")
    if not vc:
        return ""
    rules = sorted(vc["rules"].items(), key=lambda kv: (-kv[1]["specificity"], -kv[1]["auc"]))
    rule_rows = "\n".join(f"| {_rule_words(k)} | {v['auc']:.4f} | {v['threshold']:g} | {v['sensitivity']:.3f} | "
                          f"{v['specificity']:.3f} |{' **shipped**' if k == vc['final_rule'] else ''}"
                          for k, v in rules)
    op_rows = "\n".join(f"| {r['target_sensitivity']:.2f} | {r['threshold']:g} | {r['sensitivity']:.3f} "
                        f"{_ci(r['sensitivity_ci95'])} | {r['specificity']:.3f} {_ci(r['specificity_ci95'])} |"
                        for r in vc["operating_table"])
    sc, fin, early = vc["shipped_call"], vc["final"], vc["early"]
    bins = ", ".join(f"{k} IDC patches: {v:.1%}" for k, v in vc["sensitivity_by_idc_patches"].items())
    dirs = ", ".join(f"{k} {v['auc']:.4f} ({v['cores']})" for k, v in vc["by_direction"].items())
    bag = mt["case_level_out_of_fold"]
    early_words = (early.get("note") or f"{_rule_words(early['rule'])} >= {early['threshold']:g}: its threshold sits "
                   f"just above the highest out-of-fold negative core; it fired on {early['positive_cores_fired']} of "
                   f"{early['positive_cores']} positive cores and {early['negative_cores_fired']} negative ones")
    return f"""
## Case rule and threshold: virtual core biopsies

The bench sees core-needle biopsies, so the case rule and its threshold are chosen on **virtual cores**:
{vc['what']}. {vc['cores']} cores from {vc['slides']} slides: {vc['positive']} positive ({', '.join(f"{k}: {v}" for k, v in vc['positive_by_idc_patches'].items())} IDC
patches), {vc['negative']} negative, {vc['left_out_ambiguous']} strips left out as ambiguous; a median of
{vc['patches_per_core']['median']} patches per core ({vc['patches_per_core']['min']}-{vc['patches_per_core']['max']}).

Every rule at its own highest threshold with sensitivity >= 0.98 on positive cores (out of fold, INT8):

| rule | core AUC | threshold | sensitivity | specificity |
|---|---:|---:|---:|---:|
{rule_rows}

**Final rule: {_rule_words(vc['final_rule'])}** (`decision.case_rule` = {d['case_rule']}, k = {d['top_k']}):
{vc['final_rule_choice']}. Core AUC **{fin['auc']:.4f}** {_ci(fin['auc_ci95'])} (95% CI, bootstrap over
patients). `case_threshold` = **{d['case_threshold']}**.

**Early positive** (`decision.early`): {early_words}. The verdict is *suspicious* when the early positive fired
**or** the final rule passes the case threshold, so the final rule can never reverse an early call: an early rule
that can only rise makes the early call final, and the final rule only adds calls.

The shipped call on the cores: sensitivity **{sc['sensitivity']:.3f}** {_ci(sc['sensitivity_ci95'])}
({sc['true_positive']}/{sc['positive']}), specificity **{sc['specificity']:.3f}** {_ci(sc['specificity_ci95'])}
({sc['true_negative']}/{sc['negative']}). Sensitivity by the IDC a positive core holds: {bins}. Core AUC by
direction: {dirs}.

Operating table of the final rule (the threshold for each target sensitivity, out of fold):

| target sensitivity | threshold | sensitivity [95% CI] | specificity [95% CI] |
|---:|---:|---|---|
{op_rows}

Second figure, the bag proxy ({bag['positive_bags']} positive and {bag['negative_bags']} negative bags: every
development patient, positive if it holds IDC, and every patient with IDC again with its IDC patches removed):
the shipped decision flags {bag['sensitivity']:.1%} of positive bags and clears {bag['specificity']:.1%} of
negative ones (bag AUC of the final rule {_f(bag['bag_auc'])}). Sparse patients with one or two IDC patches
make poor cases for a core-biopsy threshold, which is why the threshold is no longer chosen on them.
"""


def stain_section(m: dict) -> str:
    st = m["metrics"]["stain_shift"]
    curves = st.get("curves", {"own_fit": st["curve"]})
    names = list(curves)
    base = {n: curves[n][0]["pooled_auc"] for n in names}
    rows = "\n".join(f"| {curves[names[0]][i]['angle_deg']:.0f} | " + " | ".join(
        f"{curves[n][i]['pooled_auc']:.4f} ({curves[n][i]['pooled_auc'] - base[n]:+.4f})" for n in names) + " |"
        for i in range(len(curves[names[0]])))
    judged = st.get("qc_judged_on_complete_slides", {})
    j_rows = "\n".join(f"| {r['angle_deg']:.0f} | " + " | ".join(
        f"{judged[n][i]['h_deg'][1]:.1f} ({judged[n][i]['h_deg'][0]:.1f}-{judged[n][i]['h_deg'][2]:.1f})"
        for n in judged) + " |" for i, r in enumerate(next(iter(judged.values()), [])))
    limits = ", ".join(f"{n} {v:g} deg" for n, v in st.get("limits_deg", {}).items())
    return f"""
## Stain: what the model tolerates, and the QC limit

{st['rule']}. Pooled out-of-fold AUC of the fold members (INT8, as the appliance runs them, no TTA), change
from unturned in brackets:

| H turned (deg) | {' | '.join(names)} |
|---:|{'|'.join('---:' for _ in names)}|
{rows}

Where each curve falls by more than {st['max_auc_drop']}: {limits}. **Limit: {st['limit_deg']} deg**
(`stain.max_angle_deg`, from {st.get('limit_from', 'own_fit')}): the appliance calls a case `stain-out-of-range`
when its fitted H or E vector lies further than that from the reference.

What the appliance's stain QC reads on the complete development slides under each transform (haematoxylin angle
to the reference, median and range over the slides):

| H turned (deg) | {' | '.join(judged)} |
|---:|{'|'.join('---:' for _ in judged)}|
{j_rows}

The QC measures the case's own stain against the reference, so a slide that starts off the reference reads
differently from one that starts on it, and the fixed-basis turn moves a slide's fitted haematoxylin less than
its nominal angle. Every development patient through the QC (each patch as a tile):
{st['development_patients_judged']} judged, worst angle {st['development_worst_angle_deg']} deg, refused at the
limit: {st['development_patients_refused'] or 'none'}.
"""


def lab_shift_section(m: dict) -> str:
    ls = m["metrics"].get("lab_shifts")
    if not ls:
        return ""
    ad = m["metrics"].get("augmentation_decision", {})
    decision = ""
    if "kept" in ad:
        w, wo = ad["with_labshift"], ad["without_labshift"]
        decision = (f"**Lab-shift augmentations** (training.LAB_SHIFT: scale x0.8-1.2, blur sigma 0-1 px, "
                    f"brightness, contrast, gamma, JPEG quality 60-95, each on half of the patches, on top of the "
                    f"stain turn): **{'kept' if ad['kept'] else 'not kept'}**. Rule: {ad['rule']}. Both recipes "
                    f"built in full on the same folds and seed ({ad['labshift_build']}):\n\n"
                    f"| | with lab shifts | without |\n|---|---:|---:|\n"
                    f"| pooled OOF patch AUC (FP32, no TTA) | {w['pooled_oof_auc']:.4f} | {wo['pooled_oof_auc']:.4f} |\n"
                    f"| virtual-core AUC, final rule (INT8) | {w['virtual_core_auc']:.4f} | {wo['virtual_core_auc']:.4f} |\n"
                    f"| virtual-core specificity at sensitivity >= 0.98 (INT8) | {w['virtual_core_specificity']:.3f} | "
                    f"{wo['virtual_core_specificity']:.3f} |\n")

    other = ad.get("labshift_lab_shifts") if ad.get("this_build") != "labshift" else None
    rows = "\n".join(f"| {k} | {v['what']} | {v['pooled_auc']:.4f} | {-v['drop']:+.4f} |"
                      + (f" {other[k]['pooled_auc']:.4f} | {-other[k]['drop']:+.4f} |" if other and k in other else "")
                      for k, v in ls.items() if isinstance(v, dict))
    head = ("| shift | what | pooled AUC | change | with lab-shift training | change |\n|---|---|---:|---:|---:|---:|"
            if other else "| shift | what | pooled AUC | change |\n|---|---|---:|---:|")
    return f"""
## Other lab and scanner differences

Out-of-fold pooled AUC of the fold members (INT8) under fixed shifts, made with Pillow/numpy code and parameters
that differ from the training augmentation's (idc_build/robustness.py); unshifted {ls['unshifted_pooled_auc']:.4f}:

{head}
{rows}

{decision}"""


def drift_section(m: dict) -> str:
    """The drift watch's development reference (models/tools/drift_reference.py), as the appliance uses it."""
    d = m.get("drift")
    if not d:
        return ""
    rows = "\n".join(f"| {k} | {s['n']} | {s['p05']:g} | {s['p50']:g} | {s['p95']:g} |"
                     for k, s in d["measures"].items() if s)
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(d["cannot_call"]["by_reason"].items())) or "none"
    return f"""
## Drift reference

What the appliance's drift watch compares a lab's recent cases with until the lab accepts a site validation
of its own (appliance/site/drift.py; README "Validating the appliance in your lab"): {d['what']}.

| measure | cases | 5th percentile | median | 95th percentile |
|---|---:|---:|---:|---:|
{rows}

Cannot call, of {d['cannot_call']['cases']} cores: {reasons}.
"""
