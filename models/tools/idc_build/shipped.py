"""The shipped first stage: the fold members averaged in one graph, exported (ONNX FP32, NNCF INT8 IR) and
checked on the reserved patients, in sample, on non-tissue probes and across runtimes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import PATCH, RESERVED
from .dataset import Data
from .errors import BuildCheckError
from .export import N_CALIBRATION, export_onnx, ov_predict, quantize_int8, torch_predict
from .log import log
from .members import FoldMembers
from .metrics import TOP_K, auc, binary_metrics
from .network import _classes
from .split import K_FOLDS


def build_shipped(d: Data, members: FoldMembers, *, tta: bool, out: Path, work: Path, core, calibration_rng,
                  first_stage_threshold: float, seed: int) -> dict:
    """The shipped model: the fold members in one graph -> work/model.pt, model.fp32.onnx, NNCF INT8 IR; then its
    checks (reserved patients, in-sample FP32 vs INT8, non-tissue probes, ONNX Runtime and torch vs OpenVINO),
    labels taken at first_stage_threshold. Returns the checks as manifest["metrics"] entries."""
    import onnxruntime as ort

    shipped, onnx_path, xml_path = export_shipped(d, members, tta, out, work, calibration_rng)
    fp32_compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    int8_compiled = core.compile_model(core.read_model(str(xml_path)), "CPU")
    fp32, int8 = ov_predict(fp32_compiled, d.images), ov_predict(int8_compiled, d.images)
    for name, p in (("fp32", fp32), ("int8", int8)):
        if not (np.isfinite(p).all() and p.min() >= 0 and p.max() <= 1):
            raise BuildCheckError(f"the shipped {name} graph gives probabilities outside [0, 1] or not finite "
                                  f"(min {np.nanmin(p)}, max {np.nanmax(p)})")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    res = d.res
    p_onnxruntime = np.concatenate([session.run(["probability"], {"image": d.images[res][i:i + 256]})[0][:, 0]
                                    for i in range(0, int(res.sum()), 256)])
    p_torch = torch_predict(shipped, d.images[res])
    reserved = reserved_patients_check(d, fp32, int8, first_stage_threshold)
    non_tissue = non_tissue_probes(fp32_compiled, int8_compiled, seed)
    log(f"reserved patients: fp32 {reserved['fp32']['auc']} int8 {reserved['int8']['auc']} agreement "
        f"{reserved['agreement']}; non-tissue {non_tissue}")
    return {
        "shipped_reserved_patients": reserved,
        "shipped_in_sample_consistency": in_sample_consistency(d, fp32, int8, first_stage_threshold),
        "non_tissue_probes_mean_probability": non_tissue,
        "max_abs_probability_diff_onnxruntime_vs_openvino_fp32":
            float(f"{np.abs(p_onnxruntime - fp32[res]).max():.2e}"),
        "max_abs_probability_diff_torch_vs_onnxruntime": float(f"{np.abs(p_torch - p_onnxruntime).max():.2e}"),
    }


def export_shipped(d: Data, members: FoldMembers, tta: bool, out: Path, work: Path, calibration_rng):
    """work/model.pt, model.fp32.onnx and the NNCF INT8 IR (calibration from development patches).
    Returns (the torch module, the ONNX path, the IR's .xml path)."""
    import openvino as ov
    import torch

    _, Shipped = _classes()
    shipped = Shipped(members.models, tta).eval()
    torch.save({"model": shipped.state_dict(), "tta": tta, "mean": d.mean, "std": d.std}, work / "model.pt")
    onnx_path = out / "model.fp32.onnx"
    export_onnx(shipped, onnx_path, d.images[:2])
    dev_idx = np.flatnonzero(d.dev)
    calibration = d.images[np.sort(calibration_rng.choice(dev_idx, size=N_CALIBRATION, replace=False))]
    quantized = quantize_int8(onnx_path, calibration)
    xml_path, bin_path = out / "model.int8.xml", out / "model.int8.bin"
    ov.save_model(quantized, str(xml_path))
    log(f"shipped: {onnx_path.stat().st_size} B onnx, {xml_path.stat().st_size}+{bin_path.stat().st_size} B INT8 IR")
    return shipped, onnx_path, xml_path


def reserved_patients_check(d: Data, fp32, int8, first_stage_threshold: float) -> dict:
    """The shipped graph on the reserved patients (never trained on): FP32 and INT8 metrics, their agreement,
    and per patient the top-k mean case score."""
    res, labels = d.res, d.labels[d.res]
    fp32_res, int8_res, patients_res = fp32[res], int8[res], d.patients[res]
    reserved = {name: binary_metrics(labels, p, first_stage_threshold, len(RESERVED))
                for name, p in (("fp32", fp32_res), ("int8", int8_res))}
    reserved["agreement"] = round(float(((fp32_res >= first_stage_threshold)
                                         == (int8_res >= first_stage_threshold)).mean()), 4)
    reserved["auc_drop"] = round(reserved["fp32"]["auc"] - reserved["int8"]["auc"], 4)
    reserved["per_patient"] = {}
    for pid in RESERVED:
        own = patients_res == pid
        reserved["per_patient"][str(pid)] = {
            "patches": int(own.sum()), "idc_patches": int(labels[own].sum()),
            "top15_mean_fp32": round(float(np.sort(fp32_res[own])[-TOP_K:].mean()), 4),
            "top15_mean_int8": round(float(np.sort(int8_res[own])[-TOP_K:].mean()), 4),
            "auc_int8": round(auc(labels[own], int8_res[own]), 4)}
    return reserved


def in_sample_consistency(d: Data, fp32, int8, first_stage_threshold: float) -> dict:
    """FP32 against INT8 of the shipped graph on the development patches, which its members trained on."""
    dev = d.dev
    return {
        "note": f"all {int(dev.sum()):,} development patches; every one was in the training set of {K_FOLDS - 1} "
                f"of the {K_FOLDS} members, so these are NOT generalisation numbers, only an FP32-vs-INT8 "
                f"consistency check of the shipped graph",
        "auc_fp32": round(auc(d.labels[dev], fp32[dev]), 4), "auc_int8": round(auc(d.labels[dev], int8[dev]), 4),
        "label_agreement_at_threshold": round(float(((fp32[dev] >= first_stage_threshold)
                                                     == (int8[dev] >= first_stage_threshold)).mean()), 4),
    }


def non_tissue_probes(fp32_compiled, int8_compiled, seed: int) -> dict:
    """Mean probability of the shipped graph on synthetic non-tissue patches (known issue of 0.1.0: INT8 gave
    high scores to black and noise)."""
    rng = np.random.default_rng(seed)
    probes = {"black": np.zeros((1, PATCH, PATCH, 3), np.uint8), "white": np.full((1, PATCH, PATCH, 3), 255, np.uint8),
              "grey128": np.full((1, PATCH, PATCH, 3), 128, np.uint8),
              "uniform_noise": rng.integers(0, 256, (8, PATCH, PATCH, 3), dtype=np.uint8),
              "pink_eosin_flat": np.tile(np.array([230, 150, 200], np.uint8), (1, PATCH, PATCH, 1)),
              "purple_haematoxylin_flat": np.tile(np.array([90, 50, 140], np.uint8), (1, PATCH, PATCH, 1))}
    return {name: {"fp32": round(float(ov_predict(fp32_compiled, x).mean()), 4),
                   "int8": round(float(ov_predict(int8_compiled, x).mean()), 4)} for name, x in probes.items()}
