"""The fold members: training them (or loading a previous build's), their record, and their out-of-fold
probabilities in FP32 (without and with TTA) and INT8."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dataset import Data
from .errors import BuildInputError
from .export import N_CALIBRATION, ov_fp32_predict, ov_predict, quantize_int8
from .log import log
from .metrics import auc
from .network import TTA_MIN_GAIN, _classes, build_model
from .split import K_FOLDS
from .training import AUGMENTATIONS, train_member


@dataclass(frozen=True)
class FoldMembers:
    """One member per fold, trained on the development patients of the other folds, with its record and its
    out-of-fold probabilities (OpenVINO FP32 of its exported graph; NaN for the reserved patches)."""
    models: list
    histories: list  # per member: one dict per epoch
    train_seconds: list  # per member
    reused: dict | None  # with --reuse-members: the training record of the build the members come from
    oof_fp32: np.ndarray  # no TTA
    oof_fp32_tta: np.ndarray  # with the 8 flips/rotations averaged in the graph

    @property
    def parameters_per_member(self) -> int:
        return sum(p.numel() for p in self.models[0].parameters())


@dataclass(frozen=True)
class TtaChoice:
    """Whether the shipped graph averages over the 8 flips/rotations (TTA), and the pooled out-of-fold AUCs of
    the members (OpenVINO FP32) it is decided on."""
    mode: str  # --tta: auto, on or off
    auc_without: float
    auc_with: float

    @property
    def on(self) -> bool:
        return {"auto": self.auc_with - self.auc_without >= TTA_MIN_GAIN, "on": True, "off": False}[self.mode]


@dataclass(frozen=True)
class OutOfFold:
    """Out-of-fold probabilities, one per patch (NaN for the reserved patches): every development patch scored by
    the fold member that did not train on its patient. What the build's later steps are chosen and measured on."""
    fp32: np.ndarray  # OpenVINO FP32, no TTA
    fp32_tta: np.ndarray  # OpenVINO FP32, 8-way TTA
    int8: np.ndarray  # OpenVINO INT8 of the member's graph as shipped (with TTA if tta): what the appliance runs
    tta: bool  # whether the shipped graph has TTA

    @property
    def fp32_shipped(self) -> np.ndarray:
        """FP32 of the member's graph as shipped (with TTA if tta)."""
        return self.fp32_tta if self.tta else self.fp32


def member_seed(seed, k, offset=0):
    return seed + 1000 * k + 7919 * offset


def train_fold_members(args, d: Data, work: Path, stain_he) -> FoldMembers:
    """Train (or, with --reuse-members, load) one member per fold and score its own fold through OpenVINO FP32,
    without and with TTA (work/fold<k>.notta.onnx, fold<k>.tta.onnx, ablation-default-fold<k>.npz)."""
    import torch

    _, Shipped = _classes()
    models, histories, train_seconds = [], [], []
    oof_fp32 = np.full(len(d.images), np.nan)
    oof_fp32_tta = np.full(len(d.images), np.nan)
    reused = None
    if args.reuse_members:
        checkpoint = torch.load(args.reuse_members, map_location="cpu")
        if checkpoint["mean"] != d.mean or checkpoint["std"] != d.std:
            raise BuildInputError(f"--reuse-members {args.reuse_members}: its members were trained on other data "
                                  f"(channel mean {checkpoint['mean']}, std {checkpoint['std']}; this data's mean "
                                  f"{d.mean}, std {d.std})")
        reused = reused_record(args.reuse_members)
        if reused["seed"] != args.seed or reused["epochs"] != args.epochs:
            raise BuildInputError(f"--reuse-members {args.reuse_members}: its members were trained with seed "
                                  f"{reused['seed']} for {reused['epochs']} epochs; this build asks for seed "
                                  f"{args.seed} and {args.epochs} epochs")
        if reused.get("augmentation", AUGMENTATIONS["hsv"]) != AUGMENTATIONS[args.aug]:
            raise BuildInputError(f"--reuse-members {args.reuse_members}: its members were trained with another "
                                  f"augmentation than --aug {args.aug}")
        shipped_before = build_model(d.mean, d.std)
        shipped_before.load_state_dict(checkpoint["model"])
    for k in range(K_FOLDS):
        train, held = d.train_of(k), d.in_fold(k)
        if reused:
            model, history, seconds = (shipped_before.members[k].eval(), reused["history"][k],
                                       reused["train_seconds_per_fold"][k])
        else:
            model, history, seconds = train_member(d.images[train], d.labels[train], d.mean, d.std,
                                                   epochs=args.epochs, seed=member_seed(args.seed, k), aug=args.aug,
                                                   stain_he=stain_he, tag=f"[fold {k}]")
        models.append(model)
        histories.append(history)
        train_seconds.append(seconds)
        oof_fp32[held] = ov_fp32_predict(Shipped([model], False), d.images[held], work / f"fold{k}.notta.onnx",
                                         d.images[:2])
        oof_fp32_tta[held] = ov_fp32_predict(Shipped([model], True), d.images[held], work / f"fold{k}.tta.onnx",
                                             d.images[:2])
        np.savez(work / f"ablation-default-fold{k}.npz", p0=oof_fp32[held], p8=oof_fp32_tta[held], y=d.labels[held])
        log(f"fold {k}: OOF AUC {auc(d.labels[held], oof_fp32[held]):.4f}, "
            f"with TTA {auc(d.labels[held], oof_fp32_tta[held]):.4f}")
    return FoldMembers(models, histories, train_seconds, reused, oof_fp32, oof_fp32_tta)


def save_members(work: Path, members: FoldMembers, d: Data, args, wall_seconds: float):
    """work/members.pt (the fold members, loadable with --reuse-members) and work/training.json (their record)."""
    import torch

    _, Shipped = _classes()
    torch.save({"model": Shipped(members.models, False).state_dict(), "mean": d.mean, "std": d.std},
               work / "members.pt")
    (work / "training.json").write_text(json.dumps({
        "seed": args.seed, "epochs": args.epochs, "augmentation": AUGMENTATIONS[args.aug],
        "history": members.histories, "train_seconds_per_fold": members.train_seconds, "wall_seconds": wall_seconds,
        "complete_build": False}, indent=1) + "\n")


def reused_record(path: Path) -> dict:
    """The training record of the build whose members --reuse-members loads: its manifest when that build
    finished (wall = the whole build), else its work/training.json (wall = up to the end of training)."""
    manifest = path.parent.parent / "manifest.json"
    if manifest.exists():
        return json.loads(manifest.read_text())["training"] | {"complete_build": True}
    return json.loads((path.parent / "training.json").read_text())


def fold_members_int8(d: Data, work: Path, core, calibration_rng, *, tta: bool, fp32_shipped) -> np.ndarray:
    """Each fold member alone: its exported graph (with TTA if tta) quantized by NNCF (calibration from its own
    training patients), saved as work/fold<k>.int8.xml, and scored in OpenVINO INT8 on its out-of-fold patients.
    Returns the out-of-fold INT8 probabilities; fp32_shipped (the FP32 ones of the same graph) is logged beside
    them."""
    import openvino as ov

    oof_int8 = np.full(len(d.images), np.nan)
    for k in range(K_FOLDS):
        train_idx, held = np.flatnonzero(d.train_of(k)), d.in_fold(k)
        path = work / f"fold{k}.{'tta' if tta else 'notta'}.onnx"
        calibration = d.images[np.sort(calibration_rng.choice(train_idx, size=N_CALIBRATION, replace=False))]
        quantized = quantize_int8(path, calibration)
        ov.save_model(quantized, str(work / f"fold{k}.int8.xml"))  # the stain curves and lab shifts score with these
        compiled = core.compile_model(quantized, "CPU")
        oof_int8[held] = ov_predict(compiled, d.images[held])
        log(f"fold {k}: OpenVINO FP32 AUC {auc(d.labels[held], fp32_shipped[held]):.4f}, "
            f"INT8 AUC {auc(d.labels[held], oof_int8[held]):.4f}")
    return oof_int8
