"""A 40x scan streamed as JPEG tiles over a real pty through the daemon: its case pyramid is the scan as it
arrived (issue 39). Level 0 at the scan's um/px, the scanner's JPEG tiles in it byte for byte, the top patches
and regions in its pixels; and the model saw the same tissue as at its own resolution."""

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from appliance.api.app import ApiParts, ApiServer, create_app
from appliance.api.logins import hash_password
from appliance.config import load_settings
from appliance.offline.demo import case_info_for
from appliance.offline.scans import MODEL_MPP, SCANNER_MPP, upsampled
from appliance.service.daemon import Daemon
from appliance.terms import CaseFile
from firmware_bridge.emulator import ScannerEmulator, TileToSend
from tests.conftest import MODEL_DIR, ROOT
from tests.ptys import open_pty
from tests.stores import open_store

TILE = 1024
FACTOR = round(MODEL_MPP / SCANNER_MPP["40x"])  # 16 scanner pixels per model pixel


@pytest.fixture(scope="module")
def scan_40x(demo_image) -> list[TileToSend]:
    """3 x 3 tiles of 1024 px at 0.25 um/px from a tissue region of the demo case, the right column and the
    bottom row cut short (a scan's edge)."""
    m = TILE // FACTOR
    tiles = []
    for ty in range(3):
        for tx in range(3):
            region = demo_image[300 + ty * m:300 + (ty + 1) * m, 550 + tx * m:550 + (tx + 1) * m]
            px = upsampled(region, FACTOR, seed=10 * ty + tx)
            w, h = (TILE if tx < 2 else 600), (TILE if ty < 2 else 400)
            tiles.append(TileToSend(tx * TILE, ty * TILE, np.ascontiguousarray(px[:h, :w])))
    return tiles


@dataclass
class Streamed:
    settings: object
    info: object
    sent: object  # the emulator's result (digests of the JPEG bytes it sent)
    tiles: list  # the store's tiles rows


@pytest.fixture(scope="module")
def streamed_40x(tmp_path_factory, scan_40x) -> Streamed:
    """The 40x scan through the real daemon over a real pty, its files written."""
    settings = load_settings(None, data_dir=tmp_path_factory.mktemp("scan40x") / "var", model_dir=MODEL_DIR,
                             api_port=0)
    with open_pty() as pty_pair:
        daemon = Daemon(settings, port=pty_pair.path)
        daemon.start()
        try:
            info = case_info_for("SCAN-40X", "S-40X", scan_40x, SCANNER_MPP["40x"], TILE)
            sent = ScannerEmulator(pty_pair.transport(), info, scan_40x, encoding="jpeg", jpeg_quality=80,
                                   keep_digests=True).run()
            progress = daemon.wait_case("SCAN-40X", timeout=120)
            assert progress is not None and progress.result is not None
            assert progress.outputs_done.wait(120)
            tiles = daemon.store.tiles("SCAN-40X")
        finally:
            daemon.stop()
    assert sorted(sent.acked) == list(range(len(scan_40x)))
    return Streamed(settings, info, sent, tiles)


def test_a_40x_case_pyramid_is_the_scan_as_it_arrived(streamed_40x, scan_40x):
    settings, info, sent = streamed_40x.settings, streamed_40x.info, streamed_40x.sent
    folder = settings.cases_dir / "SCAN-40X"

    # the spool kept the scanner's JPEG bytes (their sha256 logged), not decoded pixels
    spooled = sorted(settings.spool_dir.joinpath("SCAN-40X").glob("tile-*.jpg"))
    assert len(spooled) == len(scan_40x)
    assert {r["idx"]: r["sha256"] for r in streamed_40x.tiles} == sent.digests

    slide = openslide.OpenSlide(folder / CaseFile.CASE_OME)
    assert slide.dimensions == (info.image_width, info.image_height) == (2648, 2448)
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(SCANNER_MPP["40x"], rel=0.01)
    assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(SCANNER_MPP["40x"], rel=0.01)
    assert slide.level_count >= 4 and slide.level_downsamples[1] == pytest.approx(2, rel=0.01)

    # level 0's tiles: the four full scanner tiles passed through byte for byte; the cut-short edge tiles
    # encoded once (padded), their pixels where the scanner put them
    with tifffile.TiffFile(folder / CaseFile.CASE_OME) as tif:
        page = tif.pages[0]
        assert (page.tilewidth, page.tilelength) == (TILE, TILE)
        stored = []
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            tif.filehandle.seek(offset)
            stored.append(hashlib.sha256(tif.filehandle.read(count)).hexdigest())
    full = [i for i, t in enumerate(scan_40x) if t.pixels.shape[:2] == (TILE, TILE)]
    assert len(full) == 4 and [stored[i] == sent.digests[i] for i in range(9)] == [i in full for i in range(9)]
    edge = scan_40x[8]
    got = np.asarray(slide.read_region((edge.x, edge.y), 0, (edge.w, edge.h)).convert("RGB"), dtype=np.int16)
    assert np.abs(got - edge.pixels).mean() < 6  # JPEG twice (q80 at the scanner, q90 here): close, not equal

    # the top patches and the regions in level-0 pixels of the scan: a 50 px model patch is 800 scanner px
    top = json.loads((folder / CaseFile.TOP_PATCHES_JSON).read_text())
    sides = {(p["w"], p["h"]) for p in top["patches"]}
    assert (50 * FACTOR, 50 * FACTOR) in sides and max(max(s) for s in sides) == 50 * FACTOR  # edge ones clipped
    assert all(0 <= p["x"] < slide.dimensions[0] and 0 <= p["y"] < slide.dimensions[1] for p in top["patches"])
    regions = json.loads((folder / CaseFile.REGIONS).read_text())
    assert regions["properties"]["units"] == "level-0 pixels of case.ome.tif"
    points = [pt for f in regions["features"] for ring in f["geometry"]["coordinates"] for pt in ring]
    assert points and max(x for x, _ in points) > 600  # beyond the model-resolution mosaic (166 px wide)
    # (the heatmap's cells run up to one patch past the scanned edge, as at the model's resolution)
    assert max(x for x, _ in points) <= slide.dimensions[0] + 50 * FACTOR
    assert max(y for _, y in points) <= slide.dimensions[1] + 50 * FACTOR


def test_a_jpeg_tile_s_model_pixels_come_from_a_reduced_decode_close_to_the_full_one(scan_40x, ov_engine):
    """The session's JPEG path (decoded at 1/8) and its decoded-pixels path give the model nearly the same
    input, so the same call on the same tiles."""
    from appliance.pipeline import TriageSession

    def payload(t):
        out = io.BytesIO()
        Image.fromarray(t.pixels).save(out, format="JPEG", quality=80)
        return out.getvalue()

    results = []
    for reduced in (True, False):
        session = TriageSession(ov_engine, batch_size=16, scanner_mpp=SCANNER_MPP["40x"], width=2648, height=2448)
        try:
            for t in scan_40x:
                data = payload(t)
                if reduced:
                    session.add_jpeg(t.x, t.y, data)
                else:
                    session.add_tile(t.x, t.y, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            results.append(session.finish())
        finally:
            session.close()
    a, b = results
    assert a.verdict == b.verdict and len(a.patches) == len(b.patches) > 0
    assert a.score == pytest.approx(b.score, abs=0.02)


def test_the_viewer_shows_a_40x_case_at_the_scan_s_full_resolution(streamed_40x, chromium):
    """Debian's headless Chromium on the streamed 40x case: zoomed to full resolution, the deep zoom's top
    level is the scan's level 0 (2648 px wide, 0.25 um/px, said on the page) and its tiles are 1:1 with it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    settings = streamed_40x.settings
    store = open_store(settings.db_path)
    store.set_user("drsmith", hash_password("a long enough password"), by="test")
    server = ApiServer(create_app(ApiParts(settings, store)), "127.0.0.1", 0)
    server.start()
    try:
        wait = WebDriverWait(chromium, 30)
        js = chromium.execute_script
        chromium.get(f"http://127.0.0.1:{server.port}/viewer/login")
        chromium.find_element(By.ID, "name").send_keys("drsmith")
        chromium.find_element(By.ID, "password").send_keys("a long enough password")
        chromium.find_element(By.ID, "login").click()
        wait.until(lambda d: d.find_elements(By.ID, "cases"))
        chromium.get(f"http://127.0.0.1:{server.port}/viewer/cases/SCAN-40X")
        wait.until(lambda d: js("return window.review && window.review.tilesLoaded > 0"))
        assert chromium.find_element(By.ID, "view-source").text == "case.ome.tif"
        assert chromium.find_element(By.ID, "resolution").text == "0.25 µm/px at full resolution"
        assert js("return window.review.mpp") == pytest.approx(SCANNER_MPP["40x"], rel=0.01)
        width = js("return window.review.viewer.world.getItemAt(0).source.width")
        assert width == streamed_40x.info.image_width == 2648  # the scan's pixels, not the model's 166
        top = int(np.ceil(np.log2(width)))
        assert js("return window.review.maxLevelLoaded") < top

        js("const v = window.review.viewer; v.viewport.zoomTo(v.viewport.imageToViewportZoom(1), null, true);")
        wait.until(lambda d: js("return window.review.maxLevelLoaded") == top)
        wait.until(lambda d: js("return window.review.lastTile.level") == top)
        tile = js("return window.review.lastTile")
        # a full-resolution tile: as many image pixels as scan pixels (254 + the 1 px overlap on each inner side)
        assert tile["width"] == tile["sourceWidth"] and tile["height"] == tile["sourceHeight"]
        assert 254 <= tile["width"] <= 256 and 254 <= tile["height"] <= 256
        assert "image zoom 1.00x, 0.250 µm per screen pixel" == chromium.find_element(By.ID, "zoom-level").text
        SCREENSHOTS = ROOT / "tests" / "output" / "viewer"
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        chromium.save_screenshot(str(SCREENSHOTS / "scan-40x-full-resolution.png"))
    finally:
        server.stop()
        store.close()
