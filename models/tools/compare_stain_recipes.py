"""Whether a stain-augmentation recipe is kept: two full builds on the same folds and seed (each with its shift
gates calibrated, models/tools/calibrate_gates.py), compared on what the issue of record asks: the out-of-fold
virtual-core figures must not fall (specificity at sensitivity >= 0.98, core AUC) and the tolerated turn must
grow (the turn where each shift's pooled out-of-fold AUC first falls by more than 0.02). Writes the JSON the
model card quotes (models/tools/stain_recipe_comparison.json).

    .venv-train/bin/python models/tools/compare_stain_recipes.py --base DIR --new DIR \
        --json models/tools/stain_recipe_comparison.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from idc_build.gates import TURNS, crossing_turn


def figures(model: Path) -> dict:
    """A build's out-of-fold figures; its shift curves from what calibrate_gates.py measured (work/gates.json)."""
    m = json.loads((model / "manifest.json").read_text())
    cores, gates = m["metrics"]["virtual_cores"], json.loads((model / "work" / "gates.json").read_text())
    return {"model": str(model), "version": m["version"], "augmentation": m["training"]["augmentation"],
            "pooled_oof_auc_fp32": m["metrics"]["tta_ablation"]["pooled_oof_auc_no_tta"],
            "virtual_core_auc": cores["final"]["auc"], "virtual_core_auc_ci95": cores["final"].get("auc_ci95"),
            "virtual_core_specificity": cores["shipped_call"]["specificity"],
            "virtual_core_specificity_ci95": cores["shipped_call"].get("specificity_ci95"),
            "virtual_core_sensitivity": cores["shipped_call"]["sensitivity"],
            "curves": gates["curves"],
            "tolerated_turn_deg": {s: crossing_turn(c) for s, c in gates["curves"].items()}, **gate_figures(m)}


def gate_figures(m: dict) -> dict:
    """The issue's three shift rules under a model's own calibrated gates (None: never calibrated), and the
    gates' limits."""
    return {"shift_rules": m["metrics"].get("shift_gates", {}).get("rules"),
            "stain_limit_deg": m["stain"].get("max_angle_deg"), "ood_max_score": m.get("ood", {}).get("max_score")}


def tolerated(turn) -> float:
    """A shift that never fell by more than 0.02 tolerated at least the largest turn measured."""
    return float(TURNS[-1]) if turn is None else float(turn)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="a build of the recipe in use (with its gates)")
    ap.add_argument("--new", type=Path, required=True, help="a build of the candidate recipe (with its gates)")
    ap.add_argument("--shipped", type=Path, default=None,
                    help="the committed model, whose virtual-core figures the issue of record also asks not to fall")
    ap.add_argument("--note", default="", help="what the model card should say besides the figures")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    a, b = (json.loads((m / "split.json").read_text())["folds"] for m in (args.base, args.new))
    if a != b:
        raise SystemExit("the two builds have different folds: not comparable")
    base, new = figures(args.base), figures(args.new)
    grows = {s: tolerated(new["tolerated_turn_deg"].get(s)) - tolerated(base["tolerated_turn_deg"][s])
             for s in base["tolerated_turn_deg"]}
    keep = {"virtual_core_specificity_not_lower": new["virtual_core_specificity"] >= base["virtual_core_specificity"],
            "virtual_core_auc_not_lower": new["virtual_core_auc"] >= base["virtual_core_auc"],
            "tolerated_turn_grows": sum(grows.values()) > 0 and min(grows.values()) >= 0}
    shipped = None
    if args.shipped:
        m = json.loads((args.shipped / "manifest.json").read_text())
        cores = m["metrics"]["virtual_cores"]
        shipped = {"model": f"{m['name']} {m['version']}", "virtual_core_auc": cores["final"]["auc"],
                   "virtual_core_specificity": cores["shipped_call"]["specificity"], **gate_figures(m)}
        keep["virtual_core_specificity_not_below_shipped"] = (new["virtual_core_specificity"]
                                                              >= shipped["virtual_core_specificity"])
        keep["virtual_core_auc_not_below_shipped"] = new["virtual_core_auc"] >= shipped["virtual_core_auc"]
    out = {"base": base, "new": new, "shipped": shipped, "tolerated_turn_change_deg": grows, "checks": keep,
           "kept": all(keep.values()), "note": args.note,
           "rule": "kept only if the out-of-fold virtual-core specificity (at the sensitivity-first threshold) and "
                   "core AUC do not fall, and the tolerated turn grows under some shift and falls under none"}
    print(f"{'':<46}{'base':>10}{'new':>10}")
    for k in ("pooled_oof_auc_fp32", "virtual_core_auc", "virtual_core_specificity", "virtual_core_sensitivity"):
        print(f"{k:<46}{base[k]:>10.4f}{new[k]:>10.4f}")
    if shipped:
        for k in ("virtual_core_auc", "virtual_core_specificity"):
            print(f"{k + ', shipped ' + shipped['model']:<46}{shipped[k]:>10.4f}")
    for s in grows:
        print(f"{'tolerated turn, ' + s:<46}{tolerated(base['tolerated_turn_deg'][s]):>10.1f}"
              f"{tolerated(new['tolerated_turn_deg'].get(s)):>10.1f}")
    print(f"kept: {out['kept']} {keep}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
