"""Inference engines behind one small interface: OpenVINO (default, INT8 IR) and ONNX Runtime (fallback)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import EngineError
from .manifest import ModelManifest, read_manifest, read_verified

Backend = Literal["openvino", "onnxruntime"]
BACKENDS: tuple[str, ...] = ("openvino", "onnxruntime")


class Engine(ABC):
    """Scores a batch of uint8 RGB patches (N, H, W, 3) and returns one probability per patch."""

    backend: str

    def __init__(self, model_dir: Path, manifest: ModelManifest):
        self.model_dir = Path(model_dir)
        self.manifest = manifest

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self._check_batch(batch)
        if len(batch) == 0:
            return np.zeros(0, dtype=np.float32)
        probs = np.asarray(self._infer(np.ascontiguousarray(batch)), dtype=np.float32).reshape(len(batch), -1)
        if probs.shape[1] != 1:
            raise EngineError(f"{self.backend}: model output has shape {probs.shape}, expected (N, 1)")
        return probs[:, 0]

    @abstractmethod
    def _infer(self, batch: np.ndarray) -> np.ndarray: ...

    def _check_batch(self, batch: np.ndarray) -> None:
        spec = self.manifest.input
        want = (spec.height, spec.width, spec.channels)
        if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8:
            raise EngineError(f"batch must be a uint8 numpy array, got {getattr(batch, 'dtype', type(batch))}")
        if batch.ndim != 4 or batch.shape[1:] != want:
            raise EngineError(f"batch has shape {batch.shape}, the model expects (N, {want[0]}, {want[1]}, {want[2]})")

    @property
    def description(self) -> dict:
        m = self.manifest
        return {"name": m.name, "version": m.version, "sha256": m.digest, "backend": self.backend}


class OpenVINOEngine(Engine):
    """The INT8 OpenVINO IR on the CPU, compiled once per process."""

    backend = "openvino"

    def __init__(self, model_dir: Path, manifest: ModelManifest, *, precision: str | None = None):
        super().__init__(model_dir, manifest)
        import openvino as ov

        xml = read_verified(model_dir, manifest.files.openvino, manifest)
        weights = read_verified(model_dir, manifest.files.openvino_weights, manifest)
        config: dict[str, str] = {"PERFORMANCE_HINT": "LATENCY"}
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        try:
            core = ov.Core()
            model = core.read_model(model=xml, weights=ov.Tensor(np.frombuffer(weights, dtype=np.uint8)))
            self._compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as exc:
            raise EngineError(f"OpenVINO could not load {self.model_dir / manifest.files.openvino}: {exc}") from None
        self._request = self._compiled.create_infer_request()

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        self._request.infer({0: batch})
        return self._request.get_output_tensor(0).data.copy()


class OnnxRuntimeEngine(Engine):
    """The FP32 ONNX model on ONNX Runtime's CPU provider: the fallback when OpenVINO is unavailable."""

    backend = "onnxruntime"

    def __init__(self, model_dir: Path, manifest: ModelManifest, *, threads: int = 0):
        super().__init__(model_dir, manifest)
        import onnxruntime as ort

        data = read_verified(model_dir, manifest.files.onnx, manifest)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors; name the file and stop.
            raise EngineError(f"ONNX Runtime could not load {self.model_dir / manifest.files.onnx}: {exc}") from None
        self._input = self._session.get_inputs()[0].name

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: batch})[0]


def load_engine(model_dir: Path, backend: str = "openvino", **options) -> Engine:
    """Read and validate the manifest in ``model_dir``, verify the files' hashes and load the backend."""
    manifest = read_manifest(model_dir)
    if backend == "openvino":
        return OpenVINOEngine(model_dir, manifest, **options)
    if backend == "onnxruntime":
        return OnnxRuntimeEngine(model_dir, manifest, **options)
    raise EngineError(f"unknown engine backend {backend!r}; choose one of {', '.join(BACKENDS)}")
