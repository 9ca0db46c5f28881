"""The out-of-distribution gate: the committed model's own pooled features, read out by both engines beside each
probability, their distance to the development reference, the case's score in summary.json, the API's case
record and the drift watch; a tampered reference is refused."""

import hashlib
import json
import shutil

import numpy as np
import pytest

from appliance.errors import EngineError, ModelIntegrityError
from appliance.model.engine import load_engine
from appliance.model.ood import OodReference, case_score, fit_reference
from appliance.offline.evaluation import find_labelled_images
from appliance.offline.sources import read_image
from appliance.offline.triage import triage_path
from appliance.pipeline import decision
from appliance.pipeline.patches import pad_to
from appliance.service.drift import MEASURES
from tests.conftest import IDC, MODEL_DIR

MANIFEST = json.loads((MODEL_DIR / "manifest.json").read_text())


@pytest.fixture(scope="module")
def fixture_batch():
    items = find_labelled_images(IDC)
    return np.stack([pad_to(read_image(i.path), 50, 255) for i in items])


def test_the_model_carries_its_gate_and_the_limit_its_calibration_set():
    ood = MANIFEST["ood"]
    assert ood["file"] in MANIFEST["sha256"] and len(ood["features"]) == MANIFEST["cam"]["members"]
    gates = MANIFEST["metrics"]["shift_gates"]
    assert ood["max_score"] == gates["ood_max_score"] > 1  # a typical development patch reads about 1
    assert MANIFEST["stain"]["max_angle_deg"] == gates["stain_limit"]["limit_deg"]


def test_both_engines_give_each_patch_a_distance_beside_its_probability(ov_engine, ort_engine, fixture_batch):
    for engine in (ov_engine, ort_engine):
        probs, distances = engine.score(fixture_batch)
        assert np.array_equal(probs, engine.infer(fixture_batch))  # the features change no probability
        assert distances.shape == (len(fixture_batch),) and np.isfinite(distances).all() and (distances > 0).all()
    # INT8 (OpenVINO, what the limit was set on) and FP32 (ONNX Runtime, the fallback) read the same cases alike
    ov_case = case_score(ov_engine.score(fixture_batch)[1])
    ort_case = case_score(ort_engine.score(fixture_batch)[1])
    assert abs(ov_case - ort_case) < 0.15 * ov_case
    empty = ov_engine.score(fixture_batch[:0])
    assert empty[0].shape == empty[1].shape == (0,)


def test_the_distance_is_a_mahalanobis_distance_of_the_features():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 12)) * np.linspace(3, 0.5, 12)
    ref = fit_reference(x, 4)
    assert abs(float(np.median(ref.distances(x))) - 0.9) < 0.15  # median of chi2(12)/12 is about 0.92
    near = np.median(ref.distances(x[:100]))
    along_widest = np.median(ref.distances(x[:100] + 8 * np.eye(12)[0]))  # inside the 4 components, sd 3
    along_narrowest = np.median(ref.distances(x[:100] + 8 * np.eye(12)[11]))  # outside them, sd 0.5
    # the same move counts for more where the development features vary less
    assert near < along_widest < along_narrowest and along_narrowest > 3 * near
    again = OodReference.from_bytes(ref.to_bytes())
    assert np.array_equal(again.distances(x[:5]), ref.distances(x[:5]))


def _copy_model(tmp_path):
    return shutil.copytree(MODEL_DIR, tmp_path / "model", ignore=shutil.ignore_patterns("work"))


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_a_tampered_reference_is_refused(tmp_path, backend):
    model = _copy_model(tmp_path)
    path = model / MANIFEST["ood"]["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256 mismatch"):
        load_engine(model, backend)


def test_a_reference_that_is_not_one_is_refused_even_with_its_hash(tmp_path):
    model = _copy_model(tmp_path)
    path = model / MANIFEST["ood"]["file"]
    path.write_bytes(b"not an npz file at all")
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["sha256"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="not a readable OOD reference"):
        load_engine(model, "openvino")


def test_the_demo_case_reads_in_distribution_and_says_so_everywhere(ov_engine, demo_image, tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "demo.tif", demo_image)
    r = triage_path(ov_engine, tmp_path / "demo.tif")
    assert r["verdict"] == "suspicious"
    assert 0 < r["qc"]["ood_score"] <= r["qc"]["ood_max_score"] == MANIFEST["ood"]["max_score"]
    assert r["measures"]["ood"] == r["qc"]["ood_score"] and "ood" in MEASURES


def test_the_gate_refuses_a_case_past_its_limit_with_words_a_technician_can_act_on():
    assert decision.ood_reasons(None, 3.0) == [] and decision.ood_reasons(2.9, 3.0) == []
    (reason,) = decision.ood_reasons(3.2, 3.0)
    assert reason.code == "out-of-distribution" and "Unlike the cases the model was validated on" in reason.message
    assert "3.20" in reason.message and "3.00" in reason.message and "rescan" in reason.message
