"""Snapshots (pytest-textual-snapshot) of every screen at 80x24 and 120x40.

The app runs against the real API over HTTP, with a store holding two cases triaged by the real model just
now (one clear, one blurred into a cannot-call). Only what depends on the clock is pinned, so the pictures
are stable: the received/finished times and the early-call tile count. Update with --snapshot-update after
looking at the new pictures (tests/tui/__snapshots__/).
"""

import sqlite3

import numpy as np
import pytest
from PIL import Image, ImageFilter
from textual.widgets import Input

from appliance.api.app import ApiParts, ApiServer, create_app
from appliance.pipeline import TriageResult, TriageSession
from appliance.offline.sources import tiles_from_image
from appliance.tui.app import TriageApp
from appliance.tui.screens import CaseScreen, HistoryScreen, SignOffDialog
from tests.stores import open_store
from tests.tui.conftest import wait_for
from tests.daemon_standin import DaemonStandIn

SIZES = [(80, 24), (120, 40)]
LIVE = {
    "version": "0.1.0",
    "link": {"state": "up", "port": "/dev/scanner", "counters": {"crc_errors": 0}, "last_error": None},
    "case": {"case_id": "LIVE-7", "specimen_id": "S-2026-0042", "tiles_expected": 130, "tiles_received": 91,
             "tiles_processed": 88, "score": 0.912, "early_positive": True, "verdict": None, "eta_s": 14.0,
             "warnings": []},
}


def triage_into(engine, image, cases_dir, case_id) -> TriageResult:
    session = TriageSession(engine, height=image.shape[0], width=image.shape[1],
                            workdir=cases_dir / case_id / ".work")
    try:
        for t in tiles_from_image(image, 200):
            session.add_tile(t.x, t.y, np.ascontiguousarray(t.pixels))
        result = session.finish()
        session.write_outputs(cases_dir / case_id, case_id, result.summary(case_id))
    finally:
        session.close()
    return result


@pytest.fixture(scope="module")
def api_url(ov_engine, demo_image, tmp_path_factory):
    from appliance.config import load_settings
    from tests.conftest import MODEL_DIR

    settings = load_settings(None, data_dir=tmp_path_factory.mktemp("snap") / "var", model_dir=MODEL_DIR, api_port=0)
    store = open_store(settings.db_path)
    blurred = np.asarray(Image.fromarray(demo_image).filter(ImageFilter.GaussianBlur(4)))
    for case_id, specimen, image in (("SNAP-1", "S-2026-0040", demo_image), ("SNAP-2", "S-2026-0041", blurred)):
        result = triage_into(ov_engine, image, settings.cases_dir, case_id)
        store.case_started(case_id, specimen_id=specimen, tiles_expected=result.tiles, model=result.model)
        store.case_finished(case_id, result)
    with sqlite3.connect(settings.db_path) as db:  # pin what depends on the clock
        db.execute("UPDATE cases SET received_at = '2026-11-20T09:0' || substr(id, 6) || ':00.000+00:00', "
                   "finished_at = '2026-11-20T09:0' || substr(id, 6) || ':40.000+00:00', "
                   "early_positive_after_tiles = CASE WHEN early_positive THEN 34 END")
    server = ApiServer(create_app(ApiParts(settings, store, DaemonStandIn(LIVE))), "127.0.0.1", 0)
    server.start()
    yield f"http://127.0.0.1:{server.port}", settings
    server.stop()
    store.close()


def app_for(api_url):
    url, settings = api_url
    return TriageApp(url, settings.token_path, poll_s=0.1, open_verdicts=False)


async def open_card(pilot, case_id: str) -> None:
    app = pilot.app
    app.push_screen(CaseScreen(app.client, case_id))
    await wait_for(pilot, lambda: isinstance(app.screen, CaseScreen) and app.screen.case is not None,
                   what="the card")


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_live_screen(snap_compare, api_url, size):
    async def ready(pilot):
        await wait_for(pilot, lambda: "LIVE-7" in str(pilot.app.live.query_one("#case").content), what="status")
        await pilot.pause(0.3)

    assert snap_compare(app_for(api_url), terminal_size=size, run_before=ready)


@pytest.mark.parametrize("case_id", ["SNAP-1", "SNAP-2"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_verdict_card(snap_compare, api_url, size, case_id):
    async def ready(pilot):
        await open_card(pilot, case_id)
        await pilot.pause(0.3)

    assert snap_compare(app_for(api_url), terminal_size=size, run_before=ready)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_history_screen(snap_compare, api_url, size):
    async def ready(pilot):
        await pilot.press("h")
        await wait_for(pilot, lambda: isinstance(pilot.app.screen, HistoryScreen) and pilot.app.screen.rows,
                       what="the history")
        await pilot.pause(0.3)

    assert snap_compare(app_for(api_url), terminal_size=size, run_before=ready)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sign_off_dialog(snap_compare, api_url, size):
    async def ready(pilot):
        app = pilot.app
        await open_card(pilot, "SNAP-2")
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, SignOffDialog), what="the dialog")
        for field in app.screen.query(Input):
            field.cursor_blink = False  # a blinking cursor would make the picture depend on the moment
        await pilot.press(*"JS")
        await pilot.pause(0.3)

    assert snap_compare(app_for(api_url), terminal_size=size, run_before=ready)


def test_history_filters_by_call_and_searches_then_opens_a_card(api_url):
    import asyncio

    from textual.widgets import DataTable, Select

    async def scenario():
        app = app_for(api_url)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("h")
            await wait_for(pilot, lambda: isinstance(app.screen, HistoryScreen) and app.screen.rows, what="history")
            screen = app.screen
            table = screen.query_one(DataTable)
            everything = table.row_count
            screen.query_one("#verdict-filter", Select).value = "cannot-call"
            await wait_for(pilot, lambda: [r["id"] for r in screen.rows] == ["SNAP-2"], what="the filter")
            filtered = table.row_count
            screen.query_one("#verdict-filter", Select).clear()
            await wait_for(pilot, lambda: len(screen.rows) == 2, what="the filter cleared")
            await pilot.press("slash", *"0040")
            await wait_for(pilot, lambda: table.row_count == 1, what="the search")
            searched = table.get_row_at(0)[1]
            table.focus()
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, CaseScreen) and app.screen.case is not None,
                           what="the card")
            return everything, filtered, searched, app.screen.case_id

    assert asyncio.run(scenario()) == (2, 1, "SNAP-1", "SNAP-1")


def test_the_card_shows_the_accession_when_the_case_has_one(tmp_path):
    """The lab's accession number is on the verdict card beside the specimen when the case has one (and the
    snapshots above, without one, are unchanged)."""
    import asyncio

    from textual.widgets import Static

    from appliance.config import load_settings
    from tests.conftest import MODEL_DIR
    from tests.results import MODEL, a_result

    settings = load_settings(None, data_dir=tmp_path / "var", model_dir=MODEL_DIR, api_port=0)
    store = open_store(settings.db_path)
    store.case_started("ACC-1", specimen_id="S-2026-0050", accession="S26-00042", model=MODEL)
    store.case_finished("ACC-1", a_result("suspicious", 0.91))
    server = ApiServer(create_app(ApiParts(settings, store, DaemonStandIn(LIVE))), "127.0.0.1", 0)
    server.start()

    async def scenario():
        app = app_for((f"http://127.0.0.1:{server.port}", settings))
        async with app.run_test(size=(120, 40)) as pilot:
            await open_card(pilot, "ACC-1")
            return str(app.screen.query_one("#facts", Static).content)

    try:
        facts = asyncio.run(scenario())
    finally:
        server.stop()
        store.close()
    assert "specimen S-2026-0050   accession S26-00042   status done" in facts
