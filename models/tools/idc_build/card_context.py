"""The model card's sections on the context stage and what follows it (the shipped stage on the reserved
patients, then the case rule, stain, lab-shift and drift sections of card_decision.py), and the comparison with
an earlier recipe on the same folds (rendered from manifest.json by card.py)."""
from __future__ import annotations

from .card_decision import cores_section, drift_section, lab_shift_section, stain_section
from .card_gates import gates_section
from .card_text import fixed_or_na
from .data import DEMO_PATIENT

# context_stage metrics -> row label, in the order of the card's table
CONTEXT_ROWS = (("first_stage_int8", "first stage alone (INT8)"),
                ("context_complete_int8", "+ context, trained on complete slides (INT8)"),
                ("context_all_int8", "+ context, trained on all patients (INT8)"),
                ("first_stage_fp32", "first stage alone (FP32)"),
                ("context_complete_fp32", "+ context, complete slides (FP32)"),
                ("context_all_fp32", "+ context, all patients (FP32)"))
# recipe_comparison.json figures -> row label
COMPARISON_ROWS = (("pooled OOF patch AUC, first stage", ("first_stage", "pooled_auc")),
                   ("pooled OOF patch AUC, as shipped (first stage + context)", ("shipped", "pooled_auc")),
                   ("mean fold AUC, as shipped", ("shipped", "auc_mean")),
                   ("region Dice, complete slides, mean", ("shipped", "dice_mean")),
                   ("bag AUC, shipped case rule", ("shipped", "bag_auc")))


def context_section(manifest: dict) -> str:
    """"Context stage" (empty without one), followed by the sections on how the appliance decides."""
    context = manifest["metrics"].get("context_stage")
    if not context:
        return ""
    rows = []
    for name, label in CONTEXT_ROWS:
        r = context[name]
        rows.append(f"| {label} | {' / '.join(f'{a:.4f}' for a in r['per_fold_auc'])} | "
                    f"{r['auc_mean_sd']['mean']:.4f} ± {r['auc_mean_sd']['sd']:.4f} | {r['pooled_auc']:.4f} | "
                    f"{r['dice']['mean']:.4f} (min {r['dice']['min']:.2f}) |")
    return f"""
## Context stage (second model over the patch grid)

{manifest['context']['description']}. Labels in this data set mark whole regions (a patch's neighbours predict its label
with AUC 0.997), while one {manifest['input']['width']} px patch cannot see the region. The stage is fitted only on **out-of-fold**
first-stage outputs (in-fold outputs are overconfident), and checked by stacking per fold: for fold k, a stage
fitted on the other folds' out-of-fold outputs, applied to fold k's patients. {context['rule']}. The shipped stage is
fitted on every development patient's out-of-fold INT8 outputs of that set; its OpenVINO graph matches the torch
module to {context['max_abs_diff_openvino_vs_torch']}. It runs once per case when the last tile is in, on the whole
grid; the refined probability is what the heatmap, `regions.geojson` and each patch's `probability` carry (the
first stage's value is kept beside it as `first_stage`).

Out of fold, {context['complete_slides']} complete development slides for Dice (threshold: best balanced accuracy of
the same probabilities):

| | fold AUCs | mean ± sd | pooled AUC | region Dice, mean |
|---|---|---:|---:|---:|
{chr(10).join(rows)}

{_reserved_context(manifest)}{cores_section(manifest)}{stain_section(manifest)}{gates_section(manifest)}{lab_shift_section(manifest)}{drift_section(manifest)}"""


def _reserved_context(manifest: dict) -> str:
    """The shipped graph and context stage on the reserved patients, and the calls on the reserved complete
    slide's virtual cores."""
    reserved = manifest["metrics"].get("shipped_reserved_context")
    if not reserved:
        return ""
    rows = "\n".join(f"| {pid} | {v['patches']} | {v['idc_patches']} | {fixed_or_na(v['auc_first_stage'])} | "
                     f"{fixed_or_na(v['auc_refined'])} | {v['dice_first_stage']:.4f} | "
                     f"{v['dice_refined']:.4f} | {v['case_score']:.4f} | {'flagged' if v['flagged'] else 'not flagged'} |"
                     for pid, v in reserved.items())
    cores = "".join(f"\nVirtual cores of reserved slide {pid} with the shipped model: {v['virtual_cores']['positive']} "
                    f"positive ({v['virtual_cores']['true_positive']} called suspicious), {v['virtual_cores']['negative']} "
                    f"negative ({v['virtual_cores']['true_negative']} called benign-appearing).\n"
                    for pid, v in reserved.items() if "virtual_cores" in v)
    return f"""
The shipped graph (INT8, the {manifest['training']['folds']} members averaged) and the shipped context stage on the reserved patients, which no
model saw ({DEMO_PATIENT} is the complete slide bundled as the demo case):

| patient | patches | IDC | AUC first stage | AUC refined | Dice first stage | Dice refined | case score | call |
|---|---:|---:|---:|---:|---:|---:|---:|---|
{rows}
{cores}"""


def comparison_section(comparison) -> str:
    """"Earlier recipes, same folds" from models/tools/recipe_comparison.json (empty without it)."""
    if not comparison:
        return ""
    old, new = comparison["old"], comparison["new"]
    rows = []
    for label, (part, figure) in COMPARISON_ROWS:
        a, b = old[part][figure], new[part][figure]
        rows.append(f"| {label} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    stain = ""
    if comparison.get("stain_shift"):
        old_curve, new_curve = comparison["stain_shift"]["old"], comparison["stain_shift"]["new"]
        stain = ("\n\nOut-of-fold AUC under a turned haematoxylin (same folds, FP32 members):\n\n"
                 f"| H turned (deg) | {old['version']} | {new['version']} |\n|---:|---:|---:|\n" +
                 "\n".join(f"| {a['angle_deg']:.0f} | {a['pooled_auc']:.4f} | {b['pooled_auc']:.4f} |"
                           for a, b in zip(old_curve, new_curve)))
    return f"""
## Earlier recipes, same folds

{comparison['how']}

| figure | {old['version']} | {new['version']} | change |
|---|---:|---:|---:|
{chr(10).join(rows)}{stain}
"""
