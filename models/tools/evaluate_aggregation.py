"""Evaluate the case-level aggregation and the heatmap on patients the scoring model never saw.

Uses the out-of-fold patch probabilities of the last `make model` (models/idc-resnet/work/
ablation-default-fold<k>.npz: each fold's member scored on its own unseen patients, no TTA, OpenVINO FP32),
so every number is on unseen patients. Two measures, as in issue 5:

* slide Dice, on the complete-slide patients: the heatmap on the 50-px patch grid (stride 50, so overlap
  averaging is the identity here) thresholded at the manifest's patch threshold, against the class-1 patches;
* bag AUC: each patient's patches as one bag (positive if it holds IDC) against the same patient with its
  IDC patches removed (negative), plus patients without IDC as negative bags; the bag score is the MIL rule.

Variants measured: k = 15 (shipped), k relative to the bag size, and a minimum connected region (cells of
a region smaller than m patches are ignored; complete slides only, where patches have neighbours).

    python models/tools/evaluate_aggregation.py --data ../shared/data/idc_breast_histopathology \
        [--model models/idc-resnet] [--json models/tools/aggregation.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from appliance.metrics import roc_auc  # noqa: E402
from appliance.pipeline.heatmap import label_components  # noqa: E402


def load(data: Path, model: Path):
    rows = sorted(csv.DictReader(open(data / "manifest.csv", newline="")), key=lambda r: r["relpath"])
    split = json.loads((model / "split.json").read_text())
    fold_of = {int(p): k for k, ps in enumerate(split["folds"]) for p in ps}
    pid = np.array([int(r["patient_id"]) for r in rows])
    fold = np.array([fold_of.get(int(p), -1) for p in pid])
    x = np.array([int(r["x"]) for r in rows])
    y = np.array([int(r["y"]) for r in rows])
    lab = np.array([int(r["label"]) for r in rows])
    complete = {int(r["patient_id"]) for r in rows if r["complete_patient"] in ("1", "true", "True")}
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
    return pid, fold, x, y, lab, prob, complete


def top_k_mean(p: np.ndarray, k: int) -> float:
    k = max(1, min(k, len(p)))
    return float(np.sort(p)[-k:].mean())


def region_filter(xs, ys, p, thr: float, min_cells: int) -> np.ndarray:
    """Probabilities with hot cells of regions smaller than min_cells set to 0 (complete slides)."""
    if min_cells <= 1:
        return p
    gx, gy = (xs - xs.min()) // 50, (ys - ys.min()) // 50
    hot = np.zeros((gy.max() + 1, gx.max() + 1), bool)
    hot[gy, gx] = p >= thr
    labels, n = label_components(hot)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes[labels[gy, gx]] >= min_cells
    return np.where((p < thr) | keep, p, 0.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "idc-resnet")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    manifest = json.loads((args.model / "manifest.json").read_text())
    thr = manifest["decision"]["patch_threshold"]
    pid, fold, xs, ys, lab, prob, complete = load(args.data, args.model)
    dev = fold >= 0
    patients = sorted(set(pid[dev].tolist()))

    # ---- slide Dice on complete slides
    dice = {}
    for min_cells in (1, 2, 4, 8):
        per = {}
        for p in sorted(complete):
            m = (pid == p) & dev
            if not m.any() or lab[m].sum() == 0:
                continue
            q = region_filter(xs[m], ys[m], prob[m], thr, min_cells)
            pred, truth = q >= thr, lab[m] == 1
            per[p] = round(float(2 * (pred & truth).sum() / max(1, pred.sum() + truth.sum())), 4)
        dice[f"min_region_{min_cells}"] = {"mean": round(float(np.mean(list(per.values()))), 4), "per_slide": per}

    # ---- bag AUC
    def bags(score):
        s, yb = [], []
        for p in patients:
            m = (pid == p) & dev
            pos = lab[m] == 1
            s.append(score(m, np.ones(m.sum(), bool)))
            yb.append(int(pos.any()))
            if pos.any() and (~pos).any():
                s.append(score(m, ~pos))
                yb.append(0)
        return np.array(yb), np.array(s)

    variants = {"top-15 (shipped)": lambda m, keep: top_k_mean(prob[m][keep], 15)}
    for f in (0.02, 0.05, 0.1, 0.2):
        variants[f"top-{f:.0%} of bag"] = lambda m, keep, f=f: top_k_mean(prob[m][keep], round(f * keep.sum()))
    variants["max"] = lambda m, keep: top_k_mean(prob[m][keep], 1)
    variants["mean"] = lambda m, keep: float(prob[m][keep].mean())
    bag = {}
    for name, fn in variants.items():
        yb, sb = bags(fn)
        bag[name] = {"auc": round(roc_auc(yb, sb), 4), "bags": int(len(yb)), "positive": int(yb.sum())}
    # Bags from complete slides only (there regions exist); IDC removed leaves the slide's other tissue
    yc, sc = [], []
    for p in sorted(complete):
        m = (pid == p) & dev
        if not m.any():
            continue
        pos = lab[m] == 1
        for keep, yv in ((np.ones(m.sum(), bool), int(pos.any())), (~pos, 0)):
            if keep.any() and not (yv == 0 and pos.any() and keep.all()):
                q = region_filter(xs[m][keep], ys[m][keep], prob[m][keep], thr, 4)
                yc.append(yv)
                sc.append(top_k_mean(q, 15))
    bag["top-15, min region 4 (complete slides only)"] = {"auc": round(roc_auc(np.array(yc), np.array(sc)), 4),
                                                           "bags": len(yc), "positive": int(sum(yc))}

    res = {"how": "out-of-fold patch probabilities of the last make model (no TTA, OpenVINO FP32); development "
                  "patients only, each scored by the member that did not train on it",
           "patch_threshold": thr, "slide_dice": dice, "bag_auc": bag}
    print(f"slide Dice on {len(dice['min_region_1']['per_slide'])} complete slides with IDC (threshold {thr}):")
    for k, v in dice.items():
        print(f"  {k:<16} mean {v['mean']:.4f}")
    print("bag AUC (each patient with and without its IDC patches):")
    for k, v in bag.items():
        print(f"  {k:<44} {v['auc']:.4f}  ({v['bags']} bags, {v['positive']} positive)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
