"""Recipe ablations: short runs of recipe variants on the same patient folds (--ablation), the shipped recipe's
row, and models/tools/ablations.json that gathers them for the model card."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .card import ABLATIONS_FILE
from .dataset import Data
from .export import ov_fp32_predict
from .log import log
from .members import FoldMembers, member_seed
from .metrics import auc
from .network import _classes
from .split import K_FOLDS
from .stain import macenko_per_patient
from .training import ABLATION_VARIANTS, train_member


def run_ablation(args, d: Data, work: Path, command_line: str):
    """--ablation: train a recipe variant on the listed folds, write its OOF metrics and merge ablations.json."""
    _, Shipped = _classes()
    variant = ABLATION_VARIANTS[args.ablation]
    folds = [int(s) for s in args.folds.split(",")] if args.folds else list(range(K_FOLDS))
    images = d.images
    if variant.get("stain") == "macenko":
        images = macenko_per_patient(images, d.patients, d.dev)
    result = {"variant": args.ablation, "settings": variant, "epochs": args.epochs, "folds": {}}
    for k in folds:
        train, held = d.train_of(k), d.in_fold(k)
        model, _, seconds = train_member(images[train], d.labels[train], d.mean, d.std, epochs=args.epochs,
                                         seed=member_seed(args.seed, k, variant.get("seed_offset", 0)),
                                         aug=variant.get("aug", "hsv"), width_mult=variant.get("width_mult", 1.0),
                                         tag=f"[{args.ablation} fold {k}]")
        p_no_tta = ov_fp32_predict(Shipped([model], False), images[held], work / "abl.onnx", images[:2])
        p_tta = ov_fp32_predict(Shipped([model], True), images[held], work / "abl.onnx", images[:2])
        np.savez(work / f"ablation-{args.ablation}-fold{k}.npz", p0=p_no_tta, p8=p_tta, y=d.labels[held])
        result["folds"][k] = {"auc": round(auc(d.labels[held], p_no_tta), 4),
                              "auc_tta": round(auc(d.labels[held], p_tta), 4),
                              "train_seconds": round(seconds, 1),
                              "parameters": sum(p.numel() for p in model.parameters())}
        log(f"[{args.ablation}] fold {k}: {result['folds'][k]}")
    (work / f"ablation-{args.ablation}.json").write_text(json.dumps(result, indent=1) + "\n")
    collect_ablations(work, command_line)


def write_default_ablation(work: Path, d: Data, epochs: int, members: FoldMembers):
    """The shipped recipe's row of the ablation table (work/ablation-default.json)."""
    parameters = members.parameters_per_member
    (work / "ablation-default.json").write_text(json.dumps({
        "variant": "default", "settings": {}, "epochs": epochs,
        "folds": {k: {"auc": round(auc(d.labels[d.in_fold(k)], members.oof_fp32[d.in_fold(k)]), 4),
                      "auc_tta": round(auc(d.labels[d.in_fold(k)], members.oof_fp32_tta[d.in_fold(k)]), 4),
                      "train_seconds": round(members.train_seconds[k], 1), "parameters": parameters}
                  for k in range(K_FOLDS)}},
        indent=1) + "\n")


def collect_ablations(work: Path, command: str) -> dict:
    """Merge every ablation-*.json in work into models/tools/ablations.json (quoted by the model card)."""
    runs = {}
    for f in sorted(work.glob("ablation-*.json")):
        run = json.loads(f.read_text())
        runs[run["variant"]] = run
    merged = {"how": "short runs of recipe variants on the same patient folds (only the listed folds), each scored "
                     "on that fold's out-of-fold patients with OpenVINO FP32; produced by "
                     "`python models/tools/build_idc_model.py --data <data> --out <dir> --ablation <variant> "
                     "--folds <k> --epochs <n>`",
              "example_command": command, "variants": {k: ABLATION_VARIANTS[k] for k in runs}, "runs": runs}
    if "default" in runs and "seed2" in runs:
        ensemble = {}
        for k in runs["default"]["folds"]:
            if k not in runs["seed2"]["folds"]:
                continue
            a = np.load(work / f"ablation-default-fold{k}.npz")
            b = np.load(work / f"ablation-seed2-fold{k}.npz")
            y = a["y"]
            ensemble[k] = {"auc_single_seed_mean": round((auc(y, a["p0"]) + auc(y, b["p0"])) / 2, 4),
                           "auc_two_seed_ensemble": round(auc(y, (a["p0"] + b["p0"]) / 2), 4),
                           "auc_single_seed_mean_tta": round((auc(y, a["p8"]) + auc(y, b["p8"])) / 2, 4),
                           "auc_two_seed_ensemble_tta": round(auc(y, (a["p8"] + b["p8"]) / 2), 4)}
        merged["ensemble_proxy_two_seeds"] = ensemble
    ABLATIONS_FILE.write_text(json.dumps(merged, indent=1) + "\n")
    return merged
