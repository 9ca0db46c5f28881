"""Development patches: loading them, the reserved/held-out patients, colour features for the baseline."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

PATCH = 50
PAD_VALUE = 255
MICRONS_PER_PIXEL = 4.0  # approximate: 40x scans downsampled to about 2.5x (Janowczyk & Madabhushi 2016)
DEMO_PATIENT = 10253
FIXTURE_PATIENTS = (9267, 10269, 12826)  # tests/fixtures/idc
RESERVED = (DEMO_PATIENT,) + FIXTURE_PATIENTS  # never trained on: demo + tests stay unseen by the shipped model

# Held-out patients listed in the data set's PROVENANCE.md. They must never be trained or tuned on.
HELD_OUT = {
    8914, 8955, 8980, 9022, 9043, 9075, 9124, 9176, 9227, 9254, 9256, 9259, 9261, 9262, 9291, 9319, 9347,
    10254, 10255, 10257, 10260, 10261, 10272, 10274, 10275, 10277, 10299, 10300, 10301, 12242, 12810,
    12822, 12823, 12876, 12906, 12908, 12910, 12931, 13106, 13403, 13461, 13462, 13687, 13693, 14153,
    14156, 14188, 14210, 14213, 14306, 15471, 15514, 15902, 16014, 16167, 16551, 16555,
}


def load_patches(data_dir: Path):
    """Return images uint8 [N,50,50,3], labels int64 [N], patient ids int64 [N], complete flag per patient."""
    rows = list(csv.DictReader(open(data_dir / "manifest.csv", newline="")))
    rows.sort(key=lambda r: r["relpath"])
    n = len(rows)
    images = np.full((n, PATCH, PATCH, 3), PAD_VALUE, dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    patients = np.empty(n, dtype=np.int64)
    complete = {}
    n_padded = 0
    for i, r in enumerate(rows):
        pid, lab = int(r["patient_id"]), int(r["label"])
        if pid in HELD_OUT:
            raise SystemExit(f"held-out patient {pid} found in {data_dir}; refusing to train on it")
        rel = r["relpath"]
        if rel.split("/")[1] != str(lab) or not rel.endswith(f"_class{lab}.png"):
            raise SystemExit(f"label mismatch in manifest row {rel}")
        with Image.open(data_dir / rel) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.uint8)
        h, w = a.shape[:2]
        if h > PATCH or w > PATCH:
            raise SystemExit(f"patch larger than {PATCH}x{PATCH}: {rel}")
        if (h, w) != (PATCH, PATCH):
            n_padded += 1  # pad bottom/right with white glass, exactly like the runtime
        images[i, :h, :w] = a
        labels[i] = lab
        patients[i] = pid
        complete[pid] = r.get("complete_patient", "0") in ("1", "true", "True")
    return images, labels, patients, complete, n_padded


def rgb_to_hsv_np(x):
    """x float [..., 3] in [0,1] -> h, s, v in [0,1]."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc, minc = x.max(-1), x.min(-1)
    delta = maxc - minc
    s = np.where(maxc > 0, delta / np.maximum(maxc, 1e-8), 0.0)
    dc = np.maximum(delta, 1e-8)
    rc, gc, bc = (maxc - r) / dc, (maxc - g) / dc, (maxc - b) / dc
    h = np.where(maxc == r, bc - gc, np.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    return h, s, maxc


def colour_features(x_u8, bins: int = 16):
    """Per-patch colour descriptor: 16-bin histograms of R, G, B, H, S, V (fractions of pixels) plus the
    mean and sd of each of the six channels -> 108 features."""
    n = len(x_u8)
    feats = []
    for i in range(0, n, 2048):
        xb = x_u8[i:i + 2048].reshape(-1, PATCH * PATCH, 3).astype(np.float32) / 255.0
        h, s, v = rgb_to_hsv_np(xb)
        chans = np.stack([xb[..., 0], xb[..., 1], xb[..., 2], h, s, v], axis=1)  # [b, 6, P]
        q = np.minimum((chans * bins).astype(np.int64), bins - 1)
        m = len(xb)
        idx = (np.arange(m)[:, None, None] * 6 + np.arange(6)[None, :, None]) * bins + q
        hist = np.bincount(idx.ravel(), minlength=m * 6 * bins).reshape(m, 6 * bins) / (PATCH * PATCH)
        feats.append(np.concatenate([hist, chans.mean(2), chans.std(2)], axis=1))
    return np.concatenate(feats).astype(np.float32)


def load_coords(data_dir: Path):
    """x, y (pixels in the patient's slide) of every patch, in load_patches' order."""
    rows = sorted(csv.DictReader(open(data_dir / "manifest.csv", newline="")), key=lambda r: r["relpath"])
    return np.array([int(r["x"]) for r in rows]), np.array([int(r["y"]) for r in rows])
