"""What the build writes about itself: split.json, the manifest's header (the runtime contract, thresholds,
stain reference) and its training record."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .context import RINGS
from .data import DEMO_PATIENT, FIXTURE_PATIENTS, HELD_OUT, MICRONS_PER_PIXEL, PAD_VALUE, PATCH, RESERVED
from .dataset import Data
from .export import N_CALIBRATION
from .members import FoldMembers, TtaChoice
from .metrics import CASE_MIN_SENSITIVITY
from .network import ARCHITECTURE, TTA_MIN_GAIN
from .split import K_FOLDS
from .training import AUGMENTATIONS, BATCH_SIZE, EMA_DECAY, MAX_LR, WEIGHT_DECAY

VERSION = "0.6.0"
MIN_PATCHES = 15  # fewer tissue patches in a case: too little tissue to call (the top-15 rule's old minimum)


@dataclass(frozen=True)
class BuildRun:
    """How this build was run: its command line, the library versions and its wall time so far."""
    command_line: str
    versions: dict  # library -> version
    wall_seconds: float


def write_split(out: Path, d: Data, seed: int):
    """split.json: the folds, the reserved patients and the counts per fold."""
    split = {
        "seed": seed, "k": K_FOLDS,
        "method": "reserved patients left out; the rest grouped complete-slide vs sparse, sorted by IDC fraction, "
                  f"cut into blocks of {K_FOLDS}, each block dealt to the {K_FOLDS} folds in random order "
                  "(random.Random(seed))",
        "reserved": {"patients": list(RESERVED),
                     "why": f"{DEMO_PATIENT} = bundled demo case, {'/'.join(map(str, FIXTURE_PATIENTS))} = "
                            f"tests/fixtures/idc; never trained on, so demo and tests run on unseen patients"},
        "folds": d.folds,
        "counts": {str(k): {"patients": len(d.folds[k]), "complete_slides": sum(d.complete[p] for p in d.folds[k]),
                            "patches": int(d.in_fold(k).sum()), "idc_patches": int(d.labels[d.in_fold(k)].sum())}
                   for k in range(K_FOLDS)},
    }
    split["counts"]["reserved"] = {"patients": len(RESERVED), "patches": int(d.res.sum()),
                                   "idc_patches": int(d.labels[d.res].sum())}
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n")


def threshold_rules(cores_metrics: dict, negative_patients: int) -> dict:
    """manifest["metrics"]["threshold_rules"]: how each threshold in manifest["decision"] was chosen.
    negative_patients: development patients without IDC (the bag proxy's negative bags)."""
    return {
        "patch_threshold": "maximises balanced accuracy of the pooled out-of-fold refined probabilities "
                           "(context stage stacked out of fold on the fold members' INT8 probabilities, each "
                           "patient scored by models that did not train on it); positive if >= threshold",
        "region_threshold": "maximises balanced accuracy of the pooled out-of-fold first-stage INT8 "
                            "probabilities; the case rule's regions are first-stage cells at or above it",
        "case_rule": f"on out-of-fold virtual core biopsies of the complete development slides: "
                     f"{cores_metrics['final_rule_choice']}: {cores_metrics['final_rule']}",
        "case_threshold": f"the highest threshold (4 decimals, rounded down) that flags >= "
                          f"{CASE_MIN_SENSITIVITY:.0%} of the out-of-fold positive virtual cores "
                          f"(sensitivity-first for triage)",
        "early_threshold": "a first-stage rule that never falls as tiles arrive, its threshold just above the "
                           "highest out-of-fold negative core's score, so that no negative core fires early "
                           "(the final rule itself when that is a first-stage top-k mean)",
        "bag_proxy": f"second figure: patients as bags (each patient with IDC, and again with its IDC patches "
                     f"removed, and the {negative_patients} patients without IDC), scored with the shipped rule",
    }


def training_record(args, d: Data, members: FoldMembers, tta: TtaChoice, run: BuildRun) -> dict:
    """manifest["training"]: how this build was made (recipe, seed, timings, library versions)."""
    parameters = members.parameters_per_member
    wall_seconds, wall_seconds_note = _wall_time(members.reused, run.wall_seconds)
    return {
        "seed": args.seed,
        "epochs": args.epochs,
        "folds": K_FOLDS,
        "architecture": ARCHITECTURE,
        "shipped_graph": f"mean probability of the {K_FOLDS} fold models"
                         + (", each averaged over the 8 flips/90-degree rotations (TTA in graph)" if tta.on else ""),
        "tta": tta.on,
        "tta_rule": (f"TTA kept if it raises pooled OOF AUC (OpenVINO FP32) by >= {TTA_MIN_GAIN}: "
                     f"{tta.auc_without:.4f} -> {tta.auc_with:.4f}") if tta.mode == "auto" else
                    (f"TTA {tta.mode} (--tta {tta.mode}; the default is off: 8x the inference against a speed "
                     f"budget of 1.3x); measured out of fold, pooled AUC {tta.auc_without:.4f} without, "
                     f"{tta.auc_with:.4f} with"),
        "parameters_per_member": parameters,
        "parameters_total": parameters * K_FOLDS,
        "development_patients": len(d.fold_of),
        "development_patches": int(d.dev.sum()),
        "reserved_patients": list(RESERVED),
        "data": f"IDC breast histopathology (Kaggle 'Breast Histopathology Images', CC0 per Kaggle), training/dev "
                f"portion: {d.n_patients} patients, {len(d.images):,} patches (see the data set's PROVENANCE.md); "
                f"the {len(HELD_OUT)} held-out patients were not used",
        "command": "make model",
        "script": "models/tools/build_idc_model.py",
        "invocation": run.command_line,
        "loss": "BCEWithLogits with pos_weight = n_neg/n_pos of each member's training patches (class imbalance)",
        "optimizer": f"AdamW wd={WEIGHT_DECAY}, OneCycle max_lr={MAX_LR} (20% warm-up), batch {BATCH_SIZE}, "
                     f"bf16 autocast on CPU, EMA weights (decay {EMA_DECAY}) exported, no early stopping",
        "augmentation": AUGMENTATIONS[args.aug],
        "quantization": f"NNCF {run.versions['nncf']} post-training quantization of the OpenVINO IR, "
                        f"{N_CALIBRATION} calibration patches drawn from training patients",
        "train_seconds_per_fold": [round(s, 1) for s in members.train_seconds],
        "wall_seconds": wall_seconds,
        "wall_seconds_note": wall_seconds_note,
        "history": members.histories,
        "versions": run.versions,
    }


def _wall_time(reused: dict | None, wall: float) -> tuple[float, str]:
    """The build's wall time and how it was measured. With --reuse-members, the reused build's training time
    (or its whole time, when it finished) plus this run's."""
    if not reused:
        return round(wall, 1), f"one full `make model` run on {os.cpu_count()} cores"
    if not reused.get("complete_build"):
        return (round(reused["wall_seconds"] + wall, 1),
                f"training {reused['wall_seconds'] / 60:.1f} min (a build stopped after training) plus the steps "
                f"after training re-run with --reuse-members in {wall / 60:.1f} min")
    return (round(reused["wall_seconds"], 1),
            f"from the full build whose members were reused (its wall time, measured with /usr/bin/time: "
            f"{reused['wall_seconds'] / 60:.1f} min); the post-training steps were then re-run with --reuse-members "
            f"in {wall / 60:.1f} min")


def manifest_header(d: Data, decision: dict, *, refined_threshold: float, first_stage_threshold: float,
                    stain_ref, stain_angles, stain_limit: dict) -> dict:
    """The manifest up to "sha256" (the runtime contract, thresholds, stain reference); write_card fills sha256.
    refined_threshold: the patch threshold on the context stage's probabilities (decision.patch_threshold);
    first_stage_threshold: the one on the first stage's (decision.region_threshold)."""
    return {
        "schema_version": 1,
        "name": "idc-resnet",
        "version": VERSION,
        "task": "patch-classification",
        "labels": ["non-idc", "idc"],
        "input": {"name": "image", "width": PATCH, "height": PATCH, "channels": 3, "layout": "NHWC",
                  "dtype": "uint8", "color": "RGB", "microns_per_pixel": MICRONS_PER_PIXEL, "pad_value": PAD_VALUE,
                  "normalisation": "in-graph: float(x)/255, then (x-mean)/std per channel",
                  "mean": d.mean, "std": d.std},
        "output": {"name": "probability", "kind": "sigmoid-probability-of-positive"},
        "patch": {"size": PATCH, "stride": PATCH, "min_tissue_fraction": 0.25},
        "decision": {"patch_threshold": refined_threshold, "top_k": decision["top_k"],
                     "case_threshold": decision["case_threshold"], "case_rule": decision["case_rule"],
                     "region_threshold": first_stage_threshold, "min_patches": MIN_PATCHES,
                     "early": decision["early"]},
        "stain": {"normalisation": "none", "reference": stain_ref.to_dict(),
                  "rule": "reference = Macenko fit of the median development patient (H and E vectors and 99th "
                          "percentile strengths, median over patients); used for the stain QC and, if "
                          "normalisation were 'macenko', as the target. Normalisation is 'none' because "
                          "per-patient Macenko lowered out-of-fold AUC (models/tools/ablations.json).",
                  "development_angles_deg": stain_angles,
                  "max_angle_deg": stain_limit["limit_deg"], "limit_rule": stain_limit["rule"]},
        "files": {"openvino": "model.int8.xml", "openvino_weights": "model.int8.bin", "onnx": "model.fp32.onnx"},
        "context": {"kind": "patch-grid-refinement", "rings": RINGS, "openvino": "context.xml",
                    "openvino_weights": "context.bin", "onnx": "context.onnx",
                    "description": f"refined logit = own first-stage logit + a logistic regression on {4 * RINGS} "
                                   f"ring features (r = 1..{RINGS}: neighbours present, neighbours' mean and max "
                                   f"logit minus the own) over the case's patch grid, so a shift of all of a "
                                   f"case's logits passes through unchanged; models/tools/idc_build/context.py"},
        "sha256": {},
    }
