"""The browser viewer (/viewer/) over real HTTP, on a real case (the demo slide's tumour called by the shipped
model, its files written as the daemon writes them): logins (argon2, the failed-login limit, the cookie's
flags), the worklist, deep-zoom tiles, CSRF on sign-off, the audit with the reviewer's name; and the whole
review in Debian's headless Chromium (selenium), with screenshots in tests/output/viewer/."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from appliance.api.app import ApiParts, ApiServer, create_app
from appliance.api.logins import FAILURES_ALLOWED, hash_password
from appliance.config import load_settings
from appliance.pipeline import TriageSession
from appliance.store import CaseStore
from tests.conftest import MODEL_DIR, ROOT
from tests.stores import open_store
from tests.cli import appliance

PASSWORD = "correct horse battery staple"
SCREENSHOTS = ROOT / "tests" / "output" / "viewer"


def called_case(engine, store: CaseStore, cases_dir: Path, case_id: str, pixels: np.ndarray, tile: int = 200) -> None:
    """A case called as the daemon calls one: its tiles through a TriageSession, the call stored, its files
    written."""
    h, w = pixels.shape[:2]
    store.case_started(case_id, specimen_id=f"S-{case_id}", tiles_expected=(h // tile) * (w // tile),
                       model=engine.model_ref)
    session = TriageSession(engine, scanner_mpp=4.0, width=w, height=h)
    try:
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                session.add_tile(x, y, np.ascontiguousarray(pixels[y:y + tile, x:x + tile]))
        result = session.finish()
        store.case_finished(case_id, result)
        session.write_outputs(cases_dir / case_id, case_id, result.summary("test"))
    finally:
        session.close()


@pytest.fixture(scope="module")
def viewer(tmp_path_factory, ov_engine, demo_image):
    """The API with the viewer on 127.0.0.1, two called cases and one reviewer."""
    data = tmp_path_factory.mktemp("viewer") / "var"
    settings = load_settings(None, data_dir=data, model_dir=MODEL_DIR, api_port=0)
    store = open_store(settings.db_path)
    called_case(ov_engine, store, settings.cases_dir, "V-TUMOUR", demo_image)  # the whole bundled case
    called_case(ov_engine, store, settings.cases_dir, "V-EDGE", demo_image[0:400, 0:400])
    store.set_user("drsmith", hash_password(PASSWORD), by="test")
    server = ApiServer(create_app(ApiParts(settings, store)), "127.0.0.1", 0)
    server.start()
    try:
        yield store, f"http://127.0.0.1:{server.port}", settings
    finally:
        server.stop()
        store.close()


@contextmanager
def logged_in(url: str):
    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/viewer/login", data={"name": "drsmith", "password": PASSWORD, "next": "/viewer/"})
        assert r.status_code == 303 and r.headers["location"] == "/viewer/"
        client.cookies.set("appliance_session", r.cookies["appliance_session"])  # httpx sends Secure ones on https only
        yield client


def test_a_wrong_password_gets_no_session_and_the_cookie_is_httponly_secure_samesite(viewer):
    store, url, _ = viewer
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/viewer/").headers["location"] == "/viewer/login?next=/viewer/"
        wrong = c.post("/viewer/login", data={"name": "drsmith", "password": "not the password"})
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers and "Wrong name or password" in wrong.text
        unknown = c.post("/viewer/login", data={"name": "nobody", "password": PASSWORD})
        assert unknown.status_code == 401 and "set-cookie" not in unknown.headers
        c.cookies.set("appliance_session", "made-up")
        assert c.get("/viewer/").status_code == 303
        c.cookies.clear()
        ok = c.post("/viewer/login", data={"name": "drsmith", "password": PASSWORD})
        cookie = ok.headers["set-cookie"]
        assert ok.status_code == 303 and all(f in cookie for f in ("HttpOnly", "Secure", "SameSite=strict", "Path=/"))
    actions = [(a["actor"], a["action"]) for a in store.audit_log()]
    assert ("drsmith", "login-failed") in actions and ("drsmith", "login") in actions


def test_failed_logins_past_the_limit_are_refused_even_with_the_right_password(viewer):
    store, url, _ = viewer
    store.set_user("locum", hash_password(PASSWORD), by="test")
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(FAILURES_ALLOWED):
            assert c.post("/viewer/login", data={"name": "locum", "password": "guess guess guess"}).status_code == 401
        blocked = c.post("/viewer/login", data={"name": "locum", "password": PASSWORD})
        assert blocked.status_code == 429 and "Too many failed logins" in blocked.text
        assert "set-cookie" not in blocked.headers


def test_the_worklist_puts_suspicious_first_and_the_case_page_serves_its_deep_zoom(viewer):
    store, url, _ = viewer
    with logged_in(url) as c:
        page = c.get("/viewer/")
        assert page.status_code == 200 and "research" in page.text.lower()
        order = re.findall(r'class="case-link" href="/viewer/cases/([^"]+)"', page.text)
        calls = {r["id"]: r["verdict"] for r in store.list_cases()}
        assert sorted(order) == ["V-EDGE", "V-TUMOUR"] and calls["V-TUMOUR"] == "suspicious"
        assert order[0] == "V-TUMOUR"
        only = c.get("/viewer/", params={"call": "suspicious"})
        assert re.findall(r'class="case-link" href="/viewer/cases/([^"]+)"', only.text) == ["V-TUMOUR"]
        case = c.get("/viewer/cases/V-TUMOUR")
        assert case.status_code == 200 and "suspicious" in case.text
        dzi = c.get("/viewer/cases/V-TUMOUR/slide.dzi").text
        width, height = map(int, re.search(r'Width="(\d+)" Height="(\d+)"', dzi).groups())
        top = int(np.ceil(np.log2(max(width, height))))  # the full-resolution level
        tile = c.get(f"/viewer/cases/V-TUMOUR/slide_files/{top}/0_0.jpeg")
        assert tile.status_code == 200 and tile.content[:2] == b"\xff\xd8"
        assert c.get(f"/viewer/cases/V-TUMOUR/slide_files/{top + 1}/0_0.jpeg").status_code == 404
        assert c.get("/viewer/cases/V-TUMOUR/heatmap.dzi").status_code == 200
        assert c.get("/viewer/cases/V-TUMOUR/patch/0.png").content[:4] == b"\x89PNG"
        assert c.get("/viewer/osd/openseadragon.min.js").status_code == 200  # served here, never from a CDN


def test_a_sign_off_needs_its_csrf_token_and_is_audited_with_the_reviewer_s_name(viewer):
    store, url, _ = viewer
    with logged_in(url) as c:
        csrf = re.search(r'name="csrf" value="([^"]+)"', c.get("/viewer/cases/V-EDGE").text).group(1)
        for bad in ({}, {"csrf": "not-the-token"}):
            r = c.post("/viewer/cases/V-EDGE/signoff", data={"comment": "forged", **bad})
            assert r.status_code == 403 and "CSRF" in r.text
        assert store.get_case("V-EDGE")["signed_off_by"] is None
        with logged_in(url) as theirs:  # another session's token is no good here either
            other_csrf = re.search(r'name="csrf" value="([^"]+)"', theirs.get("/viewer/cases/V-EDGE").text).group(1)
            assert other_csrf != csrf
        assert c.post("/viewer/cases/V-EDGE/signoff", data={"comment": "x", "csrf": other_csrf}).status_code == 403
        r = c.post("/viewer/cases/V-EDGE/signoff", data={"comment": "edge of the core", "csrf": csrf})
        assert r.status_code == 303
    case = httpx.get(f"{url}/cases/V-EDGE", timeout=30).json()
    assert case["signed_off_by"] == "drsmith" and case["sign_off_comment"] == "edge of the core"
    audit = [(a["actor"], a["action"], a["via"]) for a in store.audit_log("V-EDGE")]
    assert ("drsmith", "sign-off", "viewer") in audit


def test_a_disabled_reviewer_s_session_ends(viewer):
    store, url, _ = viewer
    store.set_user("leaver", hash_password(PASSWORD), by="test")
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/viewer/login", data={"name": "leaver", "password": PASSWORD})
        c.cookies.set("appliance_session", r.cookies["appliance_session"])
        assert c.get("/viewer/").status_code == 200
        store.disable_user("leaver", by="test")
        assert c.get("/viewer/").status_code == 303
        assert c.post("/viewer/login", data={"name": "leaver", "password": PASSWORD}).status_code == 401


def test_users_are_added_with_a_hashed_password_listed_and_disabled_from_the_command_line(tmp_path):
    def cli(*args, stdin=""):
        return appliance("users", *args, stdin=stdin, data=tmp_path / "var", model=MODEL_DIR)

    short = cli("add", "drjones", "--password-stdin", stdin="short\n")
    assert short.returncode == 1 and "at least 12 characters" in short.stderr
    bad = cli("add", "dr jones", "--password-stdin", stdin=PASSWORD + "\n")
    assert bad.returncode == 1 and "is not a reviewer name" in bad.stderr
    added = cli("add", "drjones", "--password-stdin", stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    store = open_store(tmp_path / "var" / "appliance.db")
    try:
        row = store.user("drjones")
        assert row["password_hash"].startswith("$argon2id$") and PASSWORD not in row["password_hash"]
        assert "drjones" in cli("list").stdout
        assert cli("disable", "drjones").returncode == 0 and store.user("drjones")["disabled_at"]
        assert cli("disable", "nobody").returncode == 1
        assert [a["action"] for a in store.audit_log() if a["detail"].get("user") == "drjones"] == [
            "user-added", "user-disabled"]
    finally:
        store.close()


def test_the_review_in_a_real_browser(viewer, chromium):
    """Debian's headless Chromium: log in, the worklist, the case, zoom to full resolution with its tiles
    loaded, the heatmap toggled, the regions seen, a patch of the gallery jumped to, signed off. Screenshots go
    to tests/output/viewer/."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    store, url, _ = viewer
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    wait = WebDriverWait(chromium, 30)
    js = chromium.execute_script

    chromium.get(f"{url}/viewer/")
    assert "/viewer/login" in chromium.current_url
    chromium.find_element(By.ID, "name").send_keys("drsmith")
    chromium.find_element(By.ID, "password").send_keys("a wrong password")
    chromium.find_element(By.ID, "login").click()
    wait.until(lambda d: d.find_elements(By.ID, "login-error"))
    assert "Wrong name or password" in chromium.find_element(By.ID, "login-error").text
    assert chromium.get_cookie("appliance_session") is None
    chromium.find_element(By.ID, "name").send_keys("drsmith")
    chromium.find_element(By.ID, "password").send_keys(PASSWORD)
    chromium.find_element(By.ID, "login").click()
    wait.until(lambda d: d.find_elements(By.ID, "cases"))
    assert chromium.find_element(By.ID, "who").text == "drsmith"
    assert "not" in chromium.find_element(By.ID, "notice").text.lower()  # research use, not diagnosis
    chromium.save_screenshot(str(SCREENSHOTS / "worklist.png"))

    chromium.find_element(By.CSS_SELECTOR, 'a.case-link[href="/viewer/cases/V-TUMOUR"]').click()
    wait.until(lambda d: js("return window.review && window.review.tilesLoaded > 0"))
    wait.until(lambda d: js("return !!(window.review.heatmap && window.review.regions)"))
    assert js("return window.review.regions.polygons") >= 1
    assert js("return window.review.regions.element.style.display") != "none"
    width = js("return window.review.viewer.world.getItemAt(0).source.width")
    top = int(np.ceil(np.log2(width)))
    assert js("return window.review.maxLevelLoaded") < top  # the whole case fits: not yet full resolution
    chromium.save_screenshot(str(SCREENSHOTS / "case.png"))

    # full resolution: one image pixel per screen pixel, and more (OpenSeadragon then draws the top level)
    js("const v = window.review.viewer; v.viewport.zoomTo(v.viewport.imageToViewportZoom(2), null, true);")
    wait.until(lambda d: js("return window.review.maxLevelLoaded") == top)
    chromium.save_screenshot(str(SCREENSHOTS / "full-resolution.png"))

    assert js("return window.review.heatmap.getOpacity()") > 0
    chromium.find_element(By.ID, "heatmap-on").click()
    assert js("return window.review.heatmap.getOpacity()") == 0
    chromium.find_element(By.ID, "heatmap-on").click()
    assert js("return window.review.heatmap.getOpacity()") > 0
    chromium.find_element(By.ID, "regions-on").click()
    assert js("return window.review.regions.element.style.display") == "none"
    chromium.find_element(By.ID, "regions-on").click()

    # the class-activation maps: over each gallery patch, and as a layer over the case, off until asked for
    assert js("return window.review.cams.length") == len(chromium.find_elements(By.CSS_SELECTOR, "#gallery .patch"))
    shown = "return window.review.cams.map(c => c.isConnected && getComputedStyle(c).display !== 'none')"
    assert not any(js(shown))
    chromium.find_element(By.ID, "cam-on").click()
    assert all(js(shown))
    painted = js("const c = document.querySelector('#gallery canvas.cam');"
                 "return Array.from(c.getContext('2d').getImageData(0, 0, 50, 50).data).filter((v, i) => i % 4 == 3"
                 " && v > 0).length")
    assert painted > 0  # the map is drawn, not an empty canvas
    chromium.save_screenshot(str(SCREENSHOTS / "cam.png"))

    before = js("return window.review.viewer.viewport.getCenter(true).x")
    chromium.find_elements(By.CSS_SELECTOR, "#gallery .patch")[1].click()
    wait.until(lambda d: abs(js("return window.review.viewer.viewport.getCenter(true).x") - before) > 1e-3)
    assert js("return document.querySelector('#gallery img').naturalWidth") > 0

    chromium.find_element(By.CSS_SELECTOR, "#signoff-form textarea").send_keys("reviewed in the browser")
    chromium.find_element(By.ID, "signoff").click()
    wait.until(lambda d: d.find_elements(By.ID, "signed-off"))
    assert "drsmith" in chromium.find_element(By.ID, "signed-off").text
    chromium.save_screenshot(str(SCREENSHOTS / "signed-off.png"))
    case = httpx.get(f"{url}/cases/V-TUMOUR", timeout=30).json()
    assert case["signed_off_by"] == "drsmith" and case["sign_off_comment"] == "reviewed in the browser"
    assert ("drsmith", "sign-off", "viewer") in [(a["actor"], a["action"], a["via"]) for a in store.audit_log("V-TUMOUR")]


def test_a_batch_case_is_viewed_on_its_original_slide_with_the_patches_and_regions_in_its_pixels(tmp_path,
                                                                                                   demo_image):
    """`appliance batch` on an SVS of real tissue: the viewer's deep zoom reads the slide file itself (its
    full-resolution tiles), the top patches (in case.ome.tif's pixels) scaled to it; once the slide is gone,
    the case pyramid, with the regions (in the slide's pixels) scaled down to it."""
    from appliance.offline.slides import write_svs

    svs = tmp_path / "core.svs"
    assert write_svs(svs, demo_image[:1000, :1200], upsample=4, mpp=1.0, downsamples=(1, 4)) == (4800, 4000)
    data = tmp_path / "var"
    env = dict(os.environ, APPLIANCE_DATA_DIR=str(data), APPLIANCE_MODEL_DIR=str(MODEL_DIR))
    batch = subprocess.run([sys.executable, "-m", "appliance.cli", "batch", str(svs), "--workers", "1"], env=env,
                           capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert batch.returncode == 0, batch.stderr[-2000:]
    settings = load_settings(None, data_dir=data, model_dir=MODEL_DIR, api_port=0)
    store = open_store(settings.db_path)
    store.set_user("drsmith", hash_password(PASSWORD), by="test")
    (case_id,) = [r["id"] for r in store.list_cases()]
    server = ApiServer(create_app(ApiParts(settings, store)), "127.0.0.1", 0)
    server.start()
    try:
        with logged_in(f"http://127.0.0.1:{server.port}") as c:
            page = c.get(f"/viewer/cases/{case_id}").text
            assert 'id="view-source">core.svs<' in page
            scale = float(re.search(r'data-scale="([0-9.]+)"', page).group(1))
            assert scale == pytest.approx(4800 / 1200, rel=0.01)  # the model read it at 4 um/px: 1200 px wide
            assert 'data-width="4800"' in page and 'data-regions-scale="1.0"' in page
            assert c.get(f"/viewer/cases/{case_id}/slide_files/13/0_0.jpeg").status_code == 200  # 2^13 > 4800
            svs.unlink()  # the slide moved away: the case pyramid is shown instead
            page = c.get(f"/viewer/cases/{case_id}").text
            assert 'id="view-source">case.ome.tif<' in page and 'data-scale="1.0"' in page
            assert float(re.search(r'data-regions-scale="([0-9.]+)"', page).group(1)) == pytest.approx(0.25, rel=0.01)
    finally:
        server.stop()
        store.close()
