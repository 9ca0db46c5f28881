"""Synthetic sites for the site validation: virtual core biopsies cut from the bundled demo slide (IDC patient
10253, never trained on: models/idc-resnet/split.json), each written as a tile folder a lab would hand to
`appliance site validate`, with its label from the patches' own labels (tests/fixtures/site).

The cores are cut as the model build cuts them (idc_build.cores: strips 1 mm wide, four directions, a core
positive when it holds an IDC patch, negative when neither it nor a one-cell margin does), at every offset of
the strips' edges, so one slide gives the hundred-odd distinct, overlapping cores a site needs. A site's
"lab shift" is a scanner of another resolution (``write_site(scale=...)``) or a transform of every tile's
pixels.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import tifffile
from PIL import Image

from idc_build.cores import DIRECTIONS, cut_cores

ROOT = Path(__file__).resolve().parents[1]
SLIDE = ROOT / "appliance" / "offline" / "demo_case" / "idc-10253.tif"
LABELS = ROOT / "tests" / "fixtures" / "site" / "idc-10253-labels.csv"
CELL = 50

Transform = Callable[[np.ndarray], np.ndarray]  # a tile's pixels as another lab would have them


def load_slide() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The demo slide's pixels and its patches' x, y (pixels) and labels."""
    pixels = tifffile.imread(SLIDE)
    with open(LABELS, newline="") as f:
        rows = list(csv.DictReader(f))
    xs, ys, labels = (np.array([int(r[k]) for r in rows]) for k in ("x", "y", "label"))
    return pixels, xs, ys, labels


def virtual_cores(xs: np.ndarray, ys: np.ndarray, labels: np.ndarray) -> list[tuple[str, np.ndarray, int]]:
    """(name, patch indexes, label) of every distinct core of the slide, in a fixed order."""
    seen, out = set(), []
    gx, gy = xs // CELL, ys // CELL
    for direction in DIRECTIONS:
        for offset in range(7):
            cores, _ = cut_cores(10253, np.arange(len(xs)), gx, gy, labels, directions=(direction,), offset=offset)
            for c in cores:
                key = tuple(sorted(c.idx.tolist()))
                if key not in seen:
                    seen.add(key)
                    out.append((f"{direction[0]}{offset}b{c.band}", c.idx, c.label))
    return out


def write_cases(path: Path, rows: list[dict]) -> Path:
    """A site's case list: path, label (malignant/benign), specimen."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "specimen"])
        w.writeheader()
        w.writerows(rows)
    return path


def write_site(root: Path, cores, slide: tuple, transform: Transform | None = None, prefix: str = "core",
               scale: float = 1.0) -> Path:
    """Each core as a tile folder ``root/<prefix>-<name>/`` of its patches (PNG, named ..._x<X>_y<Y>.png), and
    ``root/cases.csv`` (path, label, specimen); returns the CSV's path. ``transform`` changes every tile's
    pixels; ``scale`` != 1 resamples the core as a scanner of another resolution would have imaged it (the
    core's region enlarged or shrunk, bicubic, and cut again into 50 px tiles), labelled as before."""
    pixels, xs, ys, _ = slide
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, idx, label in cores:
        folder = root / f"{prefix}-{name}"
        folder.mkdir(exist_ok=True)
        for x, y, tile in _core_tiles(pixels, xs[idx], ys[idx], scale):
            if transform is not None:
                tile = transform(tile)
            Image.fromarray(tile).save(folder / f"{prefix}_x{x}_y{y}.png", compress_level=1)
        rows.append({"path": folder.name, "label": "malignant" if label else "benign", "specimen": f"S-{name}"})
    return write_cases(root / "cases.csv", rows)


def _core_tiles(pixels: np.ndarray, xs: np.ndarray, ys: np.ndarray, scale: float):
    """(x, y, tile) of a core's patches; rescaled: the core's patches on white glass, resampled as a whole,
    and the 50 px tiles of it that hold any of the core."""
    if scale == 1.0:
        for x, y in zip(xs.tolist(), ys.tolist()):
            yield x, y, pixels[y : y + CELL, x : x + CELL]
        return
    x0, y0 = int(xs.min()), int(ys.min())
    w, h = int(xs.max()) - x0 + CELL, int(ys.max()) - y0 + CELL
    canvas = np.full((h, w, 3), 255, np.uint8)
    inside = np.zeros((h, w), bool)
    for x, y in zip(xs.tolist(), ys.tolist()):
        canvas[y - y0 : y - y0 + CELL, x - x0 : x - x0 + CELL] = pixels[y : y + CELL, x : x + CELL]
        inside[y - y0 : y - y0 + CELL, x - x0 : x - x0 + CELL] = True
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    big = np.asarray(Image.fromarray(canvas).resize(size, Image.BICUBIC))
    mask = np.asarray(Image.fromarray(inside).resize(size, Image.NEAREST))
    ox, oy = round(x0 * scale) // CELL * CELL, round(y0 * scale) // CELL * CELL
    for ty in range(0, size[1], CELL):
        for tx in range(0, size[0], CELL):
            if mask[ty : ty + CELL, tx : tx + CELL].any():
                tile = np.full((CELL, CELL, 3), 255, np.uint8)
                part = big[ty : ty + CELL, tx : tx + CELL]
                tile[: part.shape[0], : part.shape[1]] = part
                yield ox + tx, oy + ty, tile


# ------------------------------------------------------------------------------ a site of many patients
DEV_DATA_CANDIDATES = (ROOT.parent / "shared" / "data" / "idc_breast_histopathology",
                       Path("/work/shared/data/idc_breast_histopathology"))


def dev_data() -> Path | None:
    """The development data (the IDC dataset the model was built from), where this machine has it."""
    env = os.environ.get("APPLIANCE_DEV_DATA")
    for p in ([Path(env)] if env else []) + list(DEV_DATA_CANDIDATES):
        if (p / "manifest.csv").is_file():
            return p
    return None


def dev_site(root: Path, data: Path, per_label: int = 60, seed: int = 2026) -> Path:
    """A site like the model card's: ``per_label`` positive and negative virtual cores drawn (seeded) from
    every complete development slide, as the build cuts them (offset 0), each a tile folder of the dataset's
    own patch files (hard links, else copies: the bytes are the dataset's). The shipped model was trained on
    these patients, so its figures here lean optimistic; the card's are out of fold."""
    with open(data / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["complete_patient"] in ("1", "true", "True")]
    reserved = {str(p) for p in json.loads((ROOT / "models" / "idc-resnet" / "split.json").read_text())
                ["reserved"]["patients"]}
    by_patient: dict[str, list[dict]] = {}
    for r in rows:
        if r["patient_id"] not in reserved:
            by_patient.setdefault(r["patient_id"], []).append(r)
    cores = []
    for pid in sorted(by_patient):
        pr = by_patient[pid]
        xs, ys = np.array([int(r["x"]) for r in pr]), np.array([int(r["y"]) for r in pr])
        labels = np.array([int(r["label"]) for r in pr])
        found, _ = cut_cores(int(pid), np.arange(len(pr)), xs // CELL, ys // CELL, labels)
        cores += [(c.name, [pr[i] for i in c.idx.tolist()], c.label) for c in found]
    rng = np.random.default_rng(seed)
    chosen = []
    for label in (1, 0):
        pool = [c for c in cores if c[2] == label]
        chosen += [pool[i] for i in sorted(rng.choice(len(pool), per_label, replace=False).tolist())]
    chosen = [chosen[i] for i in rng.permutation(len(chosen)).tolist()]  # the labels mixed, as a lab's cases come
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for name, patches, label in chosen:
        folder = root / f"dev-{name}"
        folder.mkdir(exist_ok=True)
        for r in patches:
            src = data / r["relpath"]
            try:
                os.link(src, folder / src.name)
            except OSError:
                shutil.copyfile(src, folder / src.name)
        out.append({"path": folder.name, "label": "malignant" if label else "benign", "specimen": name})
    return write_cases(root / "cases.csv", out)
