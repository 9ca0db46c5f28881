"""The live screen: the scanner link, the case being scanned, its progress and the early-positive alert."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Label, ProgressBar, Static

from appliance.status import DaemonStatus
from appliance.terms import RESEARCH_USE_NOTICE
from appliance.tui.messages import CalledEarly, ScanStarted, VerdictGiven
from appliance.tui.render import eta_words, verdict_words
from appliance.tui.widgets import chrome
from appliance.tui.screens.case import CaseScreen


class LiveScreen(Screen):
    """Scanner link, the case being scanned, its progress, running score and the early-positive alert."""

    BINDINGS = [Binding("v", "open_last", "Last verdict"), Binding("h", "app.history", "History")]

    def __init__(self) -> None:
        super().__init__(id="live")
        self.last_case: str | None = None
        self.case_id: str | None = None  # the case on screen

    def compose(self) -> ComposeResult:
        yield from chrome()
        with Vertical(id="live-body"):
            yield Static("Scanner link: waiting for the appliance…", id="link")
            yield Static("No case yet: waiting for the scanner.", id="case")
            with Horizontal(classes="bar-row"):
                yield Label("Received ", classes="bar-label")
                yield ProgressBar(total=None, show_eta=False, id="received")
            with Horizontal(classes="bar-row"):
                yield Label("Processed", classes="bar-label")
                yield ProgressBar(total=None, show_eta=False, id="processed")
            yield Static("", id="eta")
            yield Static("", id="alert")
            yield Static("", id="qc")
            yield Static("", id="last")
            yield Static(RESEARCH_USE_NOTICE, classes="notice")
        yield Footer()

    def show_status(self, st: DaemonStatus) -> None:
        link = st.link
        state = link.state if link else "unknown"
        up = state == "up"
        self.query_one("#link", Static).update(Text.assemble(
            ("Scanner link: ", "bold"), (f"{'● UP' if up else '○ ' + state.upper()}", "bold" if up else "bold reverse"),
            f"  on {link.port if link else '?'}",
            (f"   last error: {link.last_error}" if link and link.last_error and not up else ""),
            # the drift watch's warning, on the status line while it holds
            (f"\n⚠ {st.drift_warning}" if st.drift_warning else "", "bold reverse")))
        c = st.case
        if c is None:
            return
        if c.case_id != self.case_id:  # a new case, even if its case-started event was missed
            self.show_new_case(c.case_id)
        self.query_one("#case", Static).update(Text.assemble(
            ("Case ", "bold"), (c.case_id, "bold"), f"    specimen {c.specimen_id or '-'}"))
        total = c.tiles_expected
        self.query_one("#received", ProgressBar).update(total=total, progress=c.tiles_received)
        self.query_one("#processed", ProgressBar).update(total=total, progress=c.tiles_processed)
        words = f"{c.tiles_received}/{total or '?'} tiles received, {c.tiles_processed} processed   " \
                f"{eta_words(c.eta_s) if not c.verdict else 'call made'}   " \
                f"running score {c.score:.3f}"
        self.query_one("#eta", Static).update(words)
        if c.early_positive:
            self.show_alert(c.case_id, None)
        self.query_one("#qc", Static).update("\n".join(f"QC: {w['message']}" for w in c.warnings))
        if c.verdict:
            self.show_last_call(c.case_id, c.verdict, c.score)

    def on_scan_started(self, event: ScanStarted) -> None:
        self.show_new_case(event.case_id)

    def on_called_early(self, event: CalledEarly) -> None:
        self.show_alert(event.case_id, event.after_tiles)

    def on_verdict_given(self, event: VerdictGiven) -> None:
        self.show_last_call(event.case_id, event.verdict, event.score)

    def show_new_case(self, case_id: str) -> None:
        self.case_id = case_id
        alert = self.query_one("#alert", Static)
        alert.update("")
        alert.remove_class("-fired")
        self.query_one("#qc", Static).update("")

    def show_alert(self, case_id: str, tiles: int | None) -> None:
        """The early-positive alert, once per case (the status poll repeats it; ``tiles`` only comes in the event)."""
        alert = self.query_one("#alert", Static)
        if alert.has_class("-fired"):
            return
        alert.add_class("-fired")
        after = f" after {tiles} tiles" if tiles else ""
        alert.update(f"▲ EARLY POSITIVE{after}: case {case_id} is already SUSPICIOUS. The call is final; "
                     f"the scan goes on for the heatmap.")

    def show_last_call(self, case_id: str, verdict: str, score: float) -> None:
        self.last_case = case_id
        symbol, word, *_ = verdict_words(verdict)
        self.query_one("#last", Static).update(Text.assemble(
            "Last call: ", (f"{symbol} {word}", "bold"), f" for case {case_id} (score {score:.3f}). Press v for "
                                                          f"its card."))

    def action_open_last(self) -> None:
        if self.last_case:
            self.app.push_screen(CaseScreen(self.app.client, self.last_case))
        else:
            self.notify("No case has been called yet.", severity="warning")
