"""The build's data set: every patch, its patient's fold (or reserved), and the development patches' channel
statistics."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import RESERVED, load_coords, load_patches
from .errors import BuildInputError
from .log import log
from .split import K_FOLDS, fold_split


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

    @property
    def n_patients(self) -> int:
        """Patients in the data, development and reserved."""
        return len(np.unique(self.patients))


def load_data(data_dir: Path, seed: int) -> Data:
    """Load every patch, deal the development patients into K_FOLDS folds and log the fold sizes."""
    log(f"loading patches from {data_dir}")
    images, labels, patients, complete, n_padded = load_patches(data_dir)
    all_pids = sorted(set(patients.tolist()))
    log(f"loaded {len(images)} patches, {len(all_pids)} patients, {n_padded} padded edge patches")
    missing = [p for p in RESERVED if p not in all_pids]
    if missing:
        raise BuildInputError(f"reserved patients missing from the data in {data_dir}: {missing} (the demo case "
                              f"and the test fixtures must be in it, so that they are kept out of training)")
    fold_of, _ = fold_split(labels, patients, complete, seed)
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
