"""The case's files from the session's parts on their own (appliance.pipeline.casefiles), with the committed
model: the top patches picked by probability and cut from the mosaic where the case frame puts them, with the
model's class-activation maps, and every scored patch a regions.geojson tile when asked."""

import json

import numpy as np
import pytest

from appliance.pipeline.casefiles import CaseFiles, patch_cams, top_patches
from appliance.pipeline.heatmap import Heatmap, Thumbnail
from appliance.pipeline.mosaic import Mosaic
from appliance.pipeline.patches import pad_to
from appliance.pipeline.resample import CaseFrame
from appliance.pipeline.result import PatchScore
from appliance.terms import CaseFile
from tests.results import a_result

ORIGIN = (1000, 2000)  # the input's top-left: reported patches are in its pixels, the files in the mosaic's


def test_the_top_patches_are_the_most_probable_ties_upper_then_left():
    patches = [PatchScore(0, 50, 50, 50, 0.9), PatchScore(50, 0, 50, 50, 0.9), PatchScore(0, 0, 50, 50, 0.5),
               PatchScore(100, 100, 50, 50, 0.95), PatchScore(0, 100, 50, 50, 0.9)]
    assert top_patches(patches, 3) == [patches[3], patches[1], patches[0]]
    assert top_patches(patches, 10) == [patches[3], patches[1], patches[0], patches[4], patches[2]]


def test_each_top_patch_gets_the_models_cam_edge_patches_padded_as_trained(ov_engine, demo_image):
    m = ov_engine.manifest
    whole, edge = demo_image[:50, 400:450], demo_image[:30, 500:550]
    want = ov_engine.cam(np.stack([whole, pad_to(edge, m.patch.size, m.input.pad_value)])).mean(axis=1)
    got = patch_cams(ov_engine, [whole, edge])
    assert got == np.round(want, 4).tolist()
    assert np.array(got[0]).shape == tuple(m.cam.map_size)
    assert patch_cams(ov_engine, []) == []


@pytest.fixture
def case(ov_engine, demo_image, tmp_path):
    """A 300 x 300 px case of the demo slide's tumour in a mosaic, its 36 patches scored (made-up values)."""
    image = np.ascontiguousarray(demo_image[:300, 400:700])
    mosaic = Mosaic(tmp_path / "work" / "mosaic")
    mosaic.write(0, 0, image)
    heatmap, thumbnail = Heatmap(50, 50, 300, 300), Thumbnail(10)
    thumbnail.add(0, 0, image)
    probs = np.round(np.random.default_rng(7).uniform(0, 1, 36), 6)
    cells = [(x, y) for y in range(0, 300, 50) for x in range(0, 300, 50)]
    heatmap.add_many(*(np.array([c[i] for c in cells]) for i in (0, 1)), np.full(36, 50), np.full(36, 50), probs)
    patches = [PatchScore(x + ORIGIN[0], y + ORIGIN[1], 50, 50, float(p)) for (x, y), p in zip(cells, probs)]
    files = CaseFiles(ov_engine, frame=CaseFrame(1.0, ORIGIN), scale=1.0, mosaic=mosaic, heatmap=heatmap,
                      thumbnail=thumbnail)
    result = a_result("suspicious", 0.9)
    result.patches, result.top_k, result.microns_per_pixel, result.origin = patches, 5, 4.0, list(ORIGIN)
    summary = result.summary("case.tif")
    yield files, patches, image, summary
    mosaic.remove()


def test_the_top_patches_and_tiles_are_written_in_the_mosaics_pixels(ov_engine, case, tmp_path):
    files, patches, image, summary = case
    out = tmp_path / "out"
    # a scan at the model's resolution is not written: the mosaic already holds every scanned pixel
    written = files.write(out, "C-1", summary, patches, geojson_tiles=True, scan=object())
    assert {CaseFile.TOP_PATCHES_JSON, CaseFile.TOP_PATCHES, CaseFile.REGIONS, CaseFile.CASE_OME,
            CaseFile.SUMMARY} <= set(written)
    top = json.loads((out / CaseFile.TOP_PATCHES_JSON).read_text())["patches"]
    want = top_patches(patches, ov_engine.manifest.decision.top_k)
    assert [(t["x"], t["y"], t["probability"]) for t in top] == [
        (p.x - ORIGIN[0], p.y - ORIGIN[1], p.probability) for p in want]
    crops = [image[t["y"]:t["y"] + 50, t["x"]:t["x"] + 50] for t in top]
    assert [t["cam"] for t in top] == patch_cams(ov_engine, crops)  # each cut from the mosaic where it lies
    tiles = [f for f in json.loads((out / CaseFile.REGIONS).read_text())["features"]
             if f["properties"]["objectType"] == "tile"]
    assert [f["geometry"]["coordinates"][0][0] for f in tiles] == [[p.x - ORIGIN[0], p.y - ORIGIN[1]]
                                                                   for p in patches]
    assert [f["properties"]["measurements"]["probability"] for f in tiles] == [round(p.probability, 4)
                                                                               for p in patches]


def test_without_patches_there_are_no_top_patch_records_nor_tiles(case, tmp_path):
    files, _, _, summary = case
    summary = dict(summary, patches=[], top_patches=[])
    written = files.write(tmp_path / "out", "C-2", summary, [], geojson_tiles=True)
    assert CaseFile.TOP_PATCHES_JSON not in written and CaseFile.TOP_PATCHES in written  # a blank strip
    assert not [f for f in json.loads((tmp_path / "out" / CaseFile.REGIONS).read_text())["features"]
                if f["properties"]["objectType"] == "tile"]
