"""One build end to end (main): folds, baseline, members, INT8, thresholds, shipped graph, manifest and card."""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from .ablation import run_ablation, write_default_ablation
from .augmentation import augmentation_decision
from .card import write_card
from .dataset import load_data
from .deciding import (case_rule_step, context_stage, core_step, per_fold_auc, reserved_context_check,
                       robustness_step, stain_limit_step)
from .evaluation import colour_baseline, cross_validation, quantization_out_of_fold
from .log import log
from .members import OutOfFold, TtaChoice, fold_members_int8, save_members, train_fold_members
from .metrics import auc, best_balanced_accuracy_threshold
from .network import TTA_MIN_GAIN
from .record import BuildRun, manifest_header, threshold_rules, training_record, write_split
from .shipped import build_shipped
from .stain import stain_reference
from .training import ABLATION_VARIANTS, AUGMENTATIONS

SCRIPT = Path(__file__).resolve().parents[1] / "build_idc_model.py"  # the command line that calls main()


def parse_args(argv=None, description=None):
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--tta", choices=("auto", "on", "off"), default="off",
                    help=f"8-way flip/rotation TTA in the shipped graph; auto = on if it raises pooled OOF AUC "
                         f"by >= {TTA_MIN_GAIN}. Default off: TTA costs 8x the inference and the whole model may "
                         f"cost at most 1.3x the 0.3.0 model's inference time, so it cannot pay")
    ap.add_argument("--aug", choices=sorted(AUGMENTATIONS), default="stainturn",
                    help="training augmentation of the fold members (hsv = the 0.3.0 recipe; stainturn = 0.4.0 and "
                         "0.5.0; labshift = stainturn + scale, blur, JPEG, brightness, contrast, gamma, measured and "
                         "not kept: models/tools/labshift_build.json)")
    ap.add_argument("--ablation", choices=sorted(ABLATION_VARIANTS), default=None)
    ap.add_argument("--folds", default=None, help="with --ablation: comma-separated folds to train (default all)")
    ap.add_argument("--card-only", action="store_true", help="re-render MODEL_CARD.md from manifest.json")
    ap.add_argument("--reuse-members", type=Path, default=None,
                    help="skip training: load the fold members from a previous build's work/model.pt (same seed "
                         "and data) and redo everything after training; timings are taken from that build's manifest")
    return ap.parse_args(argv)


def main(argv=None, *, description=None, script=None):
    """The build. description: --help text (the script's docstring); script: the script path for the recorded
    invocation (default models/tools/build_idc_model.py)."""
    args = parse_args(argv, description)
    out = args.out
    if args.card_only:
        return write_card(out)
    script = SCRIPT if script is None else script
    command_line = "python " + " ".join(shlex.quote(a) for a in
                                        ([os.path.relpath(script)] if script else []) + sys.argv[1:])
    t_start = time.time()

    import torch
    torch.set_num_threads(int(os.environ.get("BUILD_TORCH_THREADS", "2")))  # 1 when two builds share the machine
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    work = out / "work"  # intermediates, git-ignored (models/**/work/)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)

    d = load_data(args.data, args.seed)
    if args.ablation:  # train a recipe variant on some folds, write OOF metrics, stop
        return run_ablation(args, d, work, command_line)

    # stain reference (for the appliance's stain QC; normalisation measured as an ablation, not used)
    _, stain_ref, stain_angles = stain_reference(d.images, d.patients, d.dev)
    log(f"stain reference {stain_ref.to_dict()}; development patients' worst H/E angle to it (deg): {stain_angles}")
    baseline = colour_baseline(d)

    # one model per fold, trained on the other folds; out-of-fold predictions without and with TTA
    members = train_fold_members(args, d, work, stain_ref.he)
    if not members.reused:  # the trained members and their record, before any later step can fail
        save_members(work, members, d, args, time.time() - t_start)
    write_default_ablation(work, d, args.epochs, members)
    y_dev = d.labels[d.dev]
    tta = TtaChoice(args.tta, auc(y_dev, members.oof_fp32[d.dev]), auc(y_dev, members.oof_fp32_tta[d.dev]))
    log(f"pooled OOF AUC {tta.auc_without:.4f} without TTA, {tta.auc_with:.4f} with TTA -> "
        f"TTA {'on' if tta.on else 'off'}")

    import nncf
    import onnx
    import openvino as ov
    import onnxruntime as ort
    versions = {"python": platform.python_version(), "torch": torch.__version__, "openvino": ov.__version__,
                "nncf": nncf.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__}
    core = ov.Core()
    calibration_rng = np.random.default_rng(args.seed)  # calibration samples: fold members first, then shipped graph
    fp32_shipped = members.oof_fp32_tta if tta.on else members.oof_fp32  # the exported graphs, f32 hint
    oof = OutOfFold(fp32=members.oof_fp32, fp32_tta=members.oof_fp32_tta, tta=tta.on,
                    int8=fold_members_int8(d, work, core, calibration_rng, tta=tta.on, fp32_shipped=fp32_shipped))

    # the first-stage threshold (decision.region_threshold); the refined one comes with the context stage
    first_stage_threshold = best_balanced_accuracy_threshold(y_dev, oof.int8[d.dev])
    negative_patients = sum(int(d.labels[d.patients == p].max() == 0) for p in sorted(d.fold_of))

    # the context stage, stacked out of fold on the members' INT8 probabilities (what it sees at run time)
    context = context_stage(d, oof, out, core)
    # the case rule and its threshold: virtual core biopsies of the complete slides, out of fold
    cores_metrics, decision = core_step(d, context, oof, first_stage_threshold, work)
    augmentation = augmentation_decision(args.aug, tta.auc_without, cores_metrics)
    # the bag proxy (sparse patients as bags), kept as a second figure
    rule, case_metrics = case_rule_step(d, context, oof, first_stage_threshold, decision)
    # the stain limit: out-of-fold AUC of the fold members against a turned haematoxylin, two transforms
    stain_limit = stain_limit_step(d, work, core, stain_ref)
    # other lab and scanner differences: out-of-fold AUC under fixed shifts
    lab_shifts = robustness_step(d, work, core)

    cv = cross_validation(d, oof, first_stage_threshold)
    quant_cv = quantization_out_of_fold(d, oof, first_stage_threshold)
    log(f"CV INT8 AUC {cv['int8_shipped_recipe']['mean_sd']['auc']}, "
        f"BAC {cv['int8_shipped_recipe']['mean_sd']['balanced_accuracy']}; quantization {quant_cv}")

    shipped_checks = build_shipped(d, members, tta=tta.on, out=out, work=work, core=core,
                                   calibration_rng=calibration_rng, first_stage_threshold=first_stage_threshold,
                                   seed=args.seed)
    shipped_checks["shipped_reserved_context"] = reserved_context_check(d, out, core, context, decision,
                                                                        first_stage_threshold)

    write_split(out, d, args.seed)
    run = BuildRun(command_line=command_line, versions=versions, wall_seconds=time.time() - t_start)
    metrics = {
        "threshold_rules": threshold_rules(cores_metrics, negative_patients),
        "cross_validation": cv,
        "baseline_colour_histogram": baseline,
        "quantization_out_of_fold": quant_cv,
        "virtual_cores": cores_metrics,
        "case_level_out_of_fold": case_metrics,
        "case_rules_out_of_fold": rule,
        "lab_shifts": lab_shifts,
        "augmentation_decision": augmentation,
        "context_stage": context.metrics,
        "stain_shift": stain_limit,
        "tta_ablation": {"pooled_oof_auc_no_tta": round(tta.auc_without, 4),
                         "pooled_oof_auc_tta": round(tta.auc_with, 4),
                         "per_fold_no_tta": per_fold_auc(d, oof.fp32), "per_fold_tta": per_fold_auc(d, oof.fp32_tta)},
        **shipped_checks,
    }
    manifest = manifest_header(d, decision, refined_threshold=context.refined_threshold,
                               first_stage_threshold=first_stage_threshold, stain_ref=stain_ref,
                               stain_angles=stain_angles, stain_limit=stain_limit)
    manifest["training"] = training_record(args, d, members, tta, run)
    manifest["metrics"] = metrics
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    write_card(out)
    log(f"done in {run.wall_seconds:.0f}s; wrote {sorted(p.name for p in out.iterdir())}")
