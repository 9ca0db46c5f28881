"""The stain QC fails closed: a finished case with tissue whose stain cannot be assessed gets its own reason
(stain-not-assessable), never a call; the real demo slide with its stain faded is refused through the whole
pipeline."""

import numpy as np
import pytest

from appliance.offline.triage import triage_path
from appliance.pipeline.qc import CaseQc, QcLimits
from appliance.pipeline.stain import StainFit, apply_map
from appliance.pipeline.tissue import mask_of_subsampled, subsample
from tests.appliance.test_stain import REF_HE, synthetic_he

REFERENCE = StainFit(REF_HE, np.array([1.0, 1.0]), 0)


def qc_of(tiles, limits: QcLimits | None = None) -> CaseQc:
    qc = CaseQc(limits or QcLimits(), REFERENCE)
    for t in tiles:
        sub = subsample(t)
        qc.add_tile(sub, mask_of_subsampled(sub))
    qc.finish()
    return qc


def codes(qc: CaseQc) -> list[str]:
    return [r.code for r in qc.reasons()]


def test_a_well_stained_case_is_assessed_and_passes():
    qc = qc_of([synthetic_he(REF_HE, n=128, seed=s) for s in range(4)])
    assert qc.stain_assessed and qc.stain_problem() is None and codes(qc) == []
    assert qc.summary()["stain_problem"] is None and qc.summary()["stained_fraction"] > 0.5


def test_too_few_stained_pixels_is_not_assessable():
    qc = qc_of([synthetic_he(REF_HE, n=96, seed=1)])  # about 1,800 stained pixels at the QC's half resolution
    assert not qc.stain_assessed
    assert codes(qc) == ["stain-not-assessable"]
    assert "stained pixels (at least 2000 needed)" in qc.reasons()[0].message
    assert qc.reasons()[0].message.startswith("Check the staining and rescan")


def test_a_stain_too_pale_to_measure_is_not_assessable():
    pale = [synthetic_he(REF_HE, strength=(0.12, 0.12), n=128, seed=s) for s in range(4)]  # faint but saturated
    qc = qc_of(pale)
    assert qc.tissue_pixels > 10_000 and qc.stained_fraction < 0.10
    assert codes(qc) == ["stain-not-assessable"] and "too pale" in qc.reasons()[0].message


def test_a_failed_fit_is_not_assessable():
    """Stained tissue with no two stains in it (every colour at random): no H&E-like vectors can be fitted."""
    rng = np.random.default_rng(0)
    qc = qc_of([rng.integers(0, 200, (128, 128, 3)).astype(np.uint8) for _ in range(4)])
    assert qc.stain is None and qc.stain_error
    assert codes(qc) == ["stain-not-assessable"] and "the stain fit failed" in qc.reasons()[0].message


def test_fits_that_disagree_are_not_assessable_when_the_last_one_would_pass():
    """The first judgement (on the first tiles) and the whole case's fit differ by more than the limit, while the
    whole case's reading is itself within range: the stain changed during the scan."""
    limits = QcLimits(max_stain_angle=80, stain_first_judgement=5_000, stain_max_disagreement=10)
    first = [synthetic_he(REF_HE, n=256, seed=s) for s in range(1)]
    turned = REF_HE.copy()
    turned[:, 0] = REF_HE[:, 0] * np.cos(0.6) - np.cross(np.cross(REF_HE[:, 0], REF_HE[:, 1]), REF_HE[:, 0]) * np.sin(0.6)
    turned /= np.linalg.norm(turned, axis=0)
    later = [synthetic_he(turned, n=256, seed=s) for s in range(1, 9)]
    qc = qc_of(first + later, limits)
    assert qc.fits >= 2 and qc.fit_disagreement() > 10
    assert codes(qc) == ["stain-not-assessable"] and "disagree" in qc.reasons()[0].message
    # the same case judged against a tight range is out of range instead: that reason is the actionable one
    strict = qc_of(first + later, QcLimits(max_stain_angle=5, stain_first_judgement=5_000))
    assert codes(strict) == ["stain-out-of-range"]


def test_while_streaming_an_unjudged_stain_only_holds_the_early_call():
    qc = CaseQc(QcLimits(), REFERENCE)
    sub = subsample(synthetic_he(REF_HE, n=48, seed=1))
    qc.add_tile(sub, mask_of_subsampled(sub))
    assert not qc.stain_judged and qc.reasons() == []  # not finished: no reason yet, no early positive either


@pytest.fixture(scope="module")
def faded(tmp_path_factory, demo_image):
    """The demo slide with its stain faded to a fifth in optical density: still tissue to the saturation mask, but
    almost no pixel stained enough to measure."""
    import tifffile

    path = tmp_path_factory.mktemp("faded") / "faded.tif"
    tifffile.imwrite(path, apply_map(demo_image, np.eye(3, dtype=np.float32) * 0.2))
    return path


def test_a_real_slide_whose_stain_cannot_be_assessed_is_refused_not_called(ov_engine, faded):
    r = triage_path(ov_engine, faded)
    assert r["verdict"] == "cannot-call" and not r["early_positive"]
    assert "stain-not-assessable" in [x["code"] for x in r["reasons"]]
    assert r["qc"]["stain_problem"] and r["qc"]["stained_fraction"] < 0.10


def test_the_demo_slide_itself_is_assessed(ov_engine, demo_image, tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "demo.tif", demo_image)
    r = triage_path(ov_engine, tmp_path / "demo.tif")
    assert r["verdict"] == "suspicious" and r["qc"]["stain_assessed"] and r["qc"]["stain_problem"] is None
