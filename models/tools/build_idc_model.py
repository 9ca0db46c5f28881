#!/usr/bin/env python3
"""Build the IDC patch classifier (idc-resnet) end to end.

Loads the IDC breast histopathology patches, splits patients into train/validation
(stratified by IDC fraction, patient 10253 forced into validation), trains a compact
ResNet from scratch on CPU, exports ONNX FP32, converts to OpenVINO IR, quantizes to
INT8 with NNCF post-training quantization, evaluates both engines on every validation
patch, and writes manifest.json, MODEL_CARD.md and split.json.

Model I/O contract (the runtime depends on it):
  input  "image":       uint8 NHWC [N, 50, 50, 3] RGB, dynamic N; normalisation is in-graph
  output "probability": float32 [N, 1], sigmoid probability of IDC

Usage:
  python models/tools/build_idc_model.py --data /work/shared/data/idc_breast_histopathology \
      --out models/idc-resnet [--epochs N] [--seed N]

FOR RESEARCH AND TRIAGE ONLY, NOT FOR DIAGNOSIS.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

PATCH = 50
PAD_VALUE = 255
DEMO_PATIENT = 10253
VAL_FRACTION = 0.2  # one patient in every group of 5 (see split_patients)
TOP_K = 15
N_CALIBRATION = 300
BATCH_SIZE = 128
MAX_LR = 2e-3
EMA_DECAY = 0.998  # exponential moving average of weights (and BN buffers); the EMA model is exported
WEIGHT_DECAY = 1e-4
WIDTHS = (24, 48, 96, 192)
BLOCKS = (1, 1, 2, 1)
STEM_WIDTH = 24
ARCHITECTURE = (
    "compact ResNet (BasicBlock) from scratch: in-graph normalisation, 3x3 stem 24ch @50x50, "
    "4 stages widths 24/48/96/192 with 1/1/2/1 blocks, each stage stride 2 (50->25->13->7->4), "
    "global average pool, linear -> 1 logit, sigmoid in graph"
)

# Held-out patients listed in the data set's PROVENANCE.md. They must never be trained or tuned on.
HELD_OUT = {
    8914, 8955, 8980, 9022, 9043, 9075, 9124, 9176, 9227, 9254, 9256, 9259, 9261, 9262, 9291, 9319, 9347,
    10254, 10255, 10257, 10260, 10261, 10272, 10274, 10275, 10277, 10299, 10300, 10301, 12242, 12810,
    12822, 12823, 12876, 12906, 12908, 12910, 12931, 13106, 13403, 13461, 13462, 13687, 13693, 14153,
    14156, 14188, 14210, 14213, 14306, 15471, 15514, 15902, 16014, 16167, 16551, 16555,
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------- data
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


def split_patients(labels, patients, complete, seed: int):
    """Deterministic patient split stratified by IDC fraction.

    Patients are grouped into complete-slide and sparse-sample patients (complete slides carry most
    patches). Within each group they are sorted by IDC-patch fraction (ties by id), cut into
    consecutive blocks of 5, and one patient per block goes to validation (random.Random(seed));
    a trailing partial block contributes one patient with probability len/5. Patient 10253 (demo
    case) is then forced into validation by swapping it with the patient chosen from its block.
    """
    rng = random.Random(seed)
    pids = sorted(set(patients.tolist()))
    frac = {p: float(labels[patients == p].mean()) for p in pids}
    val = set()
    block_of = {}
    for group_complete in (True, False):
        group = sorted((p for p in pids if complete[p] == group_complete), key=lambda p: (frac[p], p))
        for b in range(0, len(group), 5):
            block = group[b:b + 5]
            for p in block:
                block_of[p] = block
            if len(block) < 5 and rng.random() >= len(block) / 5:
                continue
            val.add(rng.choice(block))
    if DEMO_PATIENT in pids and DEMO_PATIENT not in val:
        chosen = [p for p in block_of[DEMO_PATIENT] if p in val]
        for p in chosen:
            val.discard(p)
        val.add(DEMO_PATIENT)
    train = [p for p in pids if p not in val]
    return train, sorted(val), frac


# ------------------------------------------------------------------------------------------ metrics
def auc_rank(y: np.ndarray, p: np.ndarray) -> float:
    """Rank-based ROC AUC (Mann-Whitney U) with average ranks for ties."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    sp = p[order]
    ranks = np.empty(len(p), dtype=np.float64)
    # average ranks over tie groups
    uniq_start = np.r_[0, np.flatnonzero(np.diff(sp)) + 1]
    uniq_end = np.r_[uniq_start[1:], len(sp)]
    avg = (uniq_start + uniq_end + 1) / 2.0  # 1-based average rank
    ranks[order] = np.repeat(avg, uniq_end - uniq_start)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_metrics(y, p, threshold: float, n_patients: int) -> dict:
    y = np.asarray(y).astype(bool)
    pred = np.asarray(p) >= threshold
    tp = int((pred & y).sum()); tn = int((~pred & ~y).sum())
    fp = int((pred & ~y).sum()); fn = int((~pred & y).sum())
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    prec = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * prec * sens / (prec + sens) if prec + sens else 0.0
    return {
        "auc": round(auc_rank(y, p), 4),
        "balanced_accuracy": round((sens + spec) / 2, 4),
        "f1": round(f1, 4),
        "sensitivity": round(sens, 4),
        "specificity": round(spec, 4),
        "precision": round(prec, 4),
        "accuracy": round((tp + tn) / len(y), 4),
        "threshold": threshold,
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        "n_patches": int(len(y)),
        "n_positive_patches": int(y.sum()),
        "n_patients": int(n_patients),
    }


def best_balanced_accuracy_threshold(y, p) -> float:
    """Threshold maximising balanced accuracy (rule: positive if p >= threshold), midpoint between
    neighbouring distinct scores, rounded to 4 decimals."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    u = np.unique(p)  # ascending
    cands = np.r_[(u[:-1] + u[1:]) / 2.0, u[0]]
    cands = np.unique(np.round(cands, 4))
    n_pos, n_neg = y.sum(), (~y).sum()
    best_t, best_ba = 0.5, -1.0
    ps, ys = np.sort(p), y[np.argsort(p, kind="mergesort")]
    cum_pos = np.r_[0, np.cumsum(ys)]  # positives strictly below index
    for t in cands:
        k = np.searchsorted(ps, t, side="left")  # number with p < t -> predicted negative
        fn = cum_pos[k]
        tn = k - fn
        ba = ((n_pos - fn) / n_pos + tn / n_neg) / 2
        if ba > best_ba + 1e-12:
            best_ba, best_t = ba, float(t)
    return best_t


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -------------------------------------------------------------------------------------------- model
def build_model(mean, std):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = None
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return F.relu(y + (x if self.short is None else self.short(x)))

    class IDCResNet(nn.Module):
        """forward(image uint8 NHWC) -> probability [N,1]; forward_logits(float NCHW in [0,1]) for training."""

        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
            self.stem = nn.Sequential(nn.Conv2d(3, STEM_WIDTH, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(STEM_WIDTH), nn.ReLU(inplace=True))
            layers, cin = [], STEM_WIDTH
            for w, n in zip(WIDTHS, BLOCKS):
                for j in range(n):
                    layers.append(Block(cin, w, 2 if j == 0 else 1))
                    cin = w
            self.stages = nn.Sequential(*layers)
            self.head = nn.Linear(cin, 1)

        def forward_logits(self, x01):
            x = (x01 - self.mean) / self.std
            x = self.stages(self.stem(x))
            return self.head(x.mean(dim=(2, 3)))

        def forward(self, image):
            x = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0
            return torch.sigmoid(self.forward_logits(x))

    return IDCResNet()


def augment(xb_u8, gen):
    """H&E-suited augmentation on a uint8 NHWC batch -> float NCHW in [0,1].

    Dihedral group (flips + 90 degree rotations: histology has no canonical orientation) and small
    colour jitter (brightness, contrast, saturation, per-channel gain ~ stain/scanner variation).
    """
    import torch

    x = xb_u8.permute(0, 3, 1, 2).float().div_(255.0)
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x[flip] = x[flip].flip(3)
    k = torch.randint(0, 4, (n,), generator=gen)
    for r in (1, 2, 3):
        m = k == r
        if m.any():
            x[m] = torch.rot90(x[m], r, dims=(2, 3))

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    x = x * u(0.9, 1.1, 1, 1, 1)                                   # brightness
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - m) * u(0.9, 1.1, 1, 1, 1) + m                          # contrast
    g = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = g + (x - g) * u(0.85, 1.15, 1, 1, 1)                        # saturation
    x = x * u(0.95, 1.05, 3, 1, 1)                                  # per-channel gain (hue-ish)
    x = x.clamp_(0.0, 1.0)
    # round to the uint8 grid the deployed model sees
    return (x * 255.0).round_().div_(255.0)


def torch_predict(model, images_u8, batch=512):
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images_u8), batch):
            out.append(model(torch.from_numpy(images_u8[i:i + batch])).numpy()[:, 0])
    return np.concatenate(out)


def ov_predict(compiled, images_u8, batch=256):
    req = compiled.create_infer_request()
    out_port = compiled.output("probability")
    out = []
    for i in range(0, len(images_u8), batch):
        res = req.infer({"image": images_u8[i:i + batch]})
        out.append(np.array(res[out_port], dtype=np.float32).reshape(-1, 1))
    return np.concatenate(out)


# --------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--epochs", type=int, default=18)
    ap.add_argument("--seed", type=int, default=20240611)
    args = ap.parse_args(argv)
    command_line = "python " + " ".join(shlex.quote(a) for a in
                                        ([os.path.relpath(__file__)] if __file__ else []) + sys.argv[1:])
    t_start = time.time()

    import torch
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    out = args.out
    work = out / "work"  # intermediates, git-ignored (models/**/work/)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)

    # ---- data + split
    log(f"loading patches from {args.data}")
    images, labels, patients, complete, n_padded = load_patches(args.data)
    log(f"loaded {len(images)} patches, {len(set(patients.tolist()))} patients, {n_padded} padded edge patches")
    train_p, val_p, frac = split_patients(labels, patients, complete, args.seed)
    assert DEMO_PATIENT in val_p
    tr = np.isin(patients, train_p)
    va = np.isin(patients, val_p)
    assert not (set(train_p) & set(val_p)) and (tr ^ va).all()
    split = {
        "seed": args.seed,
        "method": "patients grouped complete-slide vs sparse, sorted by IDC fraction, blocks of 5, one per block "
                  "to validation (random.Random(seed)); patient 10253 (demo case) forced into validation",
        "train": train_p,
        "validation": val_p,
        "counts": {
            "train": {"patients": len(train_p), "patches": int(tr.sum()), "idc_patches": int(labels[tr].sum())},
            "validation": {"patients": len(val_p), "patches": int(va.sum()), "idc_patches": int(labels[va].sum())},
        },
    }
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n")
    log(f"split: train {len(train_p)} patients / {tr.sum()} patches, val {len(val_p)} patients / {va.sum()} patches")

    x_tr, y_tr = images[tr], labels[tr]
    x_va, y_va = images[va], labels[va]
    mean = (x_tr.reshape(-1, 3).astype(np.float64).mean(0) / 255.0).round(4).tolist()
    std = (x_tr.reshape(-1, 3).astype(np.float64).std(0) / 255.0).round(4).tolist()
    log(f"channel mean {mean} std {std} (training patients, after padding)")

    # ---- train
    model = build_model(mean, std).to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    pos_weight = float((y_tr == 0).sum() / (y_tr == 1).sum())
    crit = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight]))
    opt = torch.optim.AdamW(model.parameters(), lr=MAX_LR, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = (len(x_tr) + BATCH_SIZE - 1) // BATCH_SIZE
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=MAX_LR, epochs=args.epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.2)
    gen = torch.Generator().manual_seed(args.seed)
    xt = torch.from_numpy(x_tr)
    yt = torch.from_numpy(y_tr).float().unsqueeze(1)
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(EMA_DECAY), use_buffers=True)
    log(f"model: {n_params} parameters, pos_weight {pos_weight:.3f}, {steps_per_epoch} steps/epoch")
    t_train = time.time()
    history = []
    for epoch in range(args.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(xt), generator=gen)
        tot = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * BATCH_SIZE:(s + 1) * BATCH_SIZE]
            xb = augment(xt[idx], gen).contiguous(memory_format=torch.channels_last)
            loss = crit(model.forward_logits(xb), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            ema.update_parameters(model)
            tot += loss.item() * len(idx)
        # monitoring only: EMA weights after the final epoch are used, no early stopping on validation
        pv = torch_predict(ema.module, x_va)
        history.append({"epoch": epoch + 1, "train_loss": round(tot / len(xt), 4),
                        "val_auc_torch": round(auc_rank(y_va, pv), 4), "seconds": round(time.time() - t0, 1)})
        log(f"epoch {epoch + 1}/{args.epochs} loss {tot / len(xt):.4f} val AUC {history[-1]['val_auc_torch']:.4f} "
            f"({time.time() - t0:.0f}s)")
    train_seconds = time.time() - t_train
    model = ema.module.to(memory_format=torch.contiguous_format).eval()
    torch.save({"state_dict": model.state_dict(), "mean": mean, "std": std}, work / "model.pt")

    # ---- export ONNX FP32
    import onnx
    onnx_path = out / "model.fp32.onnx"
    dummy = torch.from_numpy(x_va[:2].copy())
    torch.onnx.export(model, (dummy,), str(onnx_path), input_names=["image"], output_names=["probability"],
                      dynamic_axes={"image": {0: "N"}, "probability": {0: "N"}}, opset_version=17,
                      do_constant_folding=True, dynamo=False)
    om = onnx.load(str(onnx_path))
    onnx.checker.check_model(om)
    assert [i.name for i in om.graph.input] == ["image"] and [o.name for o in om.graph.output] == ["probability"]
    assert om.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    log(f"exported {onnx_path} ({onnx_path.stat().st_size} bytes)")

    # ---- OpenVINO + NNCF INT8
    import nncf
    import openvino as ov
    core = ov.Core()
    fp32_ov = ov.convert_model(str(onnx_path))
    ov_for_q = ov.convert_model(str(onnx_path))
    cal_rng = np.random.default_rng(args.seed)
    cal_idx = np.sort(cal_rng.choice(len(x_tr), size=N_CALIBRATION, replace=False))
    cal_items = [x_tr[i:i + 1] for i in cal_idx]
    q_model = nncf.quantize(ov_for_q, nncf.Dataset(cal_items), subset_size=N_CALIBRATION)
    xml_path = out / "model.int8.xml"
    ov.save_model(q_model, str(xml_path))
    bin_path = out / "model.int8.bin"
    log(f"saved INT8 IR {xml_path} ({xml_path.stat().st_size} + {bin_path.stat().st_size} bytes)")

    # ---- evaluate on all validation patches by running the exported models
    fp32_c = core.compile_model(fp32_ov, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    int8_c = core.compile_model(core.read_model(str(xml_path)), "CPU")
    p_fp32 = ov_predict(fp32_c, x_va)
    p_int8 = ov_predict(int8_c, x_va)
    for name, p in (("fp32", p_fp32), ("int8", p_int8)):
        assert p.shape == (len(x_va), 1) and np.isfinite(p).all() and p.min() >= 0 and p.max() <= 1, name
    import onnxruntime as ort
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    p_ort = np.concatenate([sess.run(["probability"], {"image": x_va[i:i + 512]})[0]
                            for i in range(0, len(x_va), 512)])
    p_torch = torch_predict(model, x_va)
    p_fp32, p_int8, p_ort = p_fp32[:, 0], p_int8[:, 0], p_ort[:, 0]

    # threshold chosen on validation patients, on the deployed (INT8) engine's outputs
    thr = best_balanced_accuracy_threshold(y_va, p_int8)
    m_fp32 = binary_metrics(y_va, p_fp32, thr, len(val_p))
    m_int8 = binary_metrics(y_va, p_int8, thr, len(val_p))
    agreement = float(((p_fp32 >= thr) == (p_int8 >= thr)).mean())
    # case-level summary for the demo case (mean of top-k patch probabilities)
    demo = patients[va] == DEMO_PATIENT
    demo_case = {
        "patient": DEMO_PATIENT,
        "n_patches": int(demo.sum()),
        "n_idc_patches": int(y_va[demo].sum()),
        "top15_mean_fp32": round(float(np.sort(p_fp32[demo])[-TOP_K:].mean()), 4),
        "top15_mean_int8": round(float(np.sort(p_int8[demo])[-TOP_K:].mean()), 4),
    }
    case_scores = {int(pid): float(np.sort(p_int8[patients[va] == pid])[-TOP_K:].mean()) for pid in val_p}
    log(f"patch threshold {thr}; fp32 {m_fp32['auc']}/{m_fp32['balanced_accuracy']} "
        f"int8 {m_int8['auc']}/{m_int8['balanced_accuracy']} agreement {agreement:.4f}")

    # ---- manifest
    files = {"openvino": "model.int8.xml", "openvino_weights": "model.int8.bin", "onnx": "model.fp32.onnx"}
    wall = time.time() - t_start
    manifest = {
        "schema_version": 1,
        "name": "idc-resnet",
        "version": "0.1.0",
        "task": "patch-classification",
        "labels": ["non-idc", "idc"],
        "input": {"name": "image", "width": PATCH, "height": PATCH, "channels": 3, "layout": "NHWC",
                  "dtype": "uint8", "color": "RGB", "microns_per_pixel": 4.0, "pad_value": PAD_VALUE,
                  "normalisation": "in-graph: float(x)/255, then (x-mean)/std per channel",
                  "mean": mean, "std": std},
        "output": {"name": "probability", "kind": "sigmoid-probability-of-positive"},
        "patch": {"size": PATCH, "stride": PATCH, "min_tissue_fraction": 0.25},
        "decision": {"patch_threshold": thr, "top_k": TOP_K, "case_threshold": thr},
        "files": files,
        "sha256": {f: sha256(out / f) for f in files.values()},
        "training": {
            "seed": args.seed,
            "epochs": args.epochs,
            "architecture": ARCHITECTURE,
            "parameters": n_params,
            "train_patients": len(train_p),
            "validation_patients": len(val_p),
            "train_patches": int(tr.sum()),
            "validation_patches": int(va.sum()),
            "data": "IDC breast histopathology (CC0), training/dev portion",
            "command": "make model",
            "script": "models/tools/build_idc_model.py",
            "invocation": command_line,
            "loss": f"BCEWithLogits, pos_weight={pos_weight:.4f} (n_neg/n_pos on training patches)",
            "optimizer": f"AdamW wd={WEIGHT_DECAY}, OneCycle max_lr={MAX_LR}, batch {BATCH_SIZE}, EMA weights (decay {EMA_DECAY}) exported",
            "augmentation": "flips, 90-degree rotations, brightness/contrast/saturation +-10/10/15%, "
                            "per-channel gain +-5%",
            "quantization": f"NNCF {nncf.__version__} post-training quantization on OpenVINO IR, "
                            f"{N_CALIBRATION} calibration patches from training patients",
            "train_seconds": round(train_seconds, 1),
            "wall_seconds": round(wall, 1),
            "history": history,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "openvino": ov.__version__, "nncf": nncf.__version__, "onnx": onnx.__version__,
                         "onnxruntime": ort.__version__},
        },
        "metrics": {"validation": {
            "fp32": {**m_fp32, "engine": "OpenVINO CPU, INFERENCE_PRECISION_HINT=f32, model.fp32.onnx"},
            "int8": {**m_int8, "engine": "OpenVINO CPU default config, model.int8.xml"},
            "agreement": round(agreement, 4),
            "max_abs_probability_diff_fp32_int8": round(float(np.abs(p_fp32 - p_int8).max()), 4),
            "mean_abs_probability_diff_fp32_int8": round(float(np.abs(p_fp32 - p_int8).mean()), 4),
            "max_abs_probability_diff_onnxruntime_vs_openvino_fp32": float(f"{np.abs(p_ort - p_fp32).max():.2e}"),
            "max_abs_probability_diff_torch_vs_onnxruntime": float(f"{np.abs(p_torch - p_ort).max():.2e}"),
            "threshold_selection": "patch_threshold maximises balanced accuracy of INT8 outputs on validation "
                                   "patients; positive if probability >= threshold",
            "demo_case": demo_case,
            "validation_patients_with_case_score_ge_threshold":
                int(sum(v >= thr for v in case_scores.values())),
        }},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(manifest, split, command_line))
    log(f"done in {wall:.0f}s; wrote {sorted(p.name for p in out.iterdir())}")


def model_card(m: dict, split: dict, command_line: str) -> str:
    v = m["metrics"]["validation"]
    f, q = v["fp32"], v["int8"]
    t = m["training"]
    c = split["counts"]
    rows = [("AUC (patch)", "auc"), ("Balanced accuracy", "balanced_accuracy"), ("F1", "f1"),
            ("Sensitivity", "sensitivity"), ("Specificity", "specificity")]
    table = "\n".join(f"| {label} | {f[k]:.4f} | {q[k]:.4f} |" for label, k in rows)
    hist = ", ".join(f"{h['val_auc_torch']:.3f}" for h in t["history"])
    return f"""# Model card: idc-resnet {m['version']}

**FOR RESEARCH AND TRIAGE ONLY, NOT FOR DIAGNOSIS.** This model has not been clinically validated. Its output
must never be used to diagnose, rule out or grade cancer, or to make any treatment decision. Every case must be
read by a qualified pathologist regardless of what the model says.

## What it is

A patch classifier for H&E-stained breast tissue. It takes one 50x50 RGB patch and returns the probability that
the patch contains invasive ductal carcinoma (IDC). The appliance tiles a slide into 50x50 patches (stride 50),
skips patches with less than 25% tissue, scores the rest, and summarises a case as the mean of the top
{m['decision']['top_k']} patch probabilities.

* Input `image`: uint8, NHWC `[N, 50, 50, 3]`, RGB, dynamic N. Edge patches smaller than 50x50 are padded at
  bottom/right with 255 (white glass). Normalisation is inside the graph: `float(x)/255`, then `(x-mean)/std`
  per channel with mean `{m['input']['mean']}` and std `{m['input']['std']}` (training pixels).
* Output `probability`: float32 `[N, 1]`, sigmoid probability of IDC (sigmoid inside the graph).
* Files: `model.int8.xml`/`model.int8.bin` (OpenVINO INT8 IR, the primary engine), `model.fp32.onnx`
  (ONNX Runtime fallback), `manifest.json` (contract, thresholds, sha256, metrics), `split.json` (patient split).
* Scale: about {m['input']['microns_per_pixel']} µm per pixel. This is **approximate**: the slides were scanned at 40x
  and the patches were cut from downsampled images (about 2.5x; Janowczyk & Madabhushi 2016). The magnification
  of the patches was not checked independently.

## Architecture and why

{t['architecture']}. {t['parameters']:,} parameters.

A compact residual network trained from scratch: no pretrained weights were available (offline build), 50x50
patches are too small for ImageNet-scale backbones to pay off, and the appliance runs on a small CPU. The first
convolution runs at full 50x50 resolution to keep nuclear detail, and every stage then halves the resolution so a
forward pass is cheap. INT8 quantization (NNCF post-training, {m['training']['quantization'].split(', ')[-1]})
roughly quarters the weight size and speeds up CPU inference.

Training: {t['epochs']} epochs, {t['optimizer']}, {t['loss']} for the class imbalance, augmentation: {t['augmentation']}.
Seed {t['seed']}. Training took {t['train_seconds'] / 60:.1f} min and the whole build {t['wall_seconds'] / 60:.1f} min on 2 CPU cores.

## Data and licence

IDC breast histopathology patches (Kaggle "Breast Histopathology Images"), training/dev portion only: 222 patients,
25,200 patches. Kaggle lists the dataset as **CC0 1.0** (public domain dedication); the Kaggle page itself could
not be checked when the data were collected, so check it before any release (see the data set's PROVENANCE.md).
A separate held-out portion (57 other patients) was not used for training, tuning or threshold selection.

Cite the original work:

* Cruz-Roa A. et al., "Automatic detection of invasive ductal carcinoma in whole slide images with convolutional
  neural networks", Proc. SPIE Medical Imaging 2014: Digital Pathology, 9041:904103. doi:10.1117/12.2043872
* Janowczyk A., Madabhushi A., "Deep learning for digital pathology image analysis: A comprehensive tutorial with
  selected use cases", J Pathol Inform 2016;7:29. PMID 27563488

## Split (by patient)

Patches of one patient are near-duplicates, so the split is **by patient**, never by patch. {split['method']}.

| | patients | patches | IDC patches |
|---|---:|---:|---:|
| train | {c['train']['patients']} | {c['train']['patches']} | {c['train']['idc_patches']} |
| validation | {c['validation']['patients']} | {c['validation']['patches']} | {c['validation']['idc_patches']} |

The lists are in `split.json`.

## Metrics (validation patients, all {f['n_patches']} patches of {f['n_patients']} patients)

Measured by running the exported files: FP32 = `model.fp32.onnx` in OpenVINO CPU with
`INFERENCE_PRECISION_HINT=f32`; INT8 = `model.int8.xml` in OpenVINO CPU. Threshold {m['decision']['patch_threshold']}
(positive if probability >= threshold) for both.

| Metric | FP32 | INT8 |
|---|---:|---:|
{table}

FP32/INT8 label agreement: {v['agreement']:.4f} of validation patches (max |Δp| {v['max_abs_probability_diff_fp32_int8']},
mean |Δp| {v['mean_abs_probability_diff_fp32_int8']}). ONNX Runtime vs OpenVINO FP32: max |Δp|
{v['max_abs_probability_diff_onnxruntime_vs_openvino_fp32']}.
Demo case {v['demo_case']['patient']} ({v['demo_case']['n_patches']} patches, {v['demo_case']['n_idc_patches']} IDC):
top-{m['decision']['top_k']} mean probability {v['demo_case']['top15_mean_int8']} (INT8), {v['demo_case']['top15_mean_fp32']} (FP32).
Per-epoch validation AUC (PyTorch, EMA weights, monitoring only; the final-epoch EMA weights are used): {hist}.

Produced by (from the repository root, in the `.venv-train` environment; `make model`):

```
{command_line}
```

## Decision thresholds

* `patch_threshold` = {m['decision']['patch_threshold']}: chosen on the validation patients by maximising balanced
  accuracy of the INT8 outputs. The same patients are used to report the metrics above, so these numbers are
  optimistic about the threshold; a later issue replaces this with proper cross-validation.
* `case_threshold` = {m['decision']['case_threshold']}: applied to the mean of the top-{m['decision']['top_k']} patch
  probabilities of a case. For now it is simply set equal to the patch threshold; it has not been calibrated at
  case level (nearly every patient in this data set has some IDC, so case-level negatives are scarce).

## Limitations

* Patch-level labels from one public dataset (one institution's scans, one staining protocol). Performance on
  other scanners, stains or preparations is unknown; expect colour/stain shift to hurt.
* Validation uses {f['n_patients']} patients from the same source; the metrics are not a clinical performance claim.
  The threshold was tuned on the same validation patients.
* Most patients are sparse random samples (~4% of their patches); only 20 are complete slides. Case-level behaviour
  (top-{m['decision']['top_k']} mean) is barely validated.
* Only IDC vs non-IDC. Other lesions (DCIS, lobular carcinoma, benign proliferations) are not modelled and may be
  scored either way. The scale (~4 µm/pixel) is approximate; patches at another scale are out of distribution.
* Trained from scratch in about 10 minutes on CPU. No hyperparameter search, except that two training settings
  were compared on the validation patients (max_lr 3e-3 without EMA gave FP32 AUC 0.878; max_lr 2e-3 with EMA
  weights was kept), which also makes the validation numbers slightly optimistic.
* Out-of-distribution input is unsafe, worst in INT8: quantization ranges were calibrated on tissue patches, so
  non-tissue input (all-black, random noise) can get high INT8 probabilities (for example 0.5 to 0.8) while FP32
  gives about 0. Only patches that pass the tissue filter should be scored.

**FOR RESEARCH AND TRIAGE ONLY, NOT FOR DIAGNOSIS.**
"""


if __name__ == "__main__":
    main()
