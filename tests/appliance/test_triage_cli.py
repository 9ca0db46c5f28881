"""`appliance triage` and `appliance models evaluate` as a user runs them, on real committed data."""

import csv
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from appliance.model.metrics import roc_auc
from appliance.offline.sources import TILE_NAME
from appliance.offline.triage import triage_path
from tests.conftest import IDC, MODEL_DIR
from tests.cli import appliance

ENV_KEYS = ("verdict", "score", "threshold", "reasons", "model", "timings_ms", "research_use_only", "patches")


def run_cli(*args, check=True):
    proc = appliance(*args)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def test_triage_patient_folder_writes_the_documented_json(tmp_path):
    out = tmp_path / "r.json"
    proc = run_cli("triage", IDC / "9267", "--json", out)
    result = json.loads(out.read_text())
    for key in ENV_KEYS:
        assert key in result
    assert result["verdict"] == "suspicious"  # patient 9267 (IDC-positive patches), by the shipped model
    assert result["research_use_only"] is True
    assert set(result["model"]) >= {"name", "version", "sha256"}
    assert len(result["model"]["sha256"]) == 64
    positions = {tuple(map(int, TILE_NAME.search(p.name).groups())) for p in (IDC / "9267").rglob("*.png")}
    assert result["patches"], "every patch the model scored must be listed"
    for p in result["patches"]:
        assert (p["x"], p["y"]) in positions
        assert 0.0 <= p["probability"] <= 1.0
        assert 0 < p["w"] <= 50 and 0 < p["h"] <= 50
    # the score is the case rule (here the mean of the top k) on the first-stage probabilities
    assert result["case_rule"] == "top-k-mean"
    top = sorted((p["first_stage"] for p in result["patches"]), reverse=True)[: result["top_k"]]
    assert result["score"] == pytest.approx(np.mean(top), abs=1e-5)
    assert result["verdict"] in proc.stdout and "not for diagnosis" in proc.stdout.lower()


def test_triage_single_image_reports_patches_in_image_coordinates(tmp_path, demo_image):
    crop = demo_image[700:1100, 500:1000]  # a tissue-rich 500x400 region of the demo slide
    img = tmp_path / "crop.png"
    Image.fromarray(crop).save(img)
    out = tmp_path / "r.json"
    run_cli("triage", img, "--json", out, "--tile-size", 200)
    result = json.loads(out.read_text())
    xs = {p["x"] for p in result["patches"]}
    ys = {p["y"] for p in result["patches"]}
    assert xs <= set(range(0, 500, 50)) and ys <= set(range(0, 400, 50))
    assert 20 <= len(result["patches"]) <= 80
    scored = {(p["x"], p["y"]) for p in result["patches"]}
    for y in range(0, 400, 50):
        for x in range(0, 500, 50):
            if (crop[y:y + 50, x:x + 50] >= 225).all():  # pure glass is never scored
                assert (x, y) not in scored
    assert result["tiles"] == 6  # ceil(500/200) x ceil(400/200)


def test_blank_slide_cannot_be_called(tmp_path):
    img = tmp_path / "glass.png"
    Image.fromarray(np.full((300, 300, 3), 245, dtype=np.uint8)).save(img)
    out = tmp_path / "r.json"
    run_cli("triage", img, "--json", out)
    result = json.loads(out.read_text())
    assert result["verdict"] == "cannot-call"
    assert [r["code"] for r in result["reasons"]] == ["no-tissue"]
    assert result["patches"] == []


def test_corrupt_and_foreign_files_in_a_tile_folder(tmp_path, ov_engine):
    folder = tmp_path / "case"
    shutil.copytree(IDC / "12826", folder)
    (folder / "0" / "12826_idx5_x9999_y9999_class0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "notes.txt").write_text("not a tile")
    (folder / "0" / "no_position.png").write_bytes(b"whatever")
    result = triage_path(ov_engine, folder)
    assert [s["name"].endswith("x9999_y9999_class0.png") for s in result["skipped_inputs"]] == [True]
    assert "not a readable image" in result["skipped_inputs"][0]["reason"]
    assert result["tiles"] == len(list((IDC / "12826").rglob("*.png")))


def test_triage_of_missing_input_is_a_clean_error(tmp_path):
    proc = run_cli("triage", tmp_path / "nope.tif", "--json", tmp_path / "r.json", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00garbage")
    proc = run_cli("triage", bad, "--json", tmp_path / "r.json", check=False)
    assert proc.returncode == 1 and "bad.tif" in proc.stderr and "Traceback" not in proc.stderr


def test_models_evaluate_writes_rows_and_metrics_that_match_them(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(IDC, data)
    (data / "stray.png").write_bytes(b"ignored: not in a patient folder")
    pred = tmp_path / "pred.csv"
    proc = run_cli("models", "evaluate", data, "--predictions", pred, "--json", tmp_path / "m.json")
    rows = list(csv.DictReader(open(pred)))
    assert len(rows) == len(list(IDC.rglob("*.png")))
    assert list(rows[0]) == ["path", "label", "probability", "predicted", "first_stage"]
    threshold = json.loads((MODEL_DIR / "manifest.json").read_text())["decision"]["patch_threshold"]
    for r in rows:
        assert int(r["predicted"]) == int(float(r["probability"]) >= threshold)
        assert r["label"] == r["path"].split("/")[-2]
    auc = roc_auc([int(r["label"]) for r in rows], [float(r["probability"]) for r in rows])
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["patches"]["auc"] == pytest.approx(auc)
    assert metrics["n_patients"] == 3
    assert re.search(r"patches\s+123\s+\d+\s+0\.\d{3}", proc.stdout)
    assert "patients" in proc.stdout and "AUC" in proc.stdout


def test_models_evaluate_accepts_one_patient_folder(tmp_path):
    pred = tmp_path / "pred.csv"
    proc = run_cli("models", "evaluate", IDC / "10269", "--predictions", pred)
    rows = list(csv.DictReader(open(pred)))
    assert len(rows) == len(list((IDC / "10269").rglob("*.png")))
    assert "patients: 1;" in proc.stdout


def test_a_spooled_case_can_be_triaged_again_from_its_npy_tiles(ov_engine, tmp_path, demo_image):
    """The spool's raw .npy tiles are a valid input: re-triage gives the same call as the image itself."""
    from appliance.store.spool import TileSpool
    from appliance.offline.sources import tiles_from_image

    crop = np.ascontiguousarray(demo_image[:600, 500:1300])
    spool = TileSpool(tmp_path / "spool")
    spool.begin_case("CASE-1", {})
    for i, t in enumerate(tiles_from_image(crop, 200)):
        spool.store_tile("CASE-1", i, t.x, t.y, np.ascontiguousarray(t.pixels))
    (spool.case_dir("CASE-1") / "tile-000099_x0_y0.npy").write_bytes(b"not a numpy file")
    image = tmp_path / "crop.png"
    Image.fromarray(crop).save(image)
    from_spool = triage_path(ov_engine, spool.case_dir("CASE-1"))
    from_image = triage_path(ov_engine, image)
    assert from_spool["verdict"] == from_image["verdict"] and from_spool["score"] == from_image["score"]
    assert [s["name"].endswith("tile-000099_x0_y0.npy") for s in from_spool["skipped_inputs"]] == [True]
    assert "not a readable .npy tile" in from_spool["skipped_inputs"][0]["reason"]


def test_the_json_result_is_the_summary_file_exactly(tmp_path):
    """What `triage --json` writes and the case's summary.json are one document: nothing is added to the
    result after the file is written (the outputs' timing once was)."""
    out, folder = tmp_path / "r.json", tmp_path / "case"
    run_cli("triage", IDC / "10269", "--json", out, "--out", folder)
    printed, summary = json.loads(out.read_text()), json.loads((folder / "summary.json").read_text())
    assert printed == summary
    assert summary["case_id"] == "10269" and "summary.json" in summary["outputs"]
    assert "outputs" not in summary["timings_ms"]


def test_an_accession_given_to_triage_is_in_the_summary_and_a_malformed_one_is_refused_first(tmp_path):
    """`--accession` is the lab's order number: it is written into summary.json (the case's record on disk);
    one that is not an accession number (a space, a delimiter) is refused before any work, saying what is
    allowed, and writes nothing."""
    folder = tmp_path / "case"
    run_cli("triage", IDC / "10269", "--out", folder, "--accession", "S26-01234")
    assert json.loads((folder / "summary.json").read_text())["accession"] == "S26-01234"
    bad = run_cli("triage", IDC / "10269", "--out", tmp_path / "bad", "--accession", "S26 01|2", check=False)
    assert bad.returncode == 2 and "is not an accession number" in bad.stderr and not (tmp_path / "bad").exists()
    plain = tmp_path / "plain.json"
    run_cli("triage", IDC / "10269", "--json", plain)
    assert "accession" not in json.loads(plain.read_text())
