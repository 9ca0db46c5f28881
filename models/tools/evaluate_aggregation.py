"""Evaluate a build's first stage, its context stage and the case rules on patients the models never saw.

Reads the out-of-fold patch probabilities a `make model` build leaves in DIR/work/ablation-default-fold<k>.npz
(each fold's member on its own unseen patients, no TTA, OpenVINO FP32) and the build's split.json, so two
builds (an old recipe and a new one) are compared on the same patient folds. Reports:

* patch AUC of the first stage and of the context stage stacked out of fold (fitted per fold on the other
  folds' complete slides, or on all their patients), per fold, mean +- sd and pooled;
* region Dice on the complete slides: probability >= the best-balanced-accuracy threshold of the same
  out-of-fold probabilities, against the IDC patches;
* bag AUC of each case rule: every development patient as a bag (positive if it holds IDC), and each patient
  with IDC again with its IDC patches removed (negative).

Needs torch (the context stage is fitted here): run with the training environment.

    .venv-train/bin/python models/tools/evaluate_aggregation.py --data ../shared/data/idc_breast_histopathology \
        --model DIR [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

from idc_build.metrics import auc, best_balanced_accuracy_threshold, summary
from idc_build.stacking import bag_scores, patient_cells, rule_aucs, slide_dice, stack_out_of_fold


def load(data: Path, model: Path):
    rows = sorted(csv.DictReader(open(data / "manifest.csv", newline="")), key=lambda r: r["relpath"])
    split = json.loads((model / "split.json").read_text())
    fold_of = {int(p): k for k, ps in enumerate(split["folds"]) for p in ps}
    pid = np.array([int(r["patient_id"]) for r in rows])
    fold = np.array([fold_of.get(int(p), -1) for p in pid])
    x = np.array([int(r["x"]) for r in rows])
    y = np.array([int(r["y"]) for r in rows])
    lab = np.array([int(r["label"]) for r in rows])
    complete = {int(r["patient_id"]): r["complete_patient"] in ("1", "true", "True") for r in rows}
    prob = np.full(len(rows), np.nan)
    for k in range(len(split["folds"])):
        f = model / "work" / f"ablation-default-fold{k}.npz"
        if not f.exists():
            raise SystemExit(f"{f} missing: run `make model` first (its out-of-fold predictions are needed)")
        d = np.load(f)
        m = fold == k
        if not np.array_equal(d["y"], lab[m]):
            raise SystemExit(f"{f} does not match the data's fold {k} (another data set or split?)")
        prob[m] = d["p0"]
    dev = fold >= 0
    return pid[dev], fold[dev], x[dev], y[dev], lab[dev], prob[dev], complete, fold_of, len(split["folds"])


def patch_figures(lab, fold, prob, k_folds) -> dict:
    per = [round(auc(lab[fold == k], prob[fold == k]), 4) for k in range(k_folds)]
    return {"per_fold_auc": per, "auc_mean_sd": summary(per), "pooled_auc": round(auc(lab, prob), 4)}


def evaluate(data: Path, model: Path) -> dict:
    pid, fold, xs, ys, lab, prob, complete, fold_of, k_folds = load(data, model)
    cell_map = patient_cells(pid, xs, ys)
    slides = sorted(p for p in cell_map if complete[p])
    patients = sorted(cell_map)
    res = {"how": __doc__.split("\n\n")[1].replace("\n", " "), "model": str(model),
           "complete_slides": len(slides), "patients": len(patients)}
    thr1 = best_balanced_accuracy_threshold(lab, prob)
    res["first_stage"] = {**patch_figures(lab, fold, prob, k_folds), "threshold": thr1,
                          "dice": slide_dice(cell_map, prob, lab, thr1, slides)}
    best = None
    for train_on in ("complete", "all"):
        refined, params = stack_out_of_fold(cell_map, prob, lab, fold_of, complete, k_folds, train_on)
        thr2 = best_balanced_accuracy_threshold(lab, refined)
        res[f"context_{train_on}"] = {**patch_figures(lab, fold, refined, k_folds), "threshold": thr2,
                                      "dice": slide_dice(cell_map, refined, lab, thr2, slides)}
        if train_on == "complete":
            best = (params, thr2)
    params, thr2 = best
    yb, scores = bag_scores(cell_map, prob, lab, patients, fold_of, params, thr1, thr2)
    res["bags"] = {"count": int(len(yb)), "positive": int(yb.sum()), "auc": rule_aucs(yb, scores)}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "idc-resnet")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    res = evaluate(args.data, args.model)
    print(f"{res['patients']} development patients, {res['complete_slides']} complete slides")
    print(f"{'stage':<22}{'fold AUCs':<28}{'mean':>8}{'pooled':>8}{'Dice':>8}")
    for name in ("first_stage", "context_complete", "context_all"):
        r = res[name]
        print(f"{name:<22}{str(r['per_fold_auc']):<28}{r['auc_mean_sd']['mean']:>8.4f}{r['pooled_auc']:>8.4f}"
              f"{r['dice']['mean']:>8.4f}")
    print(f"bag AUC ({res['bags']['count']} bags, {res['bags']['positive']} positive):")
    for n, a in res["bags"]["auc"].items():
        print(f"  {n:<24}{a:.4f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
