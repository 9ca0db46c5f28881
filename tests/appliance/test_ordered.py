"""The ordered scorer on its own (appliance.pipeline.ordered), with the committed model: batches come back out
in the order they were submitted whatever order the engine returns them in, each with its own positions and
scores; a stain-normalising model's batches wait for the case's one map, made from the stain's first judgement."""

import numpy as np
import pytest

from appliance.model.engine import Scorer
from appliance.pipeline.ordered import OrderedScorer, StainMap
from appliance.pipeline.qc import CaseQc, limits_for
from appliance.pipeline.stain import StainFit, apply_map, normalising_map
from appliance.pipeline.tissue import mask_of_subsampled, subsample
from appliance.offline.sources import tiles_from_image

SIZES = (3, 1, 4, 2)  # patches per batch


class Released:
    """The real engine's scorer, whose finished results are handed back only when the test releases them
    (``release``: tags, in the order given); ``wait`` hands back what is left, newest first."""

    def __init__(self, engine):
        self.inner, self.held, self.release, self.closed = Scorer(engine), {}, [], False

    def submit(self, batch, tag) -> None:
        self.inner.submit(batch, tag)

    def done(self) -> list:
        for tag, probs, distances in self.inner.done():
            self.held[tag] = (probs, distances)
        out = [(tag, *self.held.pop(tag)) for tag in self.release]
        self.release = []
        return out

    def wait(self) -> list:
        self.done()
        out = [(tag, *self.held.pop(tag)) for tag in sorted(self.held, reverse=True)]
        return out

    def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def batches(demo_image):
    """Four batches of real tumour patches (demo slide), each patch's position naming its batch and place."""
    region = demo_image[:600, 400:1400]
    patches = [region[y:y + 50, x:x + 50] for y in range(0, 600, 50) for x in range(0, 1000, 50)]
    out, start = [], 0
    for b, n in enumerate(SIZES):
        pos = np.array([[b, i, 50, 50] for i in range(n)], dtype=np.int64)
        out.append((pos, np.ascontiguousarray(np.stack(patches[start:start + n]))))
        start += n
    return out


def test_results_come_out_in_submission_order_whatever_order_they_return_in(ov_engine, batches):
    released = Released(ov_engine)
    ordered = OrderedScorer(released)
    for pos, pixels in batches:
        ordered.submit(pos, pixels)
    assert ordered.pending == 4
    released.release = [2, 0]
    first = list(ordered.in_order())
    assert [int(pos[0, 0]) for pos, _, _ in first] == [0]  # batch 2 waits for batch 1
    released.release = [3]
    assert list(ordered.in_order()) == [] and ordered.pending == 3
    released.release = [1]
    rest = list(ordered.in_order())
    assert [int(pos[0, 0]) for pos, _, _ in rest] == [1, 2, 3] and ordered.pending == 0
    for (pos, probs, distances), (want_pos, pixels) in zip(first + rest, batches):
        want_probs, want_distances = ov_engine.score(pixels)
        assert pos is want_pos  # each batch's own positions, with its own scores
        assert np.array_equal(probs, want_probs) and np.array_equal(distances, want_distances)


def test_wait_hands_back_the_rest_and_closes_the_scorer(ov_engine, batches):
    released = Released(ov_engine)
    ordered = OrderedScorer(released)
    for pos, pixels in batches:
        ordered.submit(pos, pixels)
    released.release = [1]
    assert list(ordered.in_order()) == []  # batch 0 not back yet
    results = ordered.wait()
    assert released.closed and [tag for tag, _, _ in results] == [3, 2, 0]
    assert [int(pos[0, 0]) for pos, _, _ in ordered.in_order(results)] == [0, 1, 2, 3]
    assert ordered.pending == 0


def test_a_replaced_scorer_is_the_one_used(ov_engine, batches):
    ordered = OrderedScorer(Scorer(ov_engine))
    released = ordered.scorer = Released(ov_engine)
    pos, pixels = batches[0]
    ordered.submit(pos, pixels)
    assert list(ordered.in_order()) == []
    released.release = [0]
    assert [p is pos for p, _, _ in ordered.in_order()] == [True]


# -------------------------------------------------------------------------------------------- stain map
def stain_of(engine, normalisation: str):
    m = engine.manifest
    return (m.stain.model_copy(update={"normalisation": normalisation}),
            StainFit.from_dict(m.stain.reference.model_dump()))


def fed_qc(engine, reference, image, fits: int) -> CaseQc:
    """A case's QC fed the image's tiles until the stain has been judged ``fits`` times."""
    qc = CaseQc(limits_for(engine.manifest), reference)
    for t in tiles_from_image(image, 200):
        sub = subsample(np.ascontiguousarray(t.pixels))
        qc.add_tile(sub, mask_of_subsampled(sub))
        if qc.fits == fits:
            return qc
    raise AssertionError(f"the image gave {qc.fits} stain judgements, not {fits}")


def test_a_model_that_does_not_normalise_sends_its_patches_as_they_are(ov_engine, batches):
    stain_map = StainMap(*stain_of(ov_engine, "none"))
    assert not stain_map.waiting
    assert stain_map.ready(CaseQc(limits_for(ov_engine.manifest)))  # no stain judged, nothing held
    pixels = batches[0][1]
    assert stain_map.apply(pixels) is pixels and stain_map.map is None


def test_a_normalising_model_waits_for_the_stains_first_judgement_and_keeps_its_map(ov_engine, demo_image,
                                                                                   batches):
    stain, reference = stain_of(ov_engine, "macenko")
    stain_map = StainMap(stain, reference)
    qc = CaseQc(limits_for(ov_engine.manifest), reference)
    assert stain_map.waiting and not stain_map.ready(qc)  # the patches wait
    qc = fed_qc(ov_engine, reference, demo_image, fits=1)
    assert stain_map.ready(qc) and not stain_map.waiting
    want = normalising_map(qc.first_fit, reference)
    assert np.array_equal(stain_map.map, want) and not np.allclose(want, np.eye(3))
    pixels = batches[0][1]
    assert np.array_equal(stain_map.apply(pixels), apply_map(pixels, want))
    later = fed_qc(ov_engine, reference, demo_image, fits=2)  # a later judgement does not change the case's map
    assert stain_map.ready(later) and np.array_equal(stain_map.map, want)


def test_a_case_that_ends_before_any_stain_judgement_goes_with_the_identity(ov_engine):
    stain_map = StainMap(*stain_of(ov_engine, "macenko"))
    qc = CaseQc(limits_for(ov_engine.manifest))
    assert not stain_map.ready(qc)
    assert stain_map.ready(qc, final=True)
    assert np.array_equal(stain_map.map, np.eye(3, dtype=np.float32))
