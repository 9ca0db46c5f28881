"""Both engines on the real committed model, and refusal of tampered or malformed model folders."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from appliance.model.engine import load_engine
from appliance.model.manifest import read_manifest
from appliance.errors import EngineError, ManifestError, ModelIntegrityError
from appliance.offline.evaluation import find_labelled_images
from appliance.pipeline.patches import pad_to
from appliance.offline.sources import read_image

from tests.conftest import IDC, MODEL_DIR
from tests.cli import appliance


@pytest.fixture(scope="module")
def fixture_batch():
    items = find_labelled_images(IDC)
    batch = np.stack([pad_to(read_image(i.path), 50, 255) for i in items])
    labels = np.array([i.label for i in items])
    return batch, labels


def test_both_engines_score_real_patches_and_agree(ov_engine, ort_engine, fixture_batch):
    batch, labels = fixture_batch
    p_ov = ov_engine.infer(batch)
    p_ort = ort_engine.infer(batch)
    assert p_ov.shape == p_ort.shape == (len(batch),)
    assert ((p_ov >= 0) & (p_ov <= 1)).all() and ((p_ort >= 0) & (p_ort <= 1)).all()
    # INT8 OpenVINO against FP32 ONNX Runtime: close, and the same call on nearly every patch
    t = ov_engine.manifest.decision.patch_threshold
    assert np.abs(p_ov - p_ort).mean() < 0.05
    assert ((p_ov >= t) == (p_ort >= t)).mean() >= 0.95
    # the model is not constant: IDC patches score higher than non-IDC ones on these unseen patients
    assert p_ov[labels == 1].mean() > p_ov[labels == 0].mean() + 0.2


def test_engine_refuses_batches_it_cannot_score(ov_engine):
    with pytest.raises(EngineError, match="uint8"):
        ov_engine.infer(np.zeros((2, 50, 50, 3), dtype=np.float32))
    with pytest.raises(EngineError, match=r"expects \(N, 50, 50, 3\)"):
        ov_engine.infer(np.zeros((2, 64, 64, 3), dtype=np.uint8))
    assert ov_engine.infer(np.zeros((0, 50, 50, 3), dtype=np.uint8)).shape == (0,)


def test_both_engines_run_the_same_context_stage(ov_engine, ort_engine):
    """The context stage (FP32 in both engines) over a real-shaped grid: a tumour-like block beside scattered
    hot cells. Neighbours lift the block's cells and pull a lone hot cell down."""
    assert ov_engine.has_context and ort_engine.has_context
    rng = np.random.default_rng(3)
    grid = np.zeros((1, 2, 30, 40), np.float32)
    grid[0, 1, 2:28, 2:38] = 1.0
    grid[0, 0] = rng.uniform(0.0, 0.2, (30, 40)) * grid[0, 1]
    grid[0, 0, 10:20, 10:20] = rng.uniform(0.6, 0.95, (10, 10))
    grid[0, 0, 5, 30] = 0.9  # alone among benign cells
    r_ov, r_ort = ov_engine.refine(grid), ort_engine.refine(grid)
    assert r_ov.shape == r_ort.shape == (30, 40)
    assert np.abs(r_ov - r_ort).max() < 1e-4
    tissue = grid[0, 1] > 0
    assert ((r_ov[tissue] >= 0) & (r_ov[tissue] <= 1)).all() and (r_ov[~tissue] == 0).all()
    assert r_ov[12:18, 12:18].mean() > grid[0, 0, 12:18, 12:18].mean() - 0.05
    assert r_ov[5, 30] < 0.9 and r_ov[12:18, 12:18].min() > r_ov[5, 30]


def test_a_case_refined_window_by_window_equals_one_grid(ov_engine):
    """A case spread over a large area is refined in windows padded by the stage's reach: same values."""
    from appliance.pipeline.context import refine

    rng = np.random.default_rng(5)
    cells = rng.choice(60 * 70, size=1500, replace=False)
    gx, gy = cells % 70 + 1000, cells // 70 - 40  # any integers, negative ones too
    prob = rng.uniform(0, 1, len(cells))
    whole = refine(ov_engine, gx, gy, prob)
    assert np.abs(refine(ov_engine, gx, gy, prob, window=16) - whole).max() <= 2e-6


def test_the_context_stage_refuses_grids_it_cannot_read(ov_engine):
    with pytest.raises(EngineError, match="float32"):
        ov_engine.refine(np.zeros((1, 2, 4, 4), np.float64))
    with pytest.raises(EngineError, match=r"\(1, 2, H, W\)"):
        ov_engine.refine(np.zeros((1, 3, 4, 4), np.float32))


def _copy_model(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(MODEL_DIR, dst, ignore=shutil.ignore_patterns("work"))
    return dst


@pytest.mark.parametrize(
    "backend,filename",
    [("openvino", "model.int8.bin"), ("openvino", "model.int8.xml"), ("onnxruntime", "model.fp32.onnx"),
     ("openvino", "context.bin"), ("openvino", "context.xml"), ("onnxruntime", "context.onnx")],
)
def test_tampered_model_file_is_refused_naming_file_and_hash(tmp_path, backend, filename):
    model = _copy_model(tmp_path)
    path = model / filename
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one byte
    path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError) as err:
        load_engine(model, backend)
    msg = str(err.value)
    assert filename in msg and "sha256 mismatch" in msg


def test_cli_reports_tampered_model_without_traceback(tmp_path):
    model = _copy_model(tmp_path)
    with open(model / "model.int8.bin", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    proc = appliance("models", "verify", model)
    assert proc.returncode == 1
    assert "model.int8.bin" in proc.stderr and "sha256 mismatch" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_manifest_with_unknown_key_or_missing_hash_is_refused(tmp_path):
    model = _copy_model(tmp_path)
    manifest = json.loads((model / "manifest.json").read_text())
    (model / "manifest.json").write_text(json.dumps(manifest | {"surprise": 1}))
    with pytest.raises(ManifestError, match="surprise"):
        load_engine(model)
    del manifest["sha256"]["model.fp32.onnx"]
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="model.fp32.onnx"):
        load_engine(model)
    (model / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_engine(model)


def test_models_list_shows_hash_status(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    good = shutil.copytree(MODEL_DIR, root / "good", ignore=shutil.ignore_patterns("work"))
    bad = shutil.copytree(MODEL_DIR, root / "bad", ignore=shutil.ignore_patterns("work"))
    (bad / "model.fp32.onnx").write_bytes((good / "model.fp32.onnx").read_bytes()[:-1] + b"\x00")
    proc = appliance("models", "list", "--root", root)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip().split()[0] in ("good", "bad")}
    assert "hashes ok" in lines["good"]
    assert "1 FILE(S) FAIL THEIR HASH" in lines["bad"]
    assert "model.fp32.onnx" in proc.stdout


def test_an_engine_that_cannot_be_imported_is_one_sentence(tmp_path):
    """A broken OpenVINO install (its shared library missing) as the daemon meets it: `openvino` raises
    ImportError on import. `models verify` says which engine, why, and what to do; no traceback."""
    broken = tmp_path / "site" / "openvino"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("libopenvino.so.2540: cannot open shared object file")\n')
    env = dict(__import__("os").environ, PYTHONPATH=f"{broken.parent}")
    run = subprocess.run([sys.executable, "-m", "appliance.cli", "models", "verify", str(MODEL_DIR)], env=env,
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        "Error: OpenVINO cannot be loaded on this machine (libopenvino.so.2540: cannot open shared object file); "
        "reinstall the appliance (`pip install -e .`) or choose the other engine (engine = \"onnxruntime\")"]
    ort = subprocess.run([sys.executable, "-m", "appliance.cli", "models", "verify", str(MODEL_DIR), "--engine",
                          "onnxruntime"], env=env, capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert ort.returncode == 0, ort.stderr  # the fallback engine still works on the same machine


@pytest.mark.parametrize("change, message", [
    ({"case_rule": "top-k-mean-refined"}, "must give decision.early"),
    ({"case_rule": "top-k-mean-refined", "early": {"rule": "top-k-mean-refined", "top_k": 3, "threshold": 0.9}},
     "can fall as tiles arrive"),
    ({"case_threshold": 1.5}, "is a probability"),
])
def test_a_manifest_whose_early_call_could_be_reversed_is_refused(tmp_path, change, message):
    """The early positive must rest on a rule that never falls; a refined final rule needs one."""
    model = tmp_path / "m"
    shutil.copytree(MODEL_DIR, model, ignore=shutil.ignore_patterns("work"))
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["decision"].pop("early", None)
    manifest["decision"].update(change)
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=message):
        read_manifest(model)


def test_a_refined_final_rule_needs_a_context_stage(tmp_path):
    model = tmp_path / "m"
    shutil.copytree(MODEL_DIR, model, ignore=shutil.ignore_patterns("work"))
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["decision"].update(case_rule="top-k-mean-refined",
                                early={"rule": "top-k-mean", "top_k": 3, "threshold": 0.9})
    manifest.pop("context")
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="needs a context stage"):
        read_manifest(model)


def test_a_first_stage_final_rule_is_its_own_early_rule(tmp_path):
    model = tmp_path / "m"
    shutil.copytree(MODEL_DIR, model, ignore=shutil.ignore_patterns("work"))
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["decision"].update(case_rule="top-k-mean", top_k=5,
                                early={"rule": "top-k-mean", "top_k": 3, "threshold": 0.9})
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="its own early rule"):
        read_manifest(model)


def test_the_model_description_is_plain_data_as_the_ready_line_and_the_store_show_it(ov_engine, ort_engine):
    """The backend is the plain word: the [ready] line once showed <EngineName.OPENVINO: 'openvino'>."""
    for engine, word in ((ov_engine, "openvino"), (ort_engine, "onnxruntime")):
        backend = engine.model_ref.backend
        assert type(backend) is str and repr(backend) == repr(word)


def test_both_engines_draw_class_activation_maps_that_average_to_the_model_s_own_score(ov_engine, ort_engine,
                                                                                       fixture_batch):
    """CAM: the mean over positions of each member's map is that member's logit, so the maps give back the
    first stage's probability: exactly on ONNX Runtime (fp32 throughout), closely on OpenVINO (its INT8
    feature maps through the fp32 head, against its INT8 pool and head)."""
    batch = fixture_batch[0][:12]
    for engine, tolerance in ((ort_engine, 1e-5), (ov_engine, 0.03)):
        cams = engine.cam(batch)
        assert cams.shape == (12, engine.manifest.cam.members, *engine.manifest.cam.map_size)
        implied = (1 / (1 + np.exp(-cams.mean(axis=(2, 3))))).mean(axis=1)
        assert np.abs(implied - engine.infer(batch)).max() < tolerance, engine.backend
    with pytest.raises(EngineError, match="uint8"):
        ov_engine.cam(batch.astype(np.float32))


def test_a_process_that_loads_a_model_keeps_numpy_s_blas_to_one_thread():
    """Next to OpenVINO's threads on 2 cores, BLAS's own threads only wait (R1: 38.1 s with them, 26.6 s without):
    checked in a fresh process, where BLAS starts with its default thread count."""
    code = ("import json, sys; from threadpoolctl import threadpool_info; from appliance.model.engine import load_engine\n"
            "blas = lambda: [p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas']\n"
            "before = blas(); load_engine(sys.argv[1], 'openvino'); print(json.dumps([before, blas()]))")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code, str(MODEL_DIR)], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr
    before, after = json.loads(out.stdout)
    assert after and set(after) == {1}
    assert max(before) > 1  # the default really was more (this machine has 2 cores)
