"""The real app in a real terminal: `appliance tui` under tmux, keys sent, the pane captured.

Needs tmux on PATH (Debian: the tmux package); without it these tests skip."""

import shlex
import shutil
import subprocess
import sys
import uuid

import pytest

from tests.waiting import wait_until


@pytest.fixture(scope="session")
def tmux() -> str:
    path = shutil.which("tmux")
    if path is None:
        pytest.skip("tmux is not installed (Debian: the tmux package): no terminal to run the TUI in")
    return path


def capture(tmux: str, session: str) -> str:
    return subprocess.run([tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True,
                          timeout=10).stdout


def wait_pane(tmux: str, session: str, needle: str, timeout: float = 90) -> str:
    """The pane, once ``needle`` is on it."""
    last = [""]

    def shown() -> str | None:
        last[0] = capture(tmux, session)
        return last[0] if needle in last[0] else None

    return wait_until(shown, timeout, interval=0.2, what=f"{needle!r} in the pane",
                      detail=lambda: f"the pane was:\n{last[0]}")


def session_alive(tmux: str, session: str) -> bool:
    return subprocess.run([tmux, "has-session", "-t", session], capture_output=True, timeout=10).returncode == 0


@pytest.mark.parametrize("width, height", [(80, 24), (120, 40)])
def test_tui_in_tmux_shows_the_live_scan_then_the_verdict(tmux, bench, settings, width, height):
    """In an 80x24 and a 120x40 terminal: the live scan, the early-positive alert, the card, then the history."""
    session = f"tui-{uuid.uuid4().hex[:8]}"
    case_id = f"TMUX-{width}"
    cmd = (f"APPLIANCE_DATA_DIR={shlex.quote(str(settings.data_dir))} {shlex.quote(sys.executable)} -m appliance.cli "
           f"tui --api {bench.url}")
    subprocess.run([tmux, "new-session", "-d", "-s", session, "-x", str(width), "-y", str(height), cmd], check=True,
                   timeout=10)
    try:
        size = subprocess.run([tmux, "display-message", "-p", "-t", session, "#{window_width}x#{window_height}"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        assert size == f"{width}x{height}", size
        wait_pane(tmux, session, "Scanner link:")
        bench.stream(case_id, pace=0.02)
        live = wait_pane(tmux, session, "EARLY POSITIVE")
        card = wait_pane(tmux, session, "SUSPICIOUS  ▲")
        wait_pane(tmux, session, "Prioritise this case")
        subprocess.run([tmux, "send-keys", "-t", session, "h"], check=True, timeout=10)
        wait_pane(tmux, session, "received (UTC)")  # the history screen is up; its rows load after
        history = wait_pane(tmux, session, case_id)
        subprocess.run([tmux, "send-keys", "-t", session, "q"], check=True, timeout=10)
        # q quits the app, and with it the session
        wait_until(lambda: not session_alive(tmux, session), 20, interval=0.2, what="q to end the tmux session")
        alive = session_alive(tmux, session)
    finally:
        subprocess.run([tmux, "kill-session", "-t", session], capture_output=True, timeout=10)
    print("--- the verdict card as the terminal showed it ---\n" + card)
    assert case_id in live and "Received" in live
    assert "For research and triage only" in card
    assert max(map(len, card.splitlines())) <= width and len(card.splitlines()) <= height
    assert "▲ SUSPICIOUS" in history and case_id in history
    assert not alive  # q quit the app and with it the tmux session


def test_demo_in_a_terminal_opens_the_tui_and_prints_the_call_after_it(tmux, tmp_path):
    """`appliance demo` (what `make run` runs) in a terminal: the TUI over the streaming demo case; q closes
    it and the call is printed as in the non-interactive run."""
    from tests.conftest import MODEL_DIR

    session = f"demo-{uuid.uuid4().hex[:8]}"
    cmd = (f"APPLIANCE_DATA_DIR={shlex.quote(str(tmp_path / 'var'))} APPLIANCE_MODEL_DIR={shlex.quote(str(MODEL_DIR))} "
           f"{shlex.quote(sys.executable)} -m appliance.cli demo --api-port 0; echo DEMO-EXIT=$?; sleep 30")
    subprocess.run([tmux, "new-session", "-d", "-s", session, cmd], check=True, timeout=10)
    try:
        live = wait_pane(tmux, session, "Scanner link:")
        card = wait_pane(tmux, session, "SUSPICIOUS  ▲", timeout=120)
        subprocess.run([tmux, "send-keys", "-t", session, "q"], check=True, timeout=10)
        after = wait_pane(tmux, session, "DEMO-EXIT=", timeout=120)
    finally:
        subprocess.run([tmux, "kill-session", "-t", session], capture_output=True, timeout=10)
    assert "Bench triage appliance" in live and "For research and triage only" in card
    assert "DEMO-EXIT=0" in after and "SUSPICIOUS ===" in after and "case logged to" in after
