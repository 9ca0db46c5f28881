"""The drift watch's rule and the threshold in force, as pure functions; the early positive with a site
threshold through the real session on the demo case."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.errors import InputError
from appliance.model.manifest import read_manifest
from appliance.pipeline import TriageSession
from appliance.pipeline.decision import ThresholdInForce
from appliance.service.drift import ALPHA, MIN_CASES, DriftWatch, binomial_tail, reference_in_force, reference_of, watch
from appliance.store.points import point_from_report, thresholds_in_force
from appliance.site.stats import spread
from appliance.offline.sources import tiles_from_image
from tests.conftest import MODEL_DIR

MANIFEST = read_manifest(MODEL_DIR)


def case(score=0.5, focus=5000.0, verdict="benign-appearing", reasons=(), ood=1.0):
    return {"verdict": verdict, "score": score, "reasons": [{"code": c, "message": c} for c in reasons],
            "measures": {"stain_h_deg": 3.0, "stain_e_deg": 4.0, "focus": focus, "tissue_mm2": 3.0, "ood": ood}}


def cases_like(rng, n, focus_mean=5000.0, ood_mean=1.0, **kw):
    return [case(score=float(rng.uniform(0.05, 0.95)), focus=float(rng.normal(focus_mean, 800)),
                 ood=float(rng.normal(ood_mean, 0.1)), **kw) for _ in range(n)]


@pytest.fixture
def reference():
    return reference_of(cases_like(np.random.default_rng(1), 400), spread)


def test_cases_like_the_reference_never_drift_and_a_shift_does_within_min_cases(reference):
    rng = np.random.default_rng(2)
    same = cases_like(rng, 300)
    assert not any(f.drifted for n in range(1, 301) for f in watch(same[:n][::-1], reference))
    shifted = cases_like(rng, 60, focus_mean=1500.0)
    first = next(n for n in range(1, 61) if any(f.drifted for f in watch(shifted[:n][::-1], reference)))
    assert first == MIN_CASES  # judged from MIN_CASES cases on, and at once
    drifted = [f for f in watch(shifted[::-1], reference) if f.drifted]
    assert [f.measure for f in drifted] == ["focus"] and "outside" in drifted[0].words()


def test_cases_the_model_finds_unlike_its_development_cases_drift(reference):
    """Each case under its OOD limit, but a window whose median OOD score left the reference's range: a lab's
    scanner or stain moved, and the watch says so before the gate has to refuse cases."""
    rng = np.random.default_rng(6)
    drifted = [f for f in watch(cases_like(rng, 50, ood_mean=1.4)[::-1], reference) if f.drifted]
    assert [f.measure for f in drifted] == ["ood"]


def test_only_the_last_window_counts(reference):
    rng = np.random.default_rng(3)
    old_shift = cases_like(rng, 60, focus_mean=1500.0)
    recent = cases_like(rng, 50)
    assert not any(f.drifted for f in watch((old_shift + recent)[::-1], reference))


def test_a_cannot_call_reason_drifts_by_the_binomial_rule(reference):
    rng = np.random.default_rng(4)
    base = cases_like(rng, 50)
    assert not [f for f in watch(base[::-1], reference) if f.measure.startswith("cannot-call:")]  # none seen
    allowed = next(k for k in range(51) if binomial_tail(k + 1, 50, 0.01) < ALPHA)
    for k, drifts in ((allowed, False), (allowed + 1, True)):
        window = [case(verdict="cannot-call", score=None, reasons=["out-of-focus"]) for _ in range(k)] + base[k:]
        f = next(f for f in watch(window, reference) if f.measure == "cannot-call:out-of-focus")
        assert (f.value, f.high, f.drifted) == (k, allowed, drifts)


def test_the_watch_says_a_change_once(reference):
    rng = np.random.default_rng(5)
    w = DriftWatch()
    assert w.check(cases_like(rng, 50, focus_mean=1500.0), reference, "dev") is True
    assert w.check(cases_like(rng, 50, focus_mean=1500.0), reference, "dev") is False
    assert w.status()["drifted"] == ["focus"] and w.status()["warning"].startswith("Drift: focus")
    assert w.check(cases_like(rng, 50), reference, "dev") is True and w.status()["warning"] is None
    assert w.check(cases_like(rng, 50), None, "none") is False and w.status()["reference"] == "none"


def test_the_site_point_applies_to_its_own_model_only():
    point = {"model_sha256": MANIFEST.digest, "threshold": 0.5, "accepted_at": "2026-12-06T05:00:00+00:00",
             "report_sha256": "f" * 64, "report": {"drift_reference": {"cases": 1, "measures": {}}}}
    site = thresholds_in_force(point, MANIFEST)
    assert (site.threshold, site.early_threshold, site.source) == (0.5, 0.5, "site")  # the early rule is the final
    assert site.words() == "the site threshold 0.500 (accepted 2026-12-06)"
    other = thresholds_in_force(dict(point, model_sha256="0" * 64), MANIFEST)
    assert other == ThresholdInForce.of_model(MANIFEST.decision) and other.words().startswith("the model's")
    assert reference_in_force(MANIFEST, point)[1] == "site validation accepted 2026-12-06"
    assert reference_in_force(MANIFEST, dict(point, model_sha256="0" * 64))[0] == MANIFEST.drift


def test_a_report_of_another_model_or_without_a_recommendation_is_refused():
    report = {"model": {"sha256": MANIFEST.digest}, "recommended": {"threshold": 0.5}, "target_sensitivity": 0.98,
              "counts": {"callable_malignant": 40, "callable_benign": 50}, "report_sha256": "e" * 64}
    point = point_from_report(report, MANIFEST)
    assert (point["threshold"], point["malignant"], point["benign"]) == (0.5, 40, 50)
    with pytest.raises(InputError, match="validate this model first"):
        point_from_report(dict(report, model={"sha256": "0" * 64}), MANIFEST)
    with pytest.raises(InputError, match="recommends no threshold: too few"):
        point_from_report(dict(report, recommended=None, recommendation_note="too few"), MANIFEST)
    with pytest.raises(InputError, match="not a site validation report.*no counts"):
        point_from_report({k: v for k, v in report.items() if k != "counts"}, MANIFEST)
    with pytest.raises(InputError, match="not a site validation report"):
        point_from_report(dict(report, recommended={"threshold": "high"}), MANIFEST)


@pytest.mark.parametrize("threshold", [0.5, 0.99])
def test_the_early_positive_uses_the_threshold_in_force(ov_engine, demo_image, threshold):
    """The demo case is early positive after 33 tiles at the model's threshold (0.706); a site threshold moves
    it, and the result names the site point."""
    tiles = list(tiles_from_image(demo_image, 200))

    def run(thresholds):
        session = TriageSession(ov_engine, thresholds=thresholds)
        try:
            for t in tiles:
                session.add_tile(t.x, t.y, t.pixels)
            return session.finish()
        finally:
            session.close()

    model = run(None)
    site = run(ThresholdInForce.of_site(MANIFEST.decision, threshold, "2026-12-06T05:00:00+00:00", "a" * 64))
    assert model.threshold_source == "model" and site.threshold_source == "site"
    assert (site.threshold, site.early_threshold, site.site_report_sha256) == (threshold, threshold, "a" * 64)
    assert site.score == model.score  # the same patches, the same score: only the call moves
    if threshold < model.threshold:
        assert site.early_positive_after_tiles <= model.early_positive_after_tiles
    else:
        assert not site.early_positive and site.verdict == ("suspicious" if site.score >= threshold else "benign-appearing")
