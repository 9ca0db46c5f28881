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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .augmentation import augmentation_decision
from .card import collect_ablations, write_card
from .context import RINGS
from .data import PAD_VALUE, PATCH, RESERVED, colour_features, load_coords, load_patches
from .deciding import (case_rule_step, context_stage, core_step, per_fold_auc, reserved_context_check,
                       robustness_step, stain_limit_step)
from .export import N_CALIBRATION, export_onnx, ov_fp32_predict, ov_predict, quantize_int8, torch_predict
from .log import log
from .metrics import (CASE_MIN_SENSITIVITY, TOP_K, auc, best_balanced_accuracy_threshold, binary_metrics,
                      case_scores, summary)
from .network import ARCHITECTURE, TTA_MIN_GAIN, _classes, build_model
from .split import K_FOLDS, fold_split
from .stain import macenko_per_patient, stain_reference
from .training import (ABLATION_VARIANTS, AUGMENTATIONS, BATCH_SIZE, EMA_DECAY, MAX_LR, WEIGHT_DECAY, fit_logistic,
                       train_member)

VERSION = "0.5.0"
MIN_PATCHES = 15  # fewer tissue patches in a case: too little tissue to call (the top-15 rule's old minimum)
SCRIPT = Path(__file__).resolve().parents[1] / "build_idc_model.py"  # the command line that calls main()
METRIC_KEYS = ("auc", "balanced_accuracy", "f1", "sensitivity", "specificity")  # summarised as mean ± sd


@dataclass
class Data:
    """All patches, their patient folds (fold -1 = reserved) and the development patches' channel statistics."""
    images: np.ndarray
    labels: np.ndarray
    patients: np.ndarray
    complete: dict  # patient -> complete slide?
    fold_of: dict  # development patient -> fold
    folds: list  # sorted patients of each fold
    fold: np.ndarray  # fold of each patch
    dev: np.ndarray  # development patches (in a fold)
    res: np.ndarray  # reserved patches
    mean: list
    std: list
    xs: np.ndarray  # patch position in its patient's slide (pixels)
    ys: np.ndarray

    def in_fold(self, k):
        return self.fold == k

    def train_of(self, k):
        """Training patches of fold k's member: the development patches of the other folds."""
        return self.dev & (self.fold != k)


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
    members, histories, train_secs, p_oof0, p_oof8, reused = train_fold_members(args, d, work, stain_ref.he)
    if not reused:  # the trained members and their record, before any later step can fail
        save_members(work, members, d, args, histories, train_secs, time.time() - t_start)
    n_params = sum(p.numel() for p in members[0].parameters())
    write_default_ablation(work, d, args.epochs, p_oof0, p_oof8, train_secs, n_params)
    auc0, auc8 = auc(d.labels[d.dev], p_oof0[d.dev]), auc(d.labels[d.dev], p_oof8[d.dev])
    tta = {"auto": auc8 - auc0 >= TTA_MIN_GAIN, "on": True, "off": False}[args.tta]
    log(f"pooled OOF AUC {auc0:.4f} without TTA, {auc8:.4f} with TTA -> TTA {'on' if tta else 'off'}")

    import nncf
    import onnx
    import openvino as ov
    import onnxruntime as ort
    versions = {"python": platform.python_version(), "torch": torch.__version__, "openvino": ov.__version__,
                "nncf": nncf.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__}
    core = ov.Core()
    p_oof_fp32 = p_oof8 if tta else p_oof0  # OpenVINO FP32 (f32 hint) of the exported single-model graphs
    cal_rng = np.random.default_rng(args.seed)  # calibration samples: fold members first, then the shipped graph
    p_oof_int8 = fold_members_int8(d, work, tta, core, cal_rng, p_oof_fp32)

    # thresholds (rules written into the manifest)
    y_dev, pat_dev = d.labels[d.dev], d.patients[d.dev]
    thr = best_balanced_accuracy_threshold(y_dev, p_oof_int8[d.dev])
    dev_pids = sorted(d.fold_of)
    cs, cl = case_scores(p_oof_int8[d.dev], pat_dev, y_dev, dev_pids)
    n_case_neg = int((cl == 0).sum())

    # the context stage, stacked out of fold on the members' INT8 probabilities (what it sees at run time)
    context = context_stage(d, p_oof0, p_oof_int8, thr, out, core)
    patch_thr = context["patch_threshold"]
    # the case rule and its threshold: virtual core biopsies of the complete slides, out of fold
    cores_m, decision = core_step(d, context, p_oof_int8, thr, work)
    augmentation = augmentation_decision(args.aug, auc0, cores_m)
    # the bag proxy (sparse patients as bags), kept as a second figure
    rule, case_m = case_rule_step(d, context, p_oof_int8, thr, decision)
    # the stain limit: out-of-fold AUC of the fold members against a turned haematoxylin, two transforms
    stain_limit = stain_limit_step(d, work, core, stain_ref)
    # other lab and scanner differences: out-of-fold AUC under fixed shifts
    lab_shifts = robustness_step(d, work, core)

    cv = cross_validation(d, p_oof0, p_oof8, p_oof_int8, thr, tta)
    quant_cv = quantization_out_of_fold(d, p_oof_fp32, p_oof_int8, thr)
    log(f"CV INT8 AUC {cv['int8_shipped_recipe']['mean_sd']['auc']}, BAC {cv['int8_shipped_recipe']['mean_sd']['balanced_accuracy']}; "
        f"quantization {quant_cv}")

    shipped_checks = build_shipped(d, members, tta, out, work, core, cal_rng, thr, args.seed)
    shipped_checks["shipped_reserved_context"] = reserved_context_check(d, out, core, context, decision, thr)

    write_split(out, d, args.seed)
    wall = time.time() - t_start
    training = training_record(args, d, command_line, tta=tta, auc0=auc0, auc8=auc8, n_params=n_params,
                               train_secs=train_secs, histories=histories, wall=wall, reused=reused,
                               versions=versions)
    metrics = {
        "threshold_rules": {
            "patch_threshold": "maximises balanced accuracy of the pooled out-of-fold refined probabilities "
                               "(context stage stacked out of fold on the fold members' INT8 probabilities, each "
                               "patient scored by models that did not train on it); positive if >= threshold",
            "region_threshold": "maximises balanced accuracy of the pooled out-of-fold first-stage INT8 "
                                "probabilities; the case rule's regions are first-stage cells at or above it",
            "case_rule": f"on out-of-fold virtual core biopsies of the complete development slides: "
                         f"{cores_m['final_rule_choice']}: {cores_m['final_rule']}",
            "case_threshold": f"the highest threshold (4 decimals, rounded down) that flags >= "
                              f"{CASE_MIN_SENSITIVITY:.0%} of the out-of-fold positive virtual cores "
                              f"(sensitivity-first for triage)",
            "early_threshold": "a first-stage rule that never falls as tiles arrive, its threshold just above the "
                               "highest out-of-fold negative core's score, so that no negative core fires early "
                               "(the final rule itself when that is a first-stage top-k mean)",
            "bag_proxy": f"second figure: patients as bags (each patient with IDC, and again with its IDC patches "
                         f"removed, and the {n_case_neg} patients without IDC), scored with the shipped rule",
        },
        "cross_validation": cv,
        "baseline_colour_histogram": baseline,
        "quantization_out_of_fold": quant_cv,
        "virtual_cores": cores_m,
        "case_level_out_of_fold": case_m,
        "case_rules_out_of_fold": rule,
        "lab_shifts": lab_shifts,
        "augmentation_decision": augmentation,
        "context_stage": context["metrics"],
        "stain_shift": stain_limit,
        "tta_ablation": {"pooled_oof_auc_no_tta": round(auc0, 4), "pooled_oof_auc_tta": round(auc8, 4),
                         "per_fold_no_tta": per_fold_auc(d, p_oof0), "per_fold_tta": per_fold_auc(d, p_oof8)},
        **shipped_checks,
    }
    manifest = manifest_header(d, patch_thr, decision, stain_ref, stain_angles, thr, stain_limit)
    manifest["training"] = training
    manifest["metrics"] = metrics
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    write_card(out)
    log(f"done in {wall:.0f}s; wrote {sorted(p.name for p in out.iterdir())}")


# ------------------------------------------------------------------------------------------- steps
def member_seed(seed, k, offset=0):
    return seed + 1000 * k + 7919 * offset


def load_data(data_dir: Path, seed: int) -> Data:
    """Load every patch, deal the development patients into K_FOLDS folds and log the fold sizes."""
    log(f"loading patches from {data_dir}")
    images, labels, patients, complete, n_padded = load_patches(data_dir)
    all_pids = sorted(set(patients.tolist()))
    log(f"loaded {len(images)} patches, {len(all_pids)} patients, {n_padded} padded edge patches")
    missing = [p for p in RESERVED if p not in all_pids]
    assert not missing, f"reserved patients missing from the data: {missing}"
    fold_of, frac = fold_split(labels, patients, complete, seed)
    fold = np.array([fold_of.get(int(p), -1) for p in patients])
    dev = fold >= 0
    res = ~dev
    folds = [sorted(p for p, f in fold_of.items() if f == k) for k in range(K_FOLDS)]
    mean = (images[dev].reshape(-1, 3).astype(np.float64).mean(0) / 255.0).round(4).tolist()
    std = (images[dev].reshape(-1, 3).astype(np.float64).std(0) / 255.0).round(4).tolist()
    for k in range(K_FOLDS):
        m = fold == k
        log(f"fold {k}: {len(folds[k])} patients ({sum(complete[p] for p in folds[k])} complete), "
            f"{m.sum()} patches, {labels[m].sum()} IDC")
    log(f"reserved (never trained on): {list(RESERVED)}, {res.sum()} patches; channel mean {mean} std {std}")
    xs, ys = load_coords(data_dir)
    return Data(images, labels, patients, complete, fold_of, folds, fold, dev, res, mean, std, xs, ys)


def run_ablation(args, d: Data, work: Path, command_line: str):
    """--ablation: train a recipe variant on the listed folds, write its OOF metrics and merge ablations.json."""
    _, Shipped = _classes()
    var = ABLATION_VARIANTS[args.ablation]
    ks = [int(s) for s in args.folds.split(",")] if args.folds else list(range(K_FOLDS))
    images = d.images
    if var.get("stain") == "macenko":
        images = macenko_per_patient(images, d.patients, d.dev)
    result = {"variant": args.ablation, "settings": var, "epochs": args.epochs, "folds": {}}
    for k in ks:
        tr, va = d.train_of(k), d.in_fold(k)
        model, hist, secs = train_member(images[tr], d.labels[tr], d.mean, d.std, epochs=args.epochs,
                                         seed=member_seed(args.seed, k, var.get("seed_offset", 0)),
                                         aug=var.get("aug", "hsv"), width_mult=var.get("width_mult", 1.0),
                                         tag=f"[{args.ablation} fold {k}]")
        p0 = ov_fp32_predict(Shipped([model], False), images[va], work / "abl.onnx", images[:2])
        p8 = ov_fp32_predict(Shipped([model], True), images[va], work / "abl.onnx", images[:2])
        np.savez(work / f"ablation-{args.ablation}-fold{k}.npz", p0=p0, p8=p8, y=d.labels[va])
        result["folds"][k] = {"auc": round(auc(d.labels[va], p0), 4),
                              "auc_tta": round(auc(d.labels[va], p8), 4),
                              "train_seconds": round(secs, 1),
                              "parameters": sum(p.numel() for p in model.parameters())}
        log(f"[{args.ablation}] fold {k}: {result['folds'][k]}")
    (work / f"ablation-{args.ablation}.json").write_text(json.dumps(result, indent=1) + "\n")
    collect_ablations(work, command_line)


def colour_baseline(d: Data) -> dict:
    """Colour-histogram logistic regression on the same folds (OOF), with its own best-BAC threshold."""
    t0 = time.time()
    feats = colour_features(d.images)
    p_base = np.full(len(d.images), np.nan)
    for k in range(K_FOLDS):
        tr, va = d.train_of(k), d.in_fold(k)
        p_base[va] = fit_logistic(feats[tr], d.labels[tr])(feats[va])
    thr_base = best_balanced_accuracy_threshold(d.labels[d.dev], p_base[d.dev])
    base_folds = [binary_metrics(d.labels[d.in_fold(k)], p_base[d.in_fold(k)], thr_base, len(d.folds[k]))
                  for k in range(K_FOLDS)]
    log(f"baseline (colour histograms + logistic regression): fold AUC {[m['auc'] for m in base_folds]}, "
        f"BAC {[m['balanced_accuracy'] for m in base_folds]} ({time.time() - t0:.0f}s)")
    return {"method": "per-patch 16-bin histograms of R,G,B,H,S,V + mean/sd of each (108 features), "
                      "standardised, class-weighted L2 logistic regression (LBFGS, numpy/torch), same folds",
            "threshold": thr_base, "folds": base_folds,
            "mean_sd": {kk: summary([m[kk] for m in base_folds]) for kk in METRIC_KEYS}}


def train_fold_members(args, d: Data, work: Path, stain_he):
    """Train (or, with --reuse-members, load) one member per fold and score its own fold through OpenVINO FP32,
    without and with TTA. Returns (members, histories, train seconds, p_oof0, p_oof8, reused training record)."""
    import torch

    _, Shipped = _classes()
    members, histories, train_secs = [], [], []
    p_oof0 = np.full(len(d.images), np.nan)
    p_oof8 = np.full(len(d.images), np.nan)
    reused = None
    if args.reuse_members:
        ck = torch.load(args.reuse_members, map_location="cpu")
        assert ck["mean"] == d.mean and ck["std"] == d.std, "reused members were trained on other data"
        reused = reused_record(args.reuse_members)
        assert reused["seed"] == args.seed and reused["epochs"] == args.epochs
        assert reused.get("augmentation", AUGMENTATIONS["hsv"]) == AUGMENTATIONS[args.aug], "other augmentation"
        shipped_prev = build_model(d.mean, d.std)
        shipped_prev.load_state_dict(ck["model"])
    for k in range(K_FOLDS):
        tr, va = d.train_of(k), d.in_fold(k)
        if reused:
            model, hist, secs = shipped_prev.members[k].eval(), reused["history"][k], reused["train_seconds_per_fold"][k]
        else:
            model, hist, secs = train_member(d.images[tr], d.labels[tr], d.mean, d.std, epochs=args.epochs,
                                             seed=member_seed(args.seed, k), aug=args.aug, stain_he=stain_he,
                                             tag=f"[fold {k}]")
        members.append(model)
        histories.append(hist)
        train_secs.append(secs)
        p_oof0[va] = ov_fp32_predict(Shipped([model], False), d.images[va], work / f"fold{k}.notta.onnx", d.images[:2])
        p_oof8[va] = ov_fp32_predict(Shipped([model], True), d.images[va], work / f"fold{k}.tta.onnx", d.images[:2])
        np.savez(work / f"ablation-default-fold{k}.npz", p0=p_oof0[va], p8=p_oof8[va], y=d.labels[va])
        log(f"fold {k}: OOF AUC {auc(d.labels[va], p_oof0[va]):.4f}, with TTA {auc(d.labels[va], p_oof8[va]):.4f}")
    return members, histories, train_secs, p_oof0, p_oof8, reused


def save_members(work: Path, members, d: Data, args, histories, train_secs, wall):
    """work/members.pt (the fold members, loadable with --reuse-members) and work/training.json (their record)."""
    import torch

    _, Shipped = _classes()
    torch.save({"model": Shipped(members, False).state_dict(), "mean": d.mean, "std": d.std}, work / "members.pt")
    (work / "training.json").write_text(json.dumps({
        "seed": args.seed, "epochs": args.epochs, "augmentation": AUGMENTATIONS[args.aug], "history": histories,
        "train_seconds_per_fold": train_secs, "wall_seconds": wall, "complete_build": False}, indent=1) + "\n")


def reused_record(path: Path) -> dict:
    """The training record of the build whose members --reuse-members loads: its manifest when that build
    finished (wall = the whole build), else its work/training.json (wall = up to the end of training)."""
    manifest = path.parent.parent / "manifest.json"
    if manifest.exists():
        return json.loads(manifest.read_text())["training"] | {"complete_build": True}
    return json.loads((path.parent / "training.json").read_text())


def write_default_ablation(work, d: Data, epochs, p_oof0, p_oof8, train_secs, n_params):
    """The shipped recipe's row of the ablation table (work/ablation-default.json)."""
    (work / "ablation-default.json").write_text(json.dumps({
        "variant": "default", "settings": {}, "epochs": epochs,
        "folds": {k: {"auc": round(auc(d.labels[d.in_fold(k)], p_oof0[d.in_fold(k)]), 4),
                      "auc_tta": round(auc(d.labels[d.in_fold(k)], p_oof8[d.in_fold(k)]), 4),
                      "train_seconds": round(train_secs[k], 1), "parameters": n_params} for k in range(K_FOLDS)}},
        indent=1) + "\n")


def fold_members_int8(d: Data, work: Path, tta, core, cal_rng, p_oof_fp32):
    """Each fold member alone: its exported graph quantized by NNCF (calibration from its own training patients),
    saved as work/fold<k>.int8.xml, and scored in OpenVINO INT8 on its out-of-fold patients. Returns the OOF INT8
    probabilities."""
    import openvino as ov

    p_oof_int8 = np.full(len(d.images), np.nan)
    for k in range(K_FOLDS):
        tr_idx, va = np.flatnonzero(d.train_of(k)), d.in_fold(k)
        path = work / f"fold{k}.{'tta' if tta else 'notta'}.onnx"
        cal = d.images[np.sort(cal_rng.choice(tr_idx, size=N_CALIBRATION, replace=False))]
        q = quantize_int8(path, cal)
        ov.save_model(q, str(work / f"fold{k}.int8.xml"))  # the stain curves and lab shifts score with these
        int8_c = core.compile_model(q, "CPU")
        p_oof_int8[va] = ov_predict(int8_c, d.images[va])
        log(f"fold {k}: OpenVINO FP32 AUC {auc(d.labels[va], p_oof_fp32[va]):.4f}, "
            f"INT8 AUC {auc(d.labels[va], p_oof_int8[va]):.4f}")
    return p_oof_int8


def cross_validation(d: Data, p_oof0, p_oof8, p_oof_int8, thr, tta) -> dict:
    """Per-fold and pooled OOF metrics of the FP32 (no TTA, TTA) and INT8 members, plus INT8 with each fold's
    threshold chosen on the other folds."""
    y_dev, n_dev_patients = d.labels[d.dev], len(d.fold_of)

    def per_fold(p, t):
        return [binary_metrics(d.labels[d.in_fold(k)], p[d.in_fold(k)], t, len(d.folds[k])) for k in range(K_FOLDS)]

    cv = {}
    for name, p in (("fp32_no_tta", p_oof0), ("fp32_tta", p_oof8), ("int8_shipped_recipe", p_oof_int8)):
        t = thr if (name == "int8_shipped_recipe" or (name == "fp32_tta") == tta) \
            else best_balanced_accuracy_threshold(y_dev, p[d.dev])
        fm = per_fold(p, t)
        cv[name] = {"threshold": t, "folds": fm, "mean_sd": {kk: summary([m[kk] for m in fm]) for kk in METRIC_KEYS},
                    "pooled": binary_metrics(y_dev, p[d.dev], t, n_dev_patients)}
    # honest variant: each fold's threshold chosen on the OTHER folds' OOF INT8 predictions
    lofo = []
    for k in range(K_FOLDS):
        other = d.train_of(k)
        t_k = best_balanced_accuracy_threshold(d.labels[other], p_oof_int8[other])
        lofo.append(binary_metrics(d.labels[d.in_fold(k)], p_oof_int8[d.in_fold(k)], t_k, len(d.folds[k])))
    cv["int8_threshold_from_other_folds"] = {
        "folds": lofo, "mean_sd": {kk: summary([m[kk] for m in lofo]) for kk in METRIC_KEYS}}
    return cv


def quantization_out_of_fold(d: Data, p_oof_fp32, p_oof_int8, thr) -> dict:
    """FP32 vs INT8 of the fold members on their out-of-fold patients."""
    dev, y_dev = d.dev, d.labels[d.dev]
    return {
        "auc_drop_pooled": round(auc(y_dev, p_oof_fp32[dev]) - auc(y_dev, p_oof_int8[dev]), 4),
        "auc_drop_per_fold": [round(auc(d.labels[d.in_fold(k)], p_oof_fp32[d.in_fold(k)])
                                    - auc(d.labels[d.in_fold(k)], p_oof_int8[d.in_fold(k)]), 4) for k in range(K_FOLDS)],
        "label_agreement_at_threshold": round(float(((p_oof_fp32[dev] >= thr) == (p_oof_int8[dev] >= thr)).mean()), 4),
        "mean_abs_probability_diff": round(float(np.abs(p_oof_fp32[dev] - p_oof_int8[dev]).mean()), 4),
        "max_abs_probability_diff": round(float(np.abs(p_oof_fp32[dev] - p_oof_int8[dev]).max()), 4),
    }


def build_shipped(d: Data, members, tta, out: Path, work: Path, core, cal_rng, thr, seed) -> dict:
    """The shipped model: the fold members in one graph -> work/model.pt, model.fp32.onnx, NNCF INT8 IR; then its
    checks (reserved patients, in-sample FP32 vs INT8, non-tissue probes, ONNX Runtime and torch vs OpenVINO).
    Returns the checks as manifest["metrics"] entries."""
    import onnxruntime as ort
    import openvino as ov
    import torch

    _, Shipped = _classes()
    images, labels, patients, dev, res = d.images, d.labels, d.patients, d.dev, d.res
    shipped = Shipped(members, tta).eval()
    torch.save({"model": shipped.state_dict(), "tta": tta, "mean": d.mean, "std": d.std}, work / "model.pt")
    onnx_path = out / "model.fp32.onnx"
    export_onnx(shipped, onnx_path, images[:2])
    dev_idx = np.flatnonzero(dev)
    cal = images[np.sort(cal_rng.choice(dev_idx, size=N_CALIBRATION, replace=False))]
    q = quantize_int8(onnx_path, cal)
    xml_path, bin_path = out / "model.int8.xml", out / "model.int8.bin"
    ov.save_model(q, str(xml_path))
    log(f"shipped: {onnx_path.stat().st_size} B onnx, {xml_path.stat().st_size}+{bin_path.stat().st_size} B INT8 IR")
    fp32_c = core.compile_model(core.read_model(str(onnx_path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    int8_c = core.compile_model(core.read_model(str(xml_path)), "CPU")
    s_fp32, s_int8 = ov_predict(fp32_c, images), ov_predict(int8_c, images)
    for name, p in (("fp32", s_fp32), ("int8", s_int8)):
        assert np.isfinite(p).all() and p.min() >= 0 and p.max() <= 1, name
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    p_ort = np.concatenate([sess.run(["probability"], {"image": images[res][i:i + 256]})[0][:, 0]
                            for i in range(0, int(res.sum()), 256)])
    p_torch = torch_predict(shipped, images[res])

    reserved = {}
    for name, p in (("fp32", s_fp32[res]), ("int8", s_int8[res])):
        reserved[name] = binary_metrics(labels[res], p, thr, len(RESERVED))
    reserved["agreement"] = round(float(((s_fp32[res] >= thr) == (s_int8[res] >= thr)).mean()), 4)
    reserved["auc_drop"] = round(reserved["fp32"]["auc"] - reserved["int8"]["auc"], 4)
    reserved["per_patient"] = {}
    for pid in RESERVED:
        sel = patients[res] == pid
        reserved["per_patient"][str(pid)] = {
            "patches": int(sel.sum()), "idc_patches": int(labels[res][sel].sum()),
            "top15_mean_fp32": round(float(np.sort(s_fp32[res][sel])[-TOP_K:].mean()), 4),
            "top15_mean_int8": round(float(np.sort(s_int8[res][sel])[-TOP_K:].mean()), 4),
            "auc_int8": round(auc(labels[res][sel], s_int8[res][sel]), 4)}
    shipped_in_sample = {
        "note": "all 21,904 development patches; every one was in the training set of 2 of the 3 members, so these "
                "are NOT generalisation numbers, only an FP32-vs-INT8 consistency check of the shipped graph",
        "auc_fp32": round(auc(labels[dev], s_fp32[dev]), 4), "auc_int8": round(auc(labels[dev], s_int8[dev]), 4),
        "label_agreement_at_threshold": round(float(((s_fp32[dev] >= thr) == (s_int8[dev] >= thr)).mean()), 4),
    }
    shipped_in_sample["note"] = shipped_in_sample["note"].replace("21,904", f"{int(dev.sum()):,}")
    # non-tissue probes (known issue of 0.1.0: INT8 gave high scores to black / noise)
    rng = np.random.default_rng(seed)
    probes = {"black": np.zeros((1, PATCH, PATCH, 3), np.uint8), "white": np.full((1, PATCH, PATCH, 3), 255, np.uint8),
              "grey128": np.full((1, PATCH, PATCH, 3), 128, np.uint8),
              "uniform_noise": rng.integers(0, 256, (8, PATCH, PATCH, 3), dtype=np.uint8),
              "pink_eosin_flat": np.tile(np.array([230, 150, 200], np.uint8), (1, PATCH, PATCH, 1)),
              "purple_haematoxylin_flat": np.tile(np.array([90, 50, 140], np.uint8), (1, PATCH, PATCH, 1))}
    non_tissue = {n: {"fp32": round(float(ov_predict(fp32_c, x).mean()), 4),
                      "int8": round(float(ov_predict(int8_c, x).mean()), 4)} for n, x in probes.items()}
    log(f"reserved patients: fp32 {reserved['fp32']['auc']} int8 {reserved['int8']['auc']} agreement "
        f"{reserved['agreement']}; non-tissue {non_tissue}")
    return {
        "shipped_reserved_patients": reserved,
        "shipped_in_sample_consistency": shipped_in_sample,
        "non_tissue_probes_mean_probability": non_tissue,
        "max_abs_probability_diff_onnxruntime_vs_openvino_fp32": float(f"{np.abs(p_ort - s_fp32[res]).max():.2e}"),
        "max_abs_probability_diff_torch_vs_onnxruntime": float(f"{np.abs(p_torch - p_ort).max():.2e}"),
    }


def write_split(out: Path, d: Data, seed: int):
    """split.json: the folds, the reserved patients and the counts per fold."""
    split = {
        "seed": seed, "k": K_FOLDS,
        "method": "reserved patients left out; the rest grouped complete-slide vs sparse, sorted by IDC fraction, "
                  f"cut into blocks of {K_FOLDS}, each block dealt to the {K_FOLDS} folds in random order "
                  "(random.Random(seed))",
        "reserved": {"patients": list(RESERVED), "why": "10253 = bundled demo case, 9267/10269/12826 = "
                     "tests/fixtures/idc; never trained on, so demo and tests run on unseen patients"},
        "folds": d.folds,
        "counts": {str(k): {"patients": len(d.folds[k]), "complete_slides": sum(d.complete[p] for p in d.folds[k]),
                            "patches": int(d.in_fold(k).sum()), "idc_patches": int(d.labels[d.in_fold(k)].sum())}
                   for k in range(K_FOLDS)},
    }
    split["counts"]["reserved"] = {"patients": len(RESERVED), "patches": int(d.res.sum()),
                                   "idc_patches": int(d.labels[d.res].sum())}
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n")


def training_record(args, d: Data, command_line, *, tta, auc0, auc8, n_params, train_secs, histories, wall, reused,
                    versions):
    """manifest["training"]: how this build was made (recipe, seed, timings, library versions)."""
    return {
        "seed": args.seed,
        "epochs": args.epochs,
        "folds": K_FOLDS,
        "architecture": ARCHITECTURE,
        "shipped_graph": f"mean probability of the {K_FOLDS} fold models"
                         + (", each averaged over the 8 flips/90-degree rotations (TTA in graph)" if tta else ""),
        "tta": tta,
        "tta_rule": (f"TTA kept if it raises pooled OOF AUC (OpenVINO FP32) by >= {TTA_MIN_GAIN}: "
                     f"{auc0:.4f} -> {auc8:.4f}") if args.tta == "auto" else
                    (f"TTA {args.tta} (--tta {args.tta}; the default is off: 8x the inference against a speed budget "
                     f"of 1.3x); measured out of fold, pooled AUC {auc0:.4f} without, {auc8:.4f} with"),
        "parameters_per_member": n_params,
        "parameters_total": n_params * K_FOLDS,
        "development_patients": len(d.fold_of),
        "development_patches": int(d.dev.sum()),
        "reserved_patients": list(RESERVED),
        "data": "IDC breast histopathology (Kaggle 'Breast Histopathology Images', CC0 per Kaggle), training/dev "
                "portion: 222 patients, 25,200 patches (see the data set's PROVENANCE.md); the 57 held-out "
                "patients were not used",
        "command": "make model",
        "script": "models/tools/build_idc_model.py",
        "invocation": command_line,
        "loss": "BCEWithLogits with pos_weight = n_neg/n_pos of each member's training patches (class imbalance)",
        "optimizer": f"AdamW wd={WEIGHT_DECAY}, OneCycle max_lr={MAX_LR} (20% warm-up), batch {BATCH_SIZE}, "
                     f"bf16 autocast on CPU, EMA weights (decay {EMA_DECAY}) exported, no early stopping",
        "augmentation": AUGMENTATIONS[args.aug],
        "quantization": f"NNCF {versions['nncf']} post-training quantization of the OpenVINO IR, "
                        f"{N_CALIBRATION} calibration patches drawn from training patients",
        "train_seconds_per_fold": [round(s, 1) for s in train_secs],
        "wall_seconds": round(wall, 1) if not reused else round(reused["wall_seconds"] + (
            0 if reused.get("complete_build") else wall), 1),
        "wall_seconds_note": "one full `make model` run on 2 cores" if not reused else
        f"training {reused['wall_seconds'] / 60:.1f} min (a build stopped after training) plus the steps after "
        f"training re-run with --reuse-members in {wall / 60:.1f} min" if not reused.get("complete_build") else
        f"from the full build whose members were reused (its wall time, measured with /usr/bin/time: "
        f"{reused['wall_seconds'] / 60:.1f} min); the post-training steps were then re-run with --reuse-members "
        f"in {wall / 60:.1f} min",
        "history": histories,
        "versions": versions,
    }


def manifest_header(d: Data, thr, decision, stain_ref, stain_angles, region_thr, stain_limit) -> dict:
    """The manifest up to "sha256" (the runtime contract, thresholds, stain reference); write_card fills sha256."""
    return {
        "schema_version": 1,
        "name": "idc-resnet",
        "version": VERSION,
        "task": "patch-classification",
        "labels": ["non-idc", "idc"],
        "input": {"name": "image", "width": PATCH, "height": PATCH, "channels": 3, "layout": "NHWC",
                  "dtype": "uint8", "color": "RGB", "microns_per_pixel": 4.0, "pad_value": PAD_VALUE,
                  "normalisation": "in-graph: float(x)/255, then (x-mean)/std per channel",
                  "mean": d.mean, "std": d.std},
        "output": {"name": "probability", "kind": "sigmoid-probability-of-positive"},
        "patch": {"size": PATCH, "stride": PATCH, "min_tissue_fraction": 0.25},
        "decision": {"patch_threshold": thr, "top_k": decision["top_k"], "case_threshold": decision["case_threshold"],
                     "case_rule": decision["case_rule"], "region_threshold": region_thr, "min_patches": MIN_PATCHES,
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
