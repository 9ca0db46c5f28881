"""Patient-level k-fold split (stratified by IDC fraction, reserved patients left out)."""
from __future__ import annotations

import random

from .data import RESERVED

K_FOLDS = 3


def fold_split(labels, patients, complete, seed: int, k: int = K_FOLDS):
    """Deterministic patient-level k-fold assignment, stratified by IDC fraction.

    Reserved patients (demo case + test fixtures) are left out of every fold. The others are grouped into
    complete-slide and sparse-sample patients (complete slides carry most patches); within each group they
    are sorted by IDC-patch fraction (ties by id) and cut into consecutive blocks of k, and each block's
    patients are dealt to the k folds in a random order (random.Random(seed)), so every fold gets the same
    spread of IDC fractions and its share of complete slides.
    """
    rng = random.Random(seed)
    pids = sorted(set(patients.tolist()) - set(RESERVED))
    frac = {p: float(labels[patients == p].mean()) for p in pids}
    fold_of = {}
    offset = 0
    for group_complete in (True, False):
        group = sorted((p for p in pids if complete[p] == group_complete), key=lambda p: (frac[p], p))
        for b in range(0, len(group), k):
            block = group[b:b + k]
            order = [(offset + i) % k for i in range(k)]
            rng.shuffle(order)
            for p, f in zip(block, order):
                fold_of[p] = f
            offset += len(block)  # a partial block does not always favour fold 0
    return fold_of, frac
