"""The model card's sections on what the model is and how it was made: what it is, the recipe, the data, the
folds, the decision thresholds, how to rebuild it and its limitations (rendered from manifest.json by card.py)."""
from __future__ import annotations

import json

from .card_text import count_word
from .data import HELD_OUT


def development_complete_slides(manifest: dict, split: dict) -> int:
    """Complete slides among the development patients (what the virtual cores are cut from)."""
    return sum(split["counts"][str(k)]["complete_slides"] for k in range(manifest["training"]["folds"]))


def reserved_complete_slides(manifest: dict) -> int:
    """Complete slides among the reserved patients: those the build cut virtual cores from
    (deciding.reserved_context_check)."""
    return sum("virtual_cores" in v for v in manifest["metrics"].get("shipped_reserved_context", {}).values())


def header_section(manifest: dict) -> str:
    """The title, the research-only warning and "What it is": the runtime contract and the files."""
    decision, model_input = manifest["decision"], manifest["input"]
    patch = f"{model_input['width']}x{model_input['height']}"
    return f"""# Model card: idc-resnet {manifest['version']}

**FOR RESEARCH AND TRIAGE ONLY, NOT FOR DIAGNOSIS.** This model has not been clinically validated. Its output
must never be used to diagnose, rule out or grade cancer, or to make any treatment decision. Every case must be
read by a qualified pathologist regardless of what the model says. Intended use: ordering/prioritising research
cases for review, and research on triage workflows.

## What it is

A patch classifier for H&E-stained breast tissue. It takes one {patch} RGB patch and returns the probability that
the patch contains invasive ductal carcinoma (IDC). The appliance tiles a slide into {patch} patches (stride
{manifest['patch']['stride']}), skips patches with less than {manifest['patch']['min_tissue_fraction']:.0%} tissue, scores the rest, and summarises
a case by its case rule ({decision.get('case_rule', 'top-k-mean')}; see below). A second small model, the context
stage, refines each patch's probability from its neighbours on the case's patch grid.

* Input `image`: uint8, NHWC `[N, {model_input['height']}, {model_input['width']}, {model_input['channels']}]`, RGB, dynamic N. Edge patches smaller than {patch} are padded at
  bottom/right with {model_input['pad_value']} (white glass). Normalisation is inside the graph: `float(x)/255`, then `(x-mean)/std`
  per channel with mean `{model_input['mean']}` and std `{model_input['std']}` (development pixels).
* Output `probability`: float32 `[N, 1]`, sigmoid probability of IDC (sigmoid and all averaging inside the graph).
* Files: `model.int8.xml`/`model.int8.bin` (OpenVINO INT8 IR, the primary engine), `model.fp32.onnx`
  (ONNX Runtime fallback), `context.xml`/`context.bin`/`context.onnx` (the context stage, FP32), `manifest.json` (contract, thresholds + rules, sha256 of every other file, metrics),
  `split.json` (folds and reserved patients), this card.
* Scale: about {model_input['microns_per_pixel']} µm per pixel. This is **approximate**: the slides were scanned at 40x
  and the patches were cut from downsampled images (about 2.5x; Janowczyk & Madabhushi 2016). The magnification
  of the patches was not checked independently.

"""


def recipe_section(manifest: dict) -> str:
    """"Recipe and why": network, shipped graph, training, augmentation, quantization, seed and timings."""
    training = manifest["training"]
    final_losses = "; ".join(f"fold {k}: final train loss {history[-1]['train_loss']}"
                             for k, history in enumerate(training["history"]))
    return f"""## Recipe and why

* **Network** (one member): {training['architecture']}. {training['parameters_per_member']:,} parameters per member,
  {training['parameters_total']:,} in the shipped graph.
  Why: no pretrained weights (offline build) and a 2-core CPU for both training and inference. A lossless
  space-to-depth stem keeps every pixel of nuclear detail but runs the network at 25x25 from the first conv, about 4x
  cheaper than the 0.1.0 full-resolution stem; this is what made a k-fold recipe fit the 30-minute budget. The last
  stage is kept at 128 channels so three members stay within a few MB.
* **Shipped graph**: {training['shipped_graph']}. One ONNX/IR file; the runtime sees the same single-input/single-output
  contract as before.
* **Training**: {training['epochs']} epochs per member; {training['optimizer']}; {training['loss']}.
* **Augmentation**: {training['augmentation']}. Histology has no canonical orientation (dihedral group); HSV/brightness jitter
  imitates stain and scanner variation.
* **Quantization**: {training['quantization']}. ReduceMean nodes (global pool, averaging over views and members) are
  kept in FP: with them quantized, NNCF put a quantizer on the sigmoid outputs calibrated from single-patch
  statistics, which clipped every probability into a narrow band (first build: out-of-fold AUC drop 0.03-0.06,
  mean |Δp| 0.16; the same mechanism explains the ~0.47 that 0.1.0 gave to non-tissue input).
* Seed {training['seed']} (folds, initialisation, batches, augmentation, calibration sample). Training time per member:
  {', '.join(f'{s / 60:.1f}' for s in training['train_seconds_per_fold'])} min; whole build (`make model`) {training['wall_seconds'] / 60:.1f} min on
  2 CPU cores ({training.get('wall_seconds_note', '')}). {final_losses}.

"""


def data_section(manifest: dict, split: dict) -> str:
    """"Data and licence": the patients and patches used (development and reserved), the licence, citations."""
    training = manifest["training"]
    patients = training["development_patients"] + len(training["reserved_patients"])
    patches = training["development_patches"] + split["counts"]["reserved"]["patches"]
    complete_slides = development_complete_slides(manifest, split) + reserved_complete_slides(manifest)
    return f"""## Data and licence

IDC breast histopathology patches (Kaggle "Breast Histopathology Images"), training/dev portion only:
{patients} patients, {patches:,}
patches, {complete_slides} of them complete slides. Kaggle lists the dataset as **CC0 1.0** (public domain dedication); the Kaggle page itself could
not be checked when the data were collected, so check it before any release (see the data set's PROVENANCE.md).
The separate held-out portion ({len(HELD_OUT)} other patients) was not used for training, tuning or threshold selection.

Cite the original work:

* Cruz-Roa A. et al., "Automatic detection of invasive ductal carcinoma in whole slide images with convolutional
  neural networks", Proc. SPIE Medical Imaging 2014: Digital Pathology, 9041:904103. doi:10.1117/12.2043872
* Janowczyk A., Madabhushi A., "Deep learning for digital pathology image analysis: A comprehensive tutorial with
  selected use cases", J Pathol Inform 2016;7:29. PMID 27563488

"""


def folds_section(manifest: dict, split: dict) -> str:
    """"Folds (by patient)": how patients were dealt into folds, the reserved patients, counts per fold."""
    counts, reserved = split["counts"], split["reserved"]
    rows = []
    for k in range(manifest["training"]["folds"]):
        fold = counts[str(k)]
        rows.append(f"| fold {k} | {fold['patients']} | {fold['complete_slides']} | {fold['patches']} | "
                    f"{fold['idc_patches']} |")
    r = counts["reserved"]
    rows.append(f"| reserved (never trained on) | {r['patients']} | {reserved_complete_slides(manifest)} | "
                f"{r['patches']} | {r['idc_patches']} |")
    return f"""## Folds (by patient)

Patches of one patient are near-duplicates, so every split is **by patient**, never by patch. {split['method']}.
{count_word(len(reserved['patients'])).capitalize()} patients are **reserved** and never trained on by any member: {', '.join(map(str, reserved['patients']))}
({reserved['why']}).

| | patients | complete slides | patches | IDC patches |
|---|---:|---:|---:|---:|
{chr(10).join(rows)}

"""


def thresholds_section(manifest: dict) -> str:
    """"Decision thresholds": each threshold in manifest["decision"] with the rule it was chosen by."""
    decision, rules = manifest["decision"], manifest["metrics"]["threshold_rules"]
    bags = manifest["metrics"]["case_level_out_of_fold"]
    return f"""## Decision thresholds

* `patch_threshold` = {decision['patch_threshold']}: {rules['patch_threshold']}.
* `region_threshold` = {decision.get('region_threshold')}: {rules.get('region_threshold', '')}.
* `case_threshold` = {decision['case_threshold']} ({decision.get('case_rule', 'top-k-mean')}, k = {decision['top_k']}) and
  `early` = {json.dumps(decision.get('early'))}: {rules['case_threshold']}; see "Case rule and
  threshold" above. On the bag proxy it flags {bags['sensitivity']:.2%} of positive bags and clears
  {bags['specificity']:.2%} of negative ones.
* The thresholds and the context stage come from single-member out-of-fold scores and are applied to the
  {manifest['training']['folds']}-member average; averaging changes calibration a little (see the reserved-patient table).

"""


def build_section(manifest: dict) -> str:
    """"Build and reproduce": the recorded command line and library versions."""
    training = manifest["training"]
    return f"""## Build and reproduce

From the repository root, in `.venv-train` (`make model`):

```
{training['invocation']}
```

Deterministic for a given seed, machine and library versions ({', '.join(f'{a} {b}' for a, b in training['versions'].items())}).
The manifest holds the sha256 of every other file in this folder.

"""


def limitations_section(manifest: dict, split: dict) -> str:
    """"Limitations", and the research-only warning again."""
    baseline_auc = manifest["metrics"]["baseline_colour_histogram"]["mean_sd"]["auc"]["mean"]
    cv_patients = manifest["metrics"]["cross_validation"]["int8_shipped_recipe"]["pooled"]["n_patients"]
    complete_slides = development_complete_slides(manifest, split)
    return f"""## Limitations

* One public cohort from one lab: one scanning and staining protocol. Performance on other scanners, stains or
  preparations is unknown; on another lab's images of benign and malignant breast tissue (kept back by the
  team, not available to this build) an earlier version fell from AUC 0.95 to 0.83, and benign lobules scored as
  high as IDC. The stain curves and the lab-shift table above measure some shifts; section thickness, fixation
  and case mix were not measured. A lab must validate the appliance on its own cases before relying on it.
* A virtual core is a strip of a complete slide, not a real biopsy: its edges are straight, it holds whatever
  tissue the slide had there, and the {complete_slides} complete slides it comes from are one cohort. Cores of one slide overlap
  and are alike, so the intervals are by patient and are wide.
* **DCIS is not a target of this model**: the labels mark invasive ductal carcinoma only.
* Patch labels are coarse (region annotations); some label noise is expected. A colour-only model already reaches
  AUC {baseline_auc:.3f} on these folds, i.e. much of the signal is colour/density, which is fragile under stain shift.
* The scale (~{manifest['input']['microns_per_pixel']:g} µm/pixel) is approximate; patches at another scale are out of distribution.
* Only IDC vs non-IDC. DCIS, lobular carcinoma and benign proliferations are not modelled and may be scored either way.
* Cross-validation uses {cv_patients} patients of one source; complete slides carry most patches, so
  folds differ in size and difficulty (see the sd). These are not clinical performance claims.
* The case rule and its threshold come from {complete_slides} complete slides; patients without any IDC are rare in this data.
* Non-tissue, pen marks, blur, folds and bubbles are out of distribution (see the probe table).

**FOR RESEARCH AND TRIAGE ONLY, NOT FOR DIAGNOSIS.**
"""
