"""Pilot drives the real app against a real daemon streaming the demo case over a pty."""

import asyncio

import httpx
import numpy as np
from textual.widgets import ProgressBar, Static

from appliance.tui.app import TriageApp
from appliance.tui.screens import CaseScreen, HistoryScreen, SignOffDialog
from appliance.offline.sources import tiles_from_image
from firmware_bridge.emulator import TileToSend
from tests.images import gaussian_blur
from tests.tui.conftest import wait_for


def text(widget) -> str:
    return str(widget.content)


def test_live_scan_alert_verdict_card_and_sign_off(bench, settings):
    async def scenario():
        app = TriageApp(bench.url, settings.token_path, poll_s=0.1)
        async with app.run_test(size=(80, 24)) as pilot:
            bench.stream("TUI-1")
            bar = app.live.query_one("#received", ProgressBar)
            alert = app.live.query_one("#alert", Static)
            seen = []  # the progress bar at each look until the alert fired

            def fired():
                seen.append(bar.progress)
                return alert.has_class("-fired")

            await wait_for(pilot, fired, timeout=60, what="the early-positive alert")
            alert_text = text(alert)
            await wait_for(pilot, lambda: isinstance(app.screen, CaseScreen) and app.screen.case is not None,
                           what="the verdict card")
            card = app.screen
            await wait_for(pilot, lambda: "SUSPICIOUS" in text(card.query_one("#verdict", Static)),
                           what="the verdict")
            verdict, facts = text(card.query_one("#verdict", Static)), text(card.query_one("#facts", Static))
            advice, model = text(card.query_one("#advice", Static)), text(card.query_one("#model", Static))
            notices = [text(s) for s in card.query(".notice")]
            await pilot.press("s")
            await wait_for(pilot, lambda: isinstance(app.screen, SignOffDialog), what="the sign-off dialog")
            await pilot.press(*"JS")
            await pilot.press("tab", *"agree", "enter")
            await wait_for(pilot, lambda: isinstance(app.screen, CaseScreen), what="the dialog to close")
            await wait_for(pilot, lambda: "Signed off by JS" in text(card.query_one("#signoff-state", Static)),
                           what="the card to show the sign-off")
            await pilot.press("h")
            await wait_for(pilot, lambda: isinstance(app.screen, HistoryScreen) and app.screen.rows,
                           what="the history")
            history = app.screen.rows
        return seen, alert_text, verdict, facts, advice, model, notices, history

    seen, alert_text, verdict, facts, advice, model, notices, history = asyncio.run(scenario())
    advancing = sorted(set(p for p in seen if p))
    assert len(advancing) >= 3 and advancing == sorted(advancing), seen  # the bar moved on as tiles came
    assert "EARLY POSITIVE" in alert_text and "TUI-1" in alert_text
    assert "▲" in verdict and "SUSPICIOUS" in verdict  # a word and a symbol, never colour alone
    assert "threshold" in facts and "Called early" in facts
    assert "pathologist review" in advice
    assert "idc-resnet" in model
    assert notices and all("not for diagnosis" in n.lower() for n in notices)
    audit = bench.daemon.store.audit_log("TUI-1")
    assert [(a["actor"], a["action"], a["detail"]["comment"]) for a in audit] == [("JS", "sign-off", "agree")]
    assert history[0]["id"] == "TUI-1" and history[0]["signed_off_by"] == "JS"


def test_sign_off_without_a_readable_token_is_explained(bench, settings, tmp_path):
    async def scenario():
        app = TriageApp(bench.url, tmp_path / "no-such-token", poll_s=0.1, open_verdicts=False)
        async with app.run_test(size=(80, 24)) as pilot:
            bench.stream("TUI-2", pace=0.0)
            await wait_for(pilot, lambda: app.live.last_case == "TUI-2", what="the call")
            await pilot.press("v")
            await wait_for(pilot, lambda: isinstance(app.screen, CaseScreen) and app.screen.case is not None,
                           what="the card")
            await pilot.press("s")
            await wait_for(pilot, lambda: isinstance(app.screen, SignOffDialog), what="the dialog")
            await pilot.press(*"AB", "enter")
            error = app.screen.query_one("#signoff-error", Static)
            await wait_for(pilot, lambda: text(error), what="an error")
            return text(error), isinstance(app.screen, SignOffDialog)

    error, still_open = asyncio.run(scenario())
    assert "Not signed off" in error and "cannot read the API token" in error and still_open
    assert bench.daemon.store.audit_log("TUI-2") == []


def test_qc_found_after_the_early_call_is_a_warning_in_the_summary_the_api_the_log_and_on_the_card(
        bench, settings, demo_image):
    """The demo case, then the same slide out of focus below it: the call comes early, on the sharp tiles;
    the blur comes after it, so it must be reported as a warning everywhere, not dropped."""
    blurred = gaussian_blur(demo_image, 2.0)
    tiles = bench.tiles + [TileToSend(t.x, demo_image.shape[0] + t.y, np.ascontiguousarray(t.pixels))
                           for t in tiles_from_image(blurred, 200)]

    async def scenario():
        app = TriageApp(bench.url, settings.token_path, poll_s=0.1)
        async with app.run_test(size=(120, 40)) as pilot:
            bench.stream("TUI-W", pace=0.0, tiles=tiles)
            await wait_for(pilot, lambda: isinstance(app.screen, CaseScreen) and app.screen.case is not None
                           and app.screen.case.get("verdict") is not None, what="the verdict card")
            return text(app.screen.query_one("#facts", Static)), text(app.screen.query_one("#advice", Static))

    facts, advice = asyncio.run(scenario())
    assert bench.daemon.wait_case("TUI-W", 60).outputs_done.wait(120)  # summary.json is written after the call
    with httpx.Client(base_url=bench.url, timeout=10) as c:
        case = c.get("/cases/TUI-W").json()
        summary = c.get("/cases/TUI-W/summary.json").json()
    assert case["verdict"] == summary["verdict"] == "suspicious"
    called_after = case["early_positive_after_tiles"]
    assert case["early_positive"] and called_after <= len(bench.tiles)  # on the sharp half
    assert [w["code"] for w in case["warnings"]] == [w["code"] for w in summary["warnings"]] == ["out-of-focus"]
    assert case["reasons"] == summary["reasons"] == []
    message = case["warnings"][0]["message"]
    assert message.startswith("Rescan: out of focus in") and summary["qc"]["out_of_focus_fraction"] > 0.3
    assert case["patch_threshold"] == summary["patch_threshold"] == bench.daemon.engine.manifest.decision.patch_threshold
    # the case's log in SQLite
    logged = [e for e in bench.daemon.store.events("TUI-W") if e["kind"] == "qc-warning"]
    assert [(e["detail"]["code"], e["detail"]["message"]) for e in logged] == [("out-of-focus", message)]
    finished = next(e for e in bench.daemon.store.events("TUI-W") if e["kind"] == "finished")
    assert finished["detail"]["warnings"] == case["warnings"]
    # and on the technician's card, next to the early call
    assert f"Called early: after {called_after} of {len(tiles)} tiles" in facts
    assert "QC warnings" in advice and message in " ".join(advice.split())
