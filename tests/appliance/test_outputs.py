"""The case's slide files and regions, opened by the readers a lab uses: OpenSlide (and so QuPath's OpenSlide
server), tifffile, tiffslide; regions.geojson laid out as QuPath's own GeoJSON reader reads it."""

import json
import uuid

import numpy as np
import pytest
import tifffile
from PIL import Image

from appliance.colormap import colormap
from appliance.offline.triage import triage_path
from appliance.pipeline.heatmap import regions
from appliance.pipeline.mosaic import Mosaic
from appliance.pipeline.pyramid import BAND, JPEG_QUALITY, write_pyramid
from appliance.pipeline.pyramid import TILE as PYRAMID_TILE
from tests.conftest import DEMO_CASE

openslide = pytest.importorskip("openslide")


def box2(img: np.ndarray) -> np.ndarray:
    """2 x 2 box filter with the mosaic's rounding (odd edges padded with glass)."""
    h, w = img.shape[:2]
    pad = np.pad(img, ((0, h & 1), (0, w & 1), (0, 0)), constant_values=255).astype(np.uint16)
    return ((pad[0::2, 0::2] + pad[1::2, 0::2] + pad[0::2, 1::2] + pad[1::2, 1::2] + 2) >> 2).astype(np.uint8)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return 10 * np.log10(255 ** 2 / mse)


@pytest.fixture(scope="module")
def demo_out(ov_engine, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "DEMO"
    result = triage_path(ov_engine, DEMO_CASE, out_dir=out)
    return out, result, json.loads((out / "summary.json").read_text())


# ------------------------------------------------------------------------------------------- pyramids
def test_case_pyramid_opens_in_openslide_with_levels_mpp_and_the_case_pixels(demo_out):
    out, _, summary = demo_out
    case = tifffile.imread(DEMO_CASE)
    mpp = summary["microns_per_pixel"]
    assert mpp == pytest.approx(4.0)
    with openslide.OpenSlide(out / "case.ome.tif") as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.level_count == 4  # 2500 x 2000 halved until the short side is below 256
        assert slide.level_dimensions == ((2500, 2000), (1250, 1000), (625, 500), (313, 250))
        assert slide.level_downsamples == pytest.approx((1, 2, 4, 8), rel=1e-3)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(mpp, rel=1e-6)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(mpp, rel=1e-6)
        assert slide.properties["tiff.ResolutionUnit"] == "centimeter"
        assert int(slide.properties["openslide.level[0].tile-width"]) == PYRAMID_TILE
        assert "Not for diagnosis" in slide.properties["openslide.comment"]
        level0 = np.asarray(slide.read_region((0, 0), 0, slide.level_dimensions[0]).convert("RGB"))
        assert mean_abs_diff(level0, case) < 3  # JPEG: close to the case, not equal
        tissue = case.min(axis=2) < 220
        assert psnr(level0[tissue], case[tissue]) > 30  # dB, where the stain is (4:2:0 chroma would be 29.5)
        expect = case
        for level in range(1, slide.level_count):
            expect = box2(expect)
            got = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))
            assert mean_abs_diff(got, expect) < 3, level  # each reduced level is the case, halved again


def test_case_pyramid_in_tifffile_every_level_a_tiled_jpeg_page_with_resolution(demo_out):
    out, _, summary = demo_out
    case = tifffile.imread(DEMO_CASE)
    with tifffile.TiffFile(out / "case.ome.tif") as tif:
        assert len(tif.pages) == 4 and len(tif.series) == 1
        series = tif.series[0]
        assert series.is_pyramidal and len(series.levels) == 4
        assert [lv.shape for lv in series.levels] == [(2000, 2500, 3), (1000, 1250, 3), (500, 625, 3),
                                                      (250, 313, 3)]
        for i, page in enumerate(tif.pages):
            assert page.is_tiled and (page.tilewidth, page.tilelength) == (PYRAMID_TILE, PYRAMID_TILE)
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.subfiletype == (1 if i else 0)  # reduced levels are marked reduced
            assert not page.subifds  # ordinary IFDs, not SubIFDs (OpenSlide reads only the IFD chain)
            # um per pixel from the resolution tags (pixels per micrometre), doubling level by level
            assert 1 / page.get_resolution(tifffile.RESUNIT.MICROMETER)[0] == pytest.approx(
                summary["microns_per_pixel"] * 2 ** i, rel=1e-6)
        assert mean_abs_diff(series.levels[0].asarray(), case) < 3


def test_case_pyramid_in_tiffslide(demo_out):
    tiffslide = pytest.importorskip("tiffslide")
    out, _, summary = demo_out
    with tiffslide.TiffSlide(out / "case.ome.tif") as slide:
        assert slide.level_count == 4
        assert slide.level_dimensions[0] == (2500, 2000) and slide.level_dimensions[3] == (313, 250)
        assert slide.properties["tiffslide.mpp-x"] == pytest.approx(summary["microns_per_pixel"], rel=1e-6)
        region = np.asarray(slide.read_region((1000, 800), 0, (300, 200)).convert("RGB"))
        level0 = np.asarray(slide.read_region((0, 0), 0, (2500, 2000)).convert("RGB"))
    assert mean_abs_diff(level0, tifffile.imread(DEMO_CASE)) < 3
    assert np.array_equal(region, tifffile.imread(out / "case.ome.tif")[800:1000, 1000:1300])


def test_case_pyramid_in_libvips(demo_out):
    pyvips = pytest.importorskip("pyvips")
    out, _, summary = demo_out
    path = str(out / "case.ome.tif")
    first = pyvips.Image.new_from_file(path)
    assert first.get("n-pages") == 4
    for page, (w, h) in enumerate([(2500, 2000), (1250, 1000), (625, 500), (313, 250)]):
        level = pyvips.Image.new_from_file(path, page=page)
        assert (level.width, level.height, level.bands) == (w, h, 3)
        assert 1000 / level.xres == pytest.approx(summary["microns_per_pixel"] * 2 ** page, rel=1e-6)  # px/mm
    assert mean_abs_diff(first.numpy(), tifffile.imread(DEMO_CASE)) < 3


def test_heatmap_pyramid_is_the_colour_mapped_heatmap_over_the_same_microns(demo_out):
    out, _, summary = demo_out
    with Image.open(out / "heatmap.png") as im:
        grey, alpha = np.asarray(im).transpose(2, 0, 1)
    geo = json.loads((out / "regions.geojson").read_text())
    m = geo["features"][0]["properties"]["measurements"]
    cell = int(round((m["area_px"] / m["cells"]) ** 0.5))  # model pixels per heatmap cell
    with openslide.OpenSlide(out / "heatmap.ome.tif") as slide:
        assert slide.level_count >= 3
        (w, h) = slide.level_dimensions[0]
        mpp = float(slide.properties["openslide.mpp-x"])
        assert mpp == pytest.approx(summary["microns_per_pixel"] * 10, rel=1e-6)
        assert w * mpp == pytest.approx(2500 * summary["microns_per_pixel"])  # same area as case.ome.tif
        pic = np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB"))
    rep = cell // 10  # heatmap.ome.tif pixels per heatmap cell (10 model pixels per pixel)
    assert rep >= 2
    centres = pic[rep // 2::rep, rep // 2::rep][: grey.shape[0], : grey.shape[1]].astype(int)
    rows, cols = centres.shape[:2]
    scored = alpha[:rows, :cols] == 255
    assert scored.sum() > 100 and (~scored).sum() > 0
    expect = colormap(grey[:rows, :cols] / 255.0).astype(int)
    err = np.abs(centres[scored] - expect[scored]).max(axis=1)  # cividis of each scored cell, through JPEG
    assert np.percentile(err, 95) <= 12 and err.max() <= 32
    glass = centres[~scored].min(axis=1)  # glass where nothing was scored (no cividis colour has all >= 200)
    assert glass.min() >= 200 and (glass >= 240).mean() > 0.95, np.sort(glass)[:10]


def test_write_pyramid_keeps_a_fractional_mpp_and_three_levels_for_a_small_mosaic(tmp_path):
    case = tifffile.imread(DEMO_CASE)[:600, :700]
    mosaic = Mosaic(tmp_path / "m")
    for y in range(0, 600, 200):
        for x in range(0, 700, 300):
            mosaic.write(x, y, case[y:y + 200, x:x + 300])
    path = tmp_path / "small.tif"
    try:
        levels = write_pyramid(path, mosaic.width, mosaic.height, mosaic.bands(BAND), 0.2527, tmp_path, "small")
    finally:
        mosaic.remove()
    assert levels == 3 and not list(tmp_path.glob(".pyramid-*"))  # reduced levels' scratch files are gone
    with openslide.OpenSlide(path) as slide:
        assert slide.level_count == 3
        assert slide.level_dimensions == ((700, 600), (350, 300), (175, 150))
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.2527, rel=1e-6)
        assert mean_abs_diff(np.asarray(slide.read_region((0, 0), 0, (700, 600)).convert("RGB")), case) < 3
        expect = case
        for level in (1, 2):
            expect = box2(expect)
            got = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))
            assert mean_abs_diff(got, expect) < 3, level
    assert JPEG_QUALITY >= 85


def test_the_pyramid_tiles_are_the_bytes_tifffiles_own_jpeg_path_writes(tmp_path):
    """The pyramid encodes its tiles itself, on threads kept fed, and hands tifffile the bytes: every tile of
    level 0 (edge tiles padded with glass) is byte for byte what tifffile's own JPEG path writes for the same
    pixels and arguments, so readers see exactly the file they saw before."""
    from appliance.pipeline.pyramid import GLASS, JPEG_SUBSAMPLING

    case = tifffile.imread(DEMO_CASE)[:600, :700]
    ours = tmp_path / "ours.tif"
    bands = (case[y:y + BAND] for y in range(0, 600, BAND))
    write_pyramid(ours, 700, 600, bands, 0.25, tmp_path, "ours")
    padded = np.pad(case, ((0, -600 % PYRAMID_TILE), (0, -700 % PYRAMID_TILE), (0, 0)), constant_values=GLASS)
    theirs = tmp_path / "theirs.tif"
    tifffile.imwrite(theirs, padded, tile=(PYRAMID_TILE, PYRAMID_TILE), photometric="rgb", compression="jpeg",
                     compressionargs={"level": JPEG_QUALITY}, subsampling=JPEG_SUBSAMPLING, metadata=None)

    def tile_bytes(path):
        with tifffile.TiffFile(path) as tif, open(path, "rb") as f:
            page = tif.pages[0]
            out = []
            for offset, count in zip(page.dataoffsets, page.databytecounts):
                f.seek(offset)
                out.append(f.read(count))
            return out

    ours_tiles, their_tiles = tile_bytes(ours), tile_bytes(theirs)
    assert len(ours_tiles) == 3 * 3 and ours_tiles == their_tiles


def test_encoded_keeps_the_order_and_passes_an_encoders_error_on():
    """The tiles come back in the order they went in, whatever thread finished first; an error in one
    encoding reaches the writer."""
    import random
    import time

    from appliance.pipeline.pyramid import encoded

    def slow_square(n):
        time.sleep(random.random() / 1000)
        return n * n

    assert list(encoded(range(200), slow_square, workers=3, ahead=7)) == [n * n for n in range(200)]

    def fails_at_5(n):
        if n == 5:
            raise ValueError("tile 5 could not be encoded")
        return n

    got = []
    with pytest.raises(ValueError, match="tile 5"):
        for value in encoded(range(50), fails_at_5, workers=2, ahead=4):
            got.append(value)
    assert got == [0, 1, 2, 3, 4]


def test_the_case_files_are_the_same_written_side_by_side_or_one_at_a_time(ov_engine, tmp_path, monkeypatch):
    """The files are written on a pool and the pyramid's tiles encoded on threads: every file comes out
    byte for byte as written on one thread, so every level's pixels are too (summary.json but its timings)."""
    from appliance.pipeline import outputs, pyramid

    side_by_side = tmp_path / "pool"
    triage_path(ov_engine, DEMO_CASE, out_dir=side_by_side)
    monkeypatch.setattr(outputs, "WORKERS", 1)
    monkeypatch.setattr(pyramid, "JPEG_WORKERS", 1)
    one_at_a_time = tmp_path / "serial"
    triage_path(ov_engine, DEMO_CASE, out_dir=one_at_a_time)
    names = sorted(p.name for p in side_by_side.iterdir())
    assert names == sorted(p.name for p in one_at_a_time.iterdir())
    assert {"case.ome.tif", "heatmap.ome.tif", "overlay.png", "top_patches.json"} <= set(names)
    for name in names:
        a, b = (side_by_side / name).read_bytes(), (one_at_a_time / name).read_bytes()
        if name == "summary.json":
            a, b = ({k: v for k, v in json.loads(x).items() if k != "timings_ms"} for x in (a, b))
        assert a == b, name


def test_the_overlay_blend_by_bands_is_the_blend_of_the_whole_image():
    from appliance.pipeline.outputs import _blend

    rng = np.random.default_rng(3)
    thumb, heat = (rng.integers(0, 256, (150, 97, 3), dtype=np.uint8) for _ in range(2))
    scored = rng.random((150, 97)) < 0.8
    whole = np.where(scored[..., None], 0.45 * thumb.astype(np.float32) + 0.55 * heat, thumb).astype(np.uint8)
    assert np.array_equal(_blend(thumb, heat, scored), whole)


# ------------------------------------------------------------------------------------------- regions
def assert_qupath_feature(f: dict) -> None:
    """One Feature as QuPath's GeoJSON reader wants it (objectType, classification, measurements)."""
    assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
    assert str(uuid.UUID(f["id"])) == f["id"]  # QuPath takes "id" as the object's UUID
    props = f["properties"]
    assert props["objectType"] == "annotation"
    assert props["isLocked"] is True
    cls = props["classification"]
    assert set(cls) == {"name", "color"} and cls["name"] == "Suspicious"
    assert len(cls["color"]) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])
    m = props["measurements"]
    assert set(m) >= {"max_probability", "mean_probability", "cells"}
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in m.values())
    # QuPath drops numeric properties outside measurements: none are left there
    for key, value in props.items():
        if key not in ("measurements", "classification"):
            assert isinstance(value, (str, bool)), key
            assert not isinstance(value, bool) or key == "isLocked", key


def test_regions_geojson_is_what_qupath_imports(demo_out, ov_engine):
    out, _, summary = demo_out
    geo = json.loads((out / "regions.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and geo["features"]
    threshold = ov_engine.manifest.decision.patch_threshold
    for f in geo["features"]:
        assert_qupath_feature(f)
        m = f["properties"]["measurements"]
        assert threshold <= m["mean_probability"] <= m["max_probability"] <= 1
        assert m["cells"] >= 4  # MIN_REGION_CELLS
    assert len({f["id"] for f in geo["features"]}) == len(geo["features"])


def test_regions_measure_each_region_under_measurements():
    heat = np.full((6, 9), np.nan, np.float32)
    heat[1:3, 1:3] = 0.8  # 4 cells
    heat[1:5, 5:8] = 0.6  # 12 cells
    heat[4, 6] = 0.95
    feats = regions(heat, 0.5, 25)
    assert len(feats) == 2
    for f in feats:
        assert_qupath_feature(f)
    by_cells = {f["properties"]["measurements"]["cells"]: f["properties"]["measurements"] for f in feats}
    assert set(by_cells) == {4, 12}
    assert by_cells[4] == {"max_probability": 0.8, "mean_probability": 0.8, "cells": 4, "area_px": 4 * 625}
    assert by_cells[12]["max_probability"] == 0.95
    assert by_cells[12]["mean_probability"] == pytest.approx((11 * 0.6 + 0.95) / 12, abs=1e-4)
    assert feats[0]["id"] != feats[1]["id"]


@pytest.mark.parametrize("change", [
    {"probability": "high"}, {"x": "12a"}, {"colour": "red"}, None,  # None: the patch's probability is removed
])
def test_summary_validation_refuses_a_malformed_patch(demo_out, change):
    """summary.json's patches are checked in pydantic's core (a TypedDict): a wrong type, an unknown key or a
    missing probability is refused, on one patch among hundreds, as the models did."""
    from pydantic import ValidationError

    from appliance.pipeline.summary import validated

    _, _, summary = demo_out
    summary = {k: v for k, v in summary.items() if k not in ("case_id", "outputs")}
    assert validated(summary) is summary
    patches = [dict(p) for p in summary["patches"]]
    i = len(patches) // 2
    if change is None:
        del patches[i]["probability"]
    else:
        patches[i].update(change)
    with pytest.raises(ValidationError, match=f"patches.{i}"):
        validated(dict(summary, patches=patches))
