"""The model card: MODEL_CARD.md rendered section by section from manifest.json, split.json and the ablation
and recipe-comparison files, and the manifest's sha256 of every file."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .card_context import comparison_section, context_section
from .card_performance import ablations_section, cross_validation_section, fp32_int8_section, targets_section
from .card_recipe import (build_section, data_section, folds_section, header_section, limitations_section,
                          recipe_section, thresholds_section)

ABLATIONS_FILE = Path(__file__).resolve().parents[1] / "ablations.json"
# the 0.3.0 recipe and this one on the same folds (models/tools/compare_recipes.py), quoted when present
COMPARISON_FILE = Path(__file__).resolve().parents[1] / "recipe_comparison.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_card(out: Path):
    """Render MODEL_CARD.md from manifest.json, split.json and models/tools/ablations.json, then (re)write the
    sha256 of every file into the manifest."""
    manifest = json.loads((out / "manifest.json").read_text())
    split = json.loads((out / "split.json").read_text())
    ablations = json.loads(ABLATIONS_FILE.read_text()) if ABLATIONS_FILE.exists() else None
    comparison = json.loads(COMPARISON_FILE.read_text()) if COMPARISON_FILE.exists() else None
    (out / "MODEL_CARD.md").write_text(model_card(manifest, split, ablations, comparison))
    files = [manifest["files"]["openvino"], manifest["files"]["openvino_weights"], manifest["files"]["onnx"],
             "split.json", "MODEL_CARD.md"]
    if manifest.get("context"):
        files += [manifest["context"]["openvino"], manifest["context"]["openvino_weights"],
                  manifest["context"]["onnx"]]
    if manifest.get("cam"):  # added by build_cam.py after the build
        files += [manifest["cam"]["onnx"], manifest["cam"]["openvino"], manifest["cam"]["openvino_weights"]]
    if manifest.get("ood"):  # added by calibrate_gates.py after the build
        files += [manifest["ood"]["file"]]
    manifest["sha256"] = {f: sha256(out / f) for f in files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def model_card(manifest: dict, split: dict, ablations, comparison=None) -> str:
    """MODEL_CARD.md: its sections in order. ablations: models/tools/ablations.json (None: not recorded);
    comparison: models/tools/recipe_comparison.json (None: no section)."""
    return "".join([
        header_section(manifest),
        recipe_section(manifest),
        data_section(manifest, split),
        folds_section(manifest, split),
        cross_validation_section(manifest),
        targets_section(manifest),
        context_section(manifest),
        comparison_section(comparison),
        ablations_section(manifest, ablations),
        fp32_int8_section(manifest),
        thresholds_section(manifest),
        build_section(manifest),
        limitations_section(manifest, split),
    ])
