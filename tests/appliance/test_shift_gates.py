"""The shift gates on a real slide: the bundled demo case (IDC 10253, which no model trained on) re-coloured by
each of the three shifts the gates were set on (appliance.pipeline.shifts) and triaged through the whole
pipeline. One test per rule the calibration was held to on the development slides:
- no tumour slide is called benign-appearing at any turn from 0 to 40 deg;
- where the out-of-fold AUC holds within 0.02 (and the development slides were called), the slide is called;
- where the AUC has fallen by more than 0.05, the slide is refused.
The turns come from the model's own calibration (manifest metrics.shift_gates), so a rebuilt model is tested
where its own curves say."""

import json

import pytest
import tifffile

from appliance.offline.triage import triage_path
from appliance.pipeline.shifts import SHIFTS, shifted
from appliance.pipeline.stain import fit_stains
from tests.conftest import MODEL_DIR

MANIFEST = json.loads((MODEL_DIR / "manifest.json").read_text())
GATES = MANIFEST["metrics"]["shift_gates"]
ROWS = {(r["shift"], r["turn_deg"]): r for r in GATES["outcomes"]}


def _turns(shift: str, cls: str) -> list[int]:
    return [t for (s, t), r in ROWS.items() if s == shift and r["class"] == cls]


def held_turn(shift: str) -> int | None:
    """The largest turn where the AUC holds and the gates kept to the rule on the development slides (at most 1
    in 7 refused)."""
    ok = [t for t in _turns(shift, "holds") if ROWS[(shift, t)]["refused"] <= ROWS[(shift, t)]["slides"] / 7]
    return max(ok) if ok else None


def fell_turn(shift: str) -> int | None:
    """The smallest turn where the AUC has fallen by more than 0.05."""
    fell = _turns(shift, "fell")
    return min(fell) if fell else None


@pytest.fixture(scope="module")
def demo_fit(demo_image):
    return fit_stains(demo_image[::4, ::4])


def _triage(engine, image, shift, turn, fit, folder):
    path = folder / f"{shift}-{turn}.tif"
    tifffile.imwrite(path, shifted(image, shift, turn, fit))
    return triage_path(engine, path)


def test_the_limits_are_the_calibration_s_own():
    assert GATES["shifts"] == list(SHIFTS) and GATES["turns_deg"][0] == 0 and GATES["turns_deg"][-1] == 40
    stain = GATES["stain_limit"]
    per = stain["per_shift"].values()
    # the safe side: the smallest reading where a shift's AUC fell, and never beyond what any shift validated
    crossed = [v["reading_deg"] for v in per if v["reading_deg"] is not None]
    validated = [v["validated_to_deg"] for v in per if v.get("validated_to_deg") is not None]
    bound = min(([min(crossed)] if crossed else []) + ([max(validated)] if validated else []))
    assert MANIFEST["stain"]["max_angle_deg"] == stain["limit_deg"] == int(bound * 2) / 2
    assert "QC reading" in MANIFEST["stain"]["limit_rule"] or "a QC reading" in MANIFEST["stain"]["limit_rule"]


@pytest.mark.parametrize("shift", SHIFTS)
def test_no_turn_gets_a_benign_call_on_a_tumour_slide(ov_engine, demo_image, demo_fit, tmp_path, shift):
    verdicts = {t: _triage(ov_engine, demo_image, shift, t, demo_fit, tmp_path)["verdict"] for t in (0, 10, 20, 30, 40)}
    assert "benign-appearing" not in verdicts.values(), verdicts


@pytest.mark.parametrize("shift", SHIFTS)
def test_where_the_model_still_reads_the_slide_it_is_called(ov_engine, demo_image, demo_fit, tmp_path, shift):
    turn = held_turn(shift)
    if turn is None:
        pytest.skip(f"{shift}: no turn where the AUC holds and at most 1 development slide in 7 was refused")
    r = _triage(ov_engine, demo_image, shift, turn, demo_fit, tmp_path)
    assert r["verdict"] == "suspicious", (turn, r["reasons"])


@pytest.mark.parametrize("shift", SHIFTS)
def test_where_the_model_no_longer_reads_the_slide_it_is_refused(ov_engine, demo_image, demo_fit, tmp_path, shift):
    turn = fell_turn(shift)
    if turn is None:
        pytest.skip(f"{shift}: the AUC never fell by more than 0.05 within 40 deg")
    r = _triage(ov_engine, demo_image, shift, turn, demo_fit, tmp_path)
    assert r["verdict"] == "cannot-call", (turn, r["score"], r["qc"]["stain_angles_deg"], r["qc"]["ood_score"])
    assert {x["code"] for x in r["reasons"]} & {"stain-out-of-range", "stain-not-assessable", "out-of-distribution",
                                                "over-exposed"}
