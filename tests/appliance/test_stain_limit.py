"""The stain-out-of-range limit comes from the model's own measurement: the build turned every development
patient's haematoxylin, in the patient's own stain basis and in a fixed Ruifrok-Johnston one, and found the
smaller angle where either out-of-fold AUC falls by more than 0.02. A real slide
(the bundled demo case, IDC 10253, which no model trained on) turned inside that limit gets a call; turned
beyond it, the case is refused as stain-out-of-range."""

import json

import pytest
import tifffile

from appliance.offline.triage import triage_path
from tests.conftest import MODEL_DIR
from tests.images import stain_turned

MANIFEST = json.loads((MODEL_DIR / "manifest.json").read_text())
LIMIT = MANIFEST["stain"]["max_angle_deg"]
# The demo slide's own stain lies 2-4 deg from the reference; a turn of t deg is judged at about t + 1 deg (up to
# 30; larger turns push optical densities below zero and are judged smaller). 6 deg either side is a clear margin.
INSIDE, BEYOND = LIMIT - 6, LIMIT + 6


def test_the_model_carries_the_limit_its_build_measured():
    """Two curves, one per stain transform (each patient's own basis turned; a fixed Ruifrok-Johnston basis
    turned, which training never sees); the limit is the smaller angle where either falls by more than 0.02."""
    stain, shift = MANIFEST["stain"], MANIFEST["metrics"]["stain_shift"]
    assert stain["max_angle_deg"] == shift["limit_deg"] and "out-of-fold AUC" in stain["limit_rule"]
    curves = shift["curves"]
    assert set(curves) == {"own_fit", "ruifrok_johnston"}
    assert LIMIT == min(shift["limits_deg"].values()) == shift["limits_deg"][shift["limit_from"]]
    for name, curve in curves.items():
        base = curve[0]
        assert base["angle_deg"] == 0
        for row in curve:  # inside the limit both curves held within 0.02
            if row["angle_deg"] <= LIMIT:
                assert base["pooled_auc"] - row["pooled_auc"] <= 0.02, name
    setter = curves[shift["limit_from"]]
    past = [r for r in setter if r["angle_deg"] > LIMIT]  # the curve that set it fell past it
    assert (setter[0]["pooled_auc"] - past[0]["pooled_auc"] > 0.02) if past else not shift["crossed"]
    # what each development patient's stain reads through the appliance's QC, against the limit
    refused = shift["development_patients_refused"]
    assert (shift["development_worst_angle_deg"] > LIMIT) == bool(refused)


@pytest.fixture(scope="module")
def turned(tmp_path_factory, demo_image):
    folder = tmp_path_factory.mktemp("turned")
    out = {}
    for name, degrees in (("inside", INSIDE), ("beyond", BEYOND)):
        out[name] = folder / f"{name}.tif"
        tifffile.imwrite(out[name], stain_turned(demo_image, degrees))
    return out


def test_a_real_slide_turned_inside_the_limit_gets_a_call(ov_engine, turned):
    r = triage_path(ov_engine, turned["inside"])
    assert r["verdict"] == "suspicious"  # the demo slide's own call, kept under the turned stain
    assert "stain-out-of-range" not in [x["code"] for x in r["reasons"] + r["warnings"]]
    assert r["qc"]["stain_angles_deg"][0] < LIMIT


def test_a_real_slide_turned_beyond_the_limit_is_refused(ov_engine, turned):
    r = triage_path(ov_engine, turned["beyond"])
    assert r["verdict"] == "cannot-call" and not r["early_positive"]
    assert [x["code"] for x in r["reasons"]] == ["stain-out-of-range"]
    assert r["qc"]["stain_angles_deg"][0] > LIMIT
    assert f"limit {LIMIT:g} deg" in r["reasons"][0]["message"]
