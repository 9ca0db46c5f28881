"""Inference engines behind one small interface: OpenVINO (default, INT8 IR) and ONNX Runtime (fallback)."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from appliance.errors import EngineError
from appliance.model.latency import LatencyHistogram
from appliance.model.manifest import ModelManifest, read_manifest, read_verified
from appliance.model.ood import OodReference
from appliance.model.ref import ModelRef
from appliance.model.runtime import load_runtime
from appliance.model.runtime import one_blas_thread
from appliance.model.scoring import AsyncScorer, Scorer
from appliance.terms import EngineName

__all__ = ["ENGINES", "AsyncScorer", "Engine", "LatencyHistogram", "OnnxRuntimeEngine", "OpenVINOEngine", "Scorer",
           "load_engine", "one_blas_thread"]


class Engine(ABC):
    """Scores a batch of uint8 RGB patches (N, H, W, 3) and returns one probability per patch (``score``: and,
    for a model with an out-of-distribution reference, each patch's distance from the development patches)."""

    backend: str

    def __init__(self, model_dir: Path, manifest: ModelManifest):
        self.model_dir = Path(model_dir)
        self.manifest = manifest
        self.latency = LatencyHistogram()
        self.ood_reference: OodReference | None = None
        if manifest.ood is not None:
            data = read_verified(model_dir, manifest.ood.file, manifest)
            self.ood_reference = OodReference.from_bytes(data, source=str(self.model_dir / manifest.ood.file))

    @property
    def has_ood(self) -> bool:
        return self.ood_reference is not None

    def score(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities (N,), OOD distances (N,) or None for a model without the gate)."""
        if not self.has_ood:
            return self.infer(batch), None
        self._check_batch(batch)
        if len(batch) == 0:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32)
        probs, features = self._infer_features(np.ascontiguousarray(batch))
        return self._checked_probs(probs, len(batch)), self._distances(features, len(batch))

    def _distances(self, features: np.ndarray, n: int) -> np.ndarray:
        ref = self.ood_reference
        if features.shape != (n, ref.features):
            raise EngineError(f"{self.backend}: the model's features have shape {features.shape}, its OOD reference "
                              f"expects ({n}, {ref.features})")
        return ref.distances(features)

    def _checked_probs(self, probs, n: int) -> np.ndarray:
        probs = np.asarray(probs, dtype=np.float32).reshape(n, -1)
        if probs.shape[1] != 1:
            raise EngineError(f"{self.backend}: model output has shape {probs.shape}, expected (N, 1)")
        return probs[:, 0]

    def _infer_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, the members' pooled features concatenated (N, F)); only with an OOD reference."""
        raise NotImplementedError

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self._check_batch(batch)
        if len(batch) == 0:
            return np.zeros(0, dtype=np.float32)
        return self._checked_probs(self._infer(np.ascontiguousarray(batch)), len(batch))

    @abstractmethod
    def _infer(self, batch: np.ndarray) -> np.ndarray: ...

    @property
    def has_context(self) -> bool:
        return self.manifest.context is not None

    def refine(self, grid: np.ndarray) -> np.ndarray:
        """The context stage on a case's grid: (1, 2, H, W) float32 -> refined probabilities (H, W)."""
        if not self.has_context:
            raise EngineError(f"model {self.manifest.name} {self.manifest.version} has no context stage")
        if not (isinstance(grid, np.ndarray) and grid.dtype == np.float32 and grid.ndim == 4
                and grid.shape[:2] == (1, 2) and grid.shape[2] > 0 and grid.shape[3] > 0):
            raise EngineError(f"context grid must be float32 (1, 2, H, W), got "
                              f"{getattr(grid, 'dtype', type(grid))} {getattr(grid, 'shape', '')}")
        out = np.asarray(self._refine(np.ascontiguousarray(grid)), dtype=np.float32)
        if out.shape != (1, 1) + grid.shape[2:]:
            raise EngineError(f"{self.backend}: context output has shape {out.shape}, expected (1, 1, H, W)")
        return out[0, 0]

    @abstractmethod
    def _refine(self, grid: np.ndarray) -> np.ndarray: ...

    @property
    def has_cam(self) -> bool:
        return self.manifest.cam is not None

    def cam(self, batch: np.ndarray) -> np.ndarray:
        """Class-activation maps of a few patches (the ones that drove a call): uint8 (N, H, W, 3) -> float32
        (N, members, h, w), each member's logit at every position of its last feature map (the mean over
        positions is the member's logit)."""
        if not self.has_cam:
            raise EngineError(f"model {self.manifest.name} {self.manifest.version} has no CAM head")
        self._check_batch(batch)
        out = np.asarray(self._cam(np.ascontiguousarray(batch)), dtype=np.float32)
        if out.ndim != 4 or out.shape[:2] != (len(batch), self.manifest.cam.members):
            raise EngineError(f"{self.backend}: CAM output has shape {out.shape}, expected (N, "
                              f"{self.manifest.cam.members}, h, w)")
        return out

    @abstractmethod
    def _cam(self, batch: np.ndarray) -> np.ndarray: ...

    def scorer(self) -> "Scorer":
        """A non-blocking front end for streaming: submit batches, collect results later."""
        return Scorer(self)

    def _check_batch(self, batch: np.ndarray) -> None:
        spec = self.manifest.input
        want = (spec.height, spec.width, spec.channels)
        if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8:
            raise EngineError(f"batch must be a uint8 numpy array, got {getattr(batch, 'dtype', type(batch))}")
        if batch.ndim != 4 or batch.shape[1:] != want:
            raise EngineError(f"batch has shape {batch.shape}, the model expects (N, {want[0]}, {want[1]}, {want[2]})")

    @property
    def model_ref(self) -> ModelRef:
        m = self.manifest
        # plain text (str, not the EngineName): it goes into logs, JSON and the store as it is
        return ModelRef(m.name, m.version, m.digest, str(self.backend))


class OpenVINOEngine(Engine):
    """The INT8 OpenVINO IR on the CPU, compiled once per process.

    Compiled with the THROUGHPUT hint (one stream per core here): on the 2-core bench PC it scores more patches
    a second than the LATENCY hint (docs/performance.md, "Why the code is shaped so"). ``infer`` splits a batch
    over the streams too, so even the synchronous path uses every core.
    """

    backend = EngineName.OPENVINO
    CHUNK = 128

    def __init__(self, model_dir: Path, manifest: ModelManifest, *, precision: str | None = None,
                 threads: int = 0):
        super().__init__(model_dir, manifest)
        ov = load_runtime(EngineName.OPENVINO, "openvino", "OpenVINO")

        xml = read_verified(model_dir, manifest.files.openvino, manifest)
        weights = read_verified(model_dir, manifest.files.openvino_weights, manifest)
        config: dict[str, str] = {"PERFORMANCE_HINT": "THROUGHPUT"}
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        if threads:  # a share of the cores, when several processes score side by side (appliance batch)
            config["INFERENCE_NUM_THREADS"] = str(threads)
        try:
            core = ov.Core()
            model = core.read_model(model=xml, weights=ov.Tensor(np.frombuffer(weights, dtype=np.uint8)))
            if manifest.ood is not None:  # the pooled features as extra outputs: the same graph, nothing recomputed
                model.add_outputs(manifest.ood.features)
            self._compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as exc:
            raise EngineError(f"OpenVINO could not load {self.model_dir / manifest.files.openvino}: {exc}") from None
        self.jobs = 2 * max(1, int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._requests = [self._compiled.create_infer_request() for _ in range(self.jobs)]
        self._context = None
        if manifest.context is not None:  # tiny FP32 graph over the grid, dynamic height and width
            c = manifest.context
            graph = read_verified(model_dir, c.openvino, manifest)
            ctx_weights = read_verified(model_dir, c.openvino_weights, manifest)
            try:
                cm = core.read_model(model=graph, weights=ov.Tensor(np.frombuffer(ctx_weights, dtype=np.uint8)))
                self._context = core.compile_model(cm, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                               "PERFORMANCE_HINT": "LATENCY"})
            except RuntimeError as exc:
                raise EngineError(f"OpenVINO could not load {self.model_dir / c.openvino}: {exc}") from None
        self._features = self._cam_head = None  # compiled at the first cam(): most processes never draw one
        self._cam_lock = threading.Lock()
        self._core, self._threads = core, threads
        if manifest.cam is not None:  # its files are checked now, with the others
            read_verified(model_dir, manifest.cam.openvino, manifest)
            read_verified(model_dir, manifest.cam.openvino_weights, manifest)

    def _finished(self, batch: np.ndarray):
        """The batch split over the requests, CHUNK patches each: each request in order, once it has finished."""
        chunks = [batch[i : i + self.CHUNK] for i in range(0, len(batch), self.CHUNK)]
        for start in range(0, len(chunks), self.jobs):
            group = list(zip(self._requests, chunks[start : start + self.jobs]))
            for req, chunk in group:
                req.start_async({0: chunk})
            for req, _ in group:
                req.wait()
                yield req

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return np.concatenate([req.get_output_tensor(0).data.copy().reshape(-1) for req in self._finished(batch)])

    def _infer_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, features = zip(*(self.outputs_of(req) for req in self._finished(batch)))
        return np.concatenate(probs), np.concatenate(features)

    def outputs_of(self, req) -> tuple[np.ndarray, np.ndarray | None]:
        """A finished request's probabilities and, with an OOD reference, its features (N, F), as copies."""
        probs = np.array(req.get_output_tensor(0).data, dtype=np.float32).reshape(-1)
        if self.ood_reference is None:
            return probs, None
        n_out = len(self._compiled.outputs)
        return probs, np.concatenate([np.asarray(req.get_output_tensor(i).data, dtype=np.float32).reshape(len(probs), -1)
                                      for i in range(1, n_out)], axis=1)

    def _refine(self, grid: np.ndarray) -> np.ndarray:
        return self._context({0: grid})[0]

    def _load_cam(self) -> None:
        """The same verified INT8 model giving its last feature maps, and the head over them."""
        ov = load_runtime(EngineName.OPENVINO, "openvino", "OpenVINO")
        c = self.manifest.cam
        head_xml = read_verified(self.model_dir, c.openvino, self.manifest)
        head_weights = read_verified(self.model_dir, c.openvino_weights, self.manifest)
        latency = {"PERFORMANCE_HINT": "LATENCY",
                   **({"INFERENCE_NUM_THREADS": str(self._threads)} if self._threads else {})}
        try:
            xml = read_verified(self.model_dir, self.manifest.files.openvino, self.manifest)
            weights = read_verified(self.model_dir, self.manifest.files.openvino_weights, self.manifest)
            fm = self._core.read_model(model=xml, weights=ov.Tensor(np.frombuffer(weights, dtype=np.uint8)))
            fm.add_outputs(c.feature_maps)
            head = self._core.read_model(model=head_xml, weights=ov.Tensor(np.frombuffer(head_weights, dtype=np.uint8)))
            self._cam_head = self._core.compile_model(head, "CPU", {"INFERENCE_PRECISION_HINT": "f32", **latency})
            self._features = self._core.compile_model(fm, "CPU", latency)
        except RuntimeError as exc:
            raise EngineError(f"OpenVINO could not load the CAM head {self.model_dir / c.openvino}: {exc}") from None

    def _cam(self, batch: np.ndarray) -> np.ndarray:
        with self._cam_lock:
            if self._features is None:
                self._load_cam()
        out = self._features({0: batch})
        maps = [out[self._features.output(name)] for name in self.manifest.cam.feature_maps]
        return self._cam_head({f"f{i}": m for i, m in enumerate(maps)})[0]

    def scorer(self) -> "Scorer":
        return AsyncScorer(self, self.jobs)


class OnnxRuntimeEngine(Engine):
    """The FP32 ONNX model on ONNX Runtime's CPU provider: the fallback when OpenVINO is unavailable."""

    backend = EngineName.ONNXRUNTIME

    def __init__(self, model_dir: Path, manifest: ModelManifest, *, threads: int = 0):
        super().__init__(model_dir, manifest)
        ort = load_runtime(EngineName.ONNXRUNTIME, "onnxruntime", "ONNX Runtime")

        data = read_verified(model_dir, manifest.files.onnx, manifest)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self._outputs: list[str] | None = None
        try:
            if manifest.ood is not None:  # the pooled features as extra graph outputs
                import onnx

                graph = onnx.load_from_string(data)
                self._outputs = [graph.graph.output[0].name, *manifest.ood.features]
                graph.graph.output.extend(onnx.ValueInfoProto(name=name) for name in manifest.ood.features)
                data = graph.SerializeToString()
            self._session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors; name the file and stop.
            raise EngineError(f"ONNX Runtime could not load {self.model_dir / manifest.files.onnx}: {exc}") from None
        self._input = self._session.get_inputs()[0].name
        self._context = None
        if manifest.context is not None:
            c = manifest.context
            graph = read_verified(model_dir, c.onnx, manifest)
            try:
                self._context = ort.InferenceSession(graph, sess_options=opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # as above
                raise EngineError(f"ONNX Runtime could not load {self.model_dir / c.onnx}: {exc}") from None
        self._features = self._cam_head = None  # loaded at the first cam(): most processes never draw one
        self._cam_lock = threading.Lock()
        self._opts = opts
        if manifest.cam is not None:  # its file is checked now, with the others
            read_verified(model_dir, manifest.cam.onnx, manifest)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: batch})[0]

    def _infer_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, *features = self._session.run(self._outputs, {self._input: batch})
        return probs, np.concatenate([f.reshape(len(batch), -1) for f in features], axis=1)

    def _load_cam(self) -> None:
        """The same verified model giving its last feature maps (added as graph outputs), and the head."""
        import onnx

        ort = load_runtime(EngineName.ONNXRUNTIME, "onnxruntime", "ONNX Runtime")
        c = self.manifest.cam
        head = read_verified(self.model_dir, c.onnx, self.manifest)
        try:
            full = onnx.load_from_string(read_verified(self.model_dir, self.manifest.files.onnx, self.manifest))
            full.graph.output.extend(onnx.ValueInfoProto(name=name) for name in c.feature_maps)
            self._cam_head = ort.InferenceSession(head, sess_options=self._opts, providers=["CPUExecutionProvider"])
            self._features = ort.InferenceSession(full.SerializeToString(), sess_options=self._opts,
                                                  providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors; name the file and stop.
            raise EngineError(f"ONNX Runtime could not load the CAM head {self.model_dir / c.onnx}: {exc}") from None

    def _cam(self, batch: np.ndarray) -> np.ndarray:
        with self._cam_lock:
            if self._features is None:
                self._load_cam()
        maps = self._features.run(self.manifest.cam.feature_maps, {self._input: batch})
        return self._cam_head.run(["cam"], {f"f{i}": m for i, m in enumerate(maps)})[0]

    def _refine(self, grid: np.ndarray) -> np.ndarray:
        return self._context.run(None, {"grid": grid})[0]


ENGINES: dict[EngineName, type[Engine]] = {EngineName.OPENVINO: OpenVINOEngine,
                                           EngineName.ONNXRUNTIME: OnnxRuntimeEngine}


def load_engine(model_dir: Path, backend: str = EngineName.OPENVINO, **options) -> Engine:
    """Read and validate the manifest in ``model_dir``, verify the files' hashes and load the backend. The
    process's numpy BLAS is kept to one thread from then on (one_blas_thread)."""
    if backend not in ENGINES:
        raise EngineError(f"unknown engine backend {backend!r}; choose one of {', '.join(ENGINES)}")
    one_blas_thread()
    return ENGINES[EngineName(backend)](model_dir, read_manifest(model_dir), **options)
