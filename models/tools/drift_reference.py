"""The drift watch's development reference, written into a built model's manifest (``drift``).

Every virtual core of the complete development slides (idc_build/cores.py, as the build cuts them) is run
through the appliance's own TriageSession with the built model, each patch a scanner tile at its position, as
a tile folder of the core would be. From each core: the stain's haematoxylin and eosin angles to the model's
reference, focus (median Laplacian variance), tissue area and any cannot-call reason, as the daemon records
them. The case score is the core's out-of-fold score under the shipped final rule (work/virtual_cores.csv, from
the fold member that never saw the patient), not the shipped model's in-sample one. The reference is each
measure's 5th/50th/95th percentiles and the cannot-call counts by reason (appliance.service.drift.reference_of).

Run after `make model` (the Makefile does):
    python models/tools/drift_reference.py --data ../shared/data/idc_breast_histopathology --model-dir models/idc-resnet
The model card gets its drift section; the model's sha256 (its weights' hash) does not change.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from appliance.model.engine import load_engine
from appliance.pipeline import TriageSession
from appliance.service.drift import reference_of
from appliance.site.stats import spread
from idc_build.card import write_card
from idc_build.cores import cut_all
from idc_build.data import load_coords, load_patches

CELL = 50


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model-dir", type=Path, required=True)
    args = ap.parse_args()
    t0 = time.time()
    images, labels, patients, complete, _ = load_patches(args.data)
    xs, ys = load_coords(args.data)
    split = json.loads((args.model_dir / "split.json").read_text())
    reserved = set(split["reserved"]["patients"])
    slides = sorted(int(p) for p in complete if complete[p] and int(p) not in reserved)
    cell_map = {}
    for p in slides:
        idx = np.flatnonzero(patients == p)
        cell_map[p] = (idx, xs[idx] // CELL, ys[idx] // CELL)
    cores, counts = cut_all(slides, cell_map, labels)
    oof = {}
    with open(args.model_dir / "work" / "virtual_cores.csv", newline="") as f:
        for row in csv.DictReader(f):
            oof[row["core"]] = float(row["top5"])
    engine = load_engine(args.model_dir, "openvino")
    rule = engine.manifest.decision
    if (rule.case_rule, rule.top_k) != ("top-k-mean", 5):
        raise SystemExit("the out-of-fold scores in virtual_cores.csv are read for the top-5 mean: update this tool")
    cases = []
    for n, core in enumerate(cores, 1):
        session = TriageSession(engine, batch_size=64)
        try:
            for i in core.idx.tolist():
                session.add_tile(int(xs[i]), int(ys[i]), images[i])
            result = session.finish()
        finally:
            session.close()
        cases.append({"verdict": result.verdict, "score": oof[core.name], "measures": result.measures,
                      "reasons": [{"code": r.code} for r in result.reasons]})
        if n % 100 == 0:
            print(f"{n}/{len(cores)} cores, {time.time() - t0:.0f} s", flush=True)
    reference = reference_of(cases, spread)
    reference["what"] = (f"{len(cores)} virtual cores of {len(slides)} complete development slides "
                         f"(idc_build/cores.py), run through the appliance's TriageSession with this model; case "
                         f"score = the core's out-of-fold score under the final rule (work/virtual_cores.csv)")
    path = args.model_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["drift"] = reference
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    write_card(args.model_dir)  # the card's drift section, and the card's new sha256 in the manifest
    print(json.dumps(reference, indent=1))
    print(f"wrote drift into {path} and MODEL_CARD.md in {time.time() - t0:.0f} s ({counts['cores']} cores)")


if __name__ == "__main__":
    main()
