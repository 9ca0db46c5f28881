"""Result assembly on its own (appliance.pipeline.assembly), with the committed model: the patches reported in
the input's pixels row by row, refined by the model's context stage, the call made from the early checkpoint and
the QC, the drift measures and the OOD score."""

import time
from dataclasses import replace

import numpy as np
import pytest

from appliance.model import ood
from appliance.pipeline.assembly import Assembly, ScoredPatches, case_measures, ood_limit, patch_scores
from appliance.pipeline.checkpoints import Checkpoints
from appliance.pipeline.clock import StageClock
from appliance.pipeline.context import refine
from appliance.pipeline.decision import ThresholdInForce
from appliance.pipeline.heatmap import Heatmap
from appliance.pipeline.qc import CaseQc, limits_for
from appliance.pipeline.resample import CaseFrame
from appliance.pipeline.stain import StainFit
from appliance.pipeline.result import PatchScore
from appliance.pipeline.tissue import mask_of_subsampled, subsample
from appliance.terms import ReasonCode, Verdict

POS = np.array([[50, 0, 50, 50], [0, 50, 50, 50], [0, 0, 50, 50]], dtype=np.int64)  # in cut order


def test_patches_are_reported_in_the_inputs_pixels_row_by_row():
    frame = CaseFrame(0.5, (100, 40))  # the scan at twice the model's resolution, cut from (100, 40)
    first = np.array([0.1, 0.2, 0.3])
    assert patch_scores(frame, POS, first, None) == [
        PatchScore(100, 40, 100, 100, 0.3), PatchScore(200, 40, 100, 100, 0.1), PatchScore(100, 140, 100, 100, 0.2)]
    refined = np.array([0.7, 0.8, 0.9])
    assert [(p.probability, p.first_stage) for p in patch_scores(frame, POS, first, refined)] == [
        (0.9, 0.3), (0.7, 0.1), (0.8, 0.2)]


def test_the_scored_patches_are_kept_in_fold_order():
    scored = ScoredPatches()
    assert scored.positions().shape == (0, 4) and scored.positions().dtype == np.int64
    assert scored.probabilities().shape == (0,) and scored.ood_score is None
    scored.add(POS[:2], np.array([0.1, 0.2]), np.array([1.0, 3.0]))
    scored.add(POS[2:], np.array([0.3]), np.array([2.5]))
    assert scored.positions().tolist() == POS.tolist() and scored.probabilities().tolist() == [0.1, 0.2, 0.3]
    assert scored.ood_score == ood.case_score(np.array([1.0, 3.0, 2.5]))
    without = ScoredPatches()
    without.add(POS, np.array([0.1, 0.2, 0.3]), None)  # a model without the gate
    assert without.ood_score is None


def judged_qc(engine, image, limits=None) -> CaseQc:
    """A QC that has seen ``image`` as one tile and judged its stain."""
    ref = engine.manifest.stain.reference
    qc = CaseQc(limits or limits_for(engine.manifest), StainFit.from_dict(ref.model_dump()))
    sub = subsample(np.ascontiguousarray(image))
    qc.add_tile(sub, mask_of_subsampled(sub))
    qc.finish()
    return qc


def test_measures_count_each_scored_patch_as_its_stride_cell(ov_engine, demo_image):
    m = ov_engine.manifest
    qc = CaseQc(limits_for(m))
    assert case_measures(qc, 100, 50, 4.0, None) == {"stain_h_deg": None, "stain_e_deg": None, "focus": None,
                                                     "tissue_mm2": 4.0, "ood": None}  # 100 x (0.2 mm)^2
    judged = judged_qc(ov_engine, demo_image[:400, 400:1400])
    angles = judged.stain_angles()
    got = case_measures(judged, 3, m.patch.stride, m.input.microns_per_pixel, 1.25)
    assert (got["stain_h_deg"], got["stain_e_deg"]) == (round(angles[0], 2), round(angles[1], 2))
    assert got["tissue_mm2"] == 0.12 and got["ood"] == 1.25
    assert ood_limit(ov_engine) == m.ood.max_score


def assemble(engine, image, qc: CaseQc, thresholds=None):
    """Every patch of ``image`` scored by the engine and folded as one tile (its QC clean), then assembled:
    (result, assembly, positions, first-stage probabilities, OOD distances, heatmap)."""
    m = engine.manifest
    s = m.patch.size
    pos = np.array([[x, y, s, s] for y in range(0, image.shape[0], s) for x in range(0, image.shape[1], s)],
                   dtype=np.int64)
    probs, distances = engine.score(np.stack([image[y:y + s, x:x + s] for x, y, _, _ in pos.tolist()]))
    probs = np.round(probs.astype(np.float64), 6)
    thresholds = thresholds or ThresholdInForce.of_model(m.decision)
    early, scored = Checkpoints(m.decision, m.patch, thresholds), ScoredPatches()
    heatmap = Heatmap(s, m.patch.stride, image.shape[1], image.shape[0])
    early.tile_ended(1, len(pos), qc_clean=True)
    scored.add(pos, probs, distances)
    early.fold(pos, probs)
    clock = StageClock()
    assembly = Assembly(engine, thresholds, qc=qc, heatmap=heatmap, frame=CaseFrame(1.0, (30, 60)), early=early,
                        scored=scored, clock=clock)
    result = assembly.result(tiles=1, patches_seen=len(pos), started=time.perf_counter())
    return result, assembly, pos, probs, distances, heatmap


def test_a_case_is_called_on_its_refined_patches(ov_engine, demo_image):
    m = ov_engine.manifest
    image = np.ascontiguousarray(demo_image[:400, 400:1400])
    qc = judged_qc(ov_engine, image)
    r, assembly, pos, first, distances, heatmap = assemble(ov_engine, image, qc)
    assert ov_engine.has_context and len(pos) == 160
    refined = refine(ov_engine, pos[:, 0] // 50, pos[:, 1] // 50, first)
    by_place = {(x + 30, y + 60): (float(f), float(rf)) for (x, y, _, _), f, rf in zip(pos.tolist(), first, refined)}
    assert [(p.x, p.y) for p in r.patches] == sorted(by_place, key=lambda k: (k[1], k[0]))
    assert {(p.x, p.y): (p.first_stage, p.probability) for p in r.patches} == by_place
    assert r.patches == assembly.patches and r.origin == [30, 60]
    assert heatmap.average().max() == pytest.approx(refined.max(), abs=1e-6)  # drawn from the refined values
    top5 = sorted(first)[-5:]
    assert r.early_score == round(sum(top5) / 5, 6) == r.score  # the shipped final rule is the first-stage top-5
    assert r.verdict == Verdict.SUSPICIOUS and r.early_positive and r.early_positive_after_tiles == 1
    assert not r.reasons and r.warnings == qc.reasons() == []
    assert r.qc["ood_score"] == ood.case_score(distances) and r.qc["ood_max_score"] == m.ood.max_score
    assert r.measures["tissue_mm2"] == round(160 * 0.2 * 0.2, 4) and r.microns_per_pixel == 4.0
    assert (r.threshold, r.early_threshold, r.top_k) == (m.decision.case_threshold, m.decision.early_rule.threshold,
                                                         m.decision.top_k)
    assert {"context", "result", "total"} <= set(r.timings_ms)


def test_qc_found_after_the_early_call_is_a_warning_and_without_it_a_reason(ov_engine, demo_image):
    image = np.ascontiguousarray(demo_image[:400, 400:1400])
    strict = replace(limits_for(ov_engine.manifest), focus_min=1e9)  # every patch out of focus
    qc = judged_qc(ov_engine, image, strict)
    qc.add_patches(np.full(10, 800.0))
    found = qc.reasons()
    assert [r.code for r in found] == [ReasonCode.OUT_OF_FOCUS]
    called = assemble(ov_engine, image, qc)[0]
    assert called.verdict == Verdict.SUSPICIOUS and called.warnings == found and not called.reasons
    never = ThresholdInForce(threshold=0.0, early_threshold=2.0)  # no early call; the final score would pass
    refused = assemble(ov_engine, image, qc, never)[0]
    assert refused.verdict == Verdict.CANNOT_CALL and refused.reasons == found and not refused.warnings


def test_a_case_without_tiles_cannot_be_called(ov_engine):
    m = ov_engine.manifest
    thresholds = ThresholdInForce.of_model(m.decision)
    early, scored = Checkpoints(m.decision, m.patch, thresholds), ScoredPatches()
    assembly = Assembly(ov_engine, thresholds, qc=CaseQc(limits_for(m)), heatmap=Heatmap(50, 50),
                        frame=CaseFrame(1.0, (0, 0)), early=early, scored=scored, clock=StageClock())
    r = assembly.result(tiles=0, patches_seen=0, started=time.perf_counter())
    assert r.verdict == Verdict.CANNOT_CALL and [x.code for x in r.reasons] == [ReasonCode.NO_TILES]
    assert r.patches == [] and r.score == 0.0 and "context" not in r.timings_ms  # nothing to refine
