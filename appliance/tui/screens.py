"""The screens: live scan, verdict card, history, sign-off dialog."""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, ProgressBar, Select, Static

from .. import RESEARCH_USE_NOTICE
from .client import ActionRefused, ApiClient, ApiUnavailable
from .render import decode_png, eta_words, halfblocks, heat_over_tissue, legend, patch_row, verdict_words
from .widgets import Banner, Picture


def _chrome() -> ComposeResult:
    yield Header(show_clock=False)
    yield Banner(id="banner")


class LiveScreen(Screen):
    """Scanner link, the case being scanned, its progress, running score and the early-positive alert."""

    BINDINGS = [Binding("v", "open_last", "Last verdict"), Binding("h", "app.history", "History")]

    def __init__(self) -> None:
        super().__init__(id="live")
        self.last_case: str | None = None
        self.case_id: str | None = None  # the case on screen

    def compose(self) -> ComposeResult:
        yield from _chrome()
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

    def show_status(self, st: dict) -> None:
        link = st.get("link") or {}
        state = link.get("state", "unknown")
        up = state == "up"
        self.query_one("#link", Static).update(Text.assemble(
            ("Scanner link: ", "bold"), (f"{'● UP' if up else '○ ' + state.upper()}", "bold" if up else "bold reverse"),
            f"  on {link.get('port', '?')}",
            (f"   last error: {link['last_error']}" if link.get("last_error") and not up else "")))
        c = st.get("case")
        if not c:
            return
        if c["case_id"] != self.case_id:  # a new case, even if its case-started event was missed
            self.case_started(c["case_id"])
        self.query_one("#case", Static).update(Text.assemble(
            ("Case ", "bold"), (c["case_id"], "bold"), f"    specimen {c.get('specimen_id') or '-'}"))
        total = c.get("tiles_expected")
        self.query_one("#received", ProgressBar).update(total=total, progress=c["tiles_received"])
        self.query_one("#processed", ProgressBar).update(total=total, progress=c["tiles_processed"])
        words = f"{c['tiles_received']}/{total or '?'} tiles received, {c['tiles_processed']} processed   " \
                f"{eta_words(c.get('eta_s')) if not c.get('verdict') else 'call made'}   " \
                f"running score {c['score']:.3f}"
        self.query_one("#eta", Static).update(words)
        if c.get("early_positive"):
            self.early_positive(c["case_id"], None)
        warnings = c.get("warnings") or []
        self.query_one("#qc", Static).update("\n".join(f"QC: {w['message']}" for w in warnings))
        if c.get("verdict"):
            self.last_verdict(c["case_id"], c["verdict"], c["score"])

    def case_started(self, case_id: str) -> None:
        self.case_id = case_id
        alert = self.query_one("#alert", Static)
        alert.update("")
        alert.remove_class("-fired")
        self.query_one("#qc", Static).update("")

    def early_positive(self, case_id: str, tiles: int | None) -> None:
        alert = self.query_one("#alert", Static)
        if alert.has_class("-fired"):
            return
        alert.add_class("-fired")
        after = f" after {tiles} tiles" if tiles else ""
        alert.update(f"▲ EARLY POSITIVE{after}: case {case_id} is already SUSPICIOUS. The call is final; "
                     f"the scan goes on for the heatmap.")

    def last_verdict(self, case_id: str, verdict: str, score: float) -> None:
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


class CaseScreen(Screen):
    """The verdict card: the call in words and colour, why, what to do, the heatmap and the top tiles."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back"), Binding("s", "sign_off", "Sign off"),
                Binding("r", "reload", "Reload")]

    def __init__(self, client: ApiClient, case_id: str) -> None:
        super().__init__(classes="case-screen")
        self.client = client
        self.case_id = case_id
        self.case: dict | None = None
        self.pictures: dict[str, object] = {}

    def compose(self) -> ComposeResult:
        yield from _chrome()
        with VerticalScroll(id="card"):
            yield Static(f"Loading case {self.case_id}…", id="verdict")
            yield Static("", id="facts")
            yield Static("", id="advice")
            yield Static("Heatmap over the tissue:", classes="caption")
            yield Picture(empty="(no heatmap yet)", id="heatmap")
            yield Static(legend(20), id="legend")
            yield Static("Tiles that drove the call (highest probability first):", classes="caption")
            yield Picture(empty="(no tiles yet)", id="top")
            yield Static("", id="model")
            yield Static("", id="signoff-state")
            yield Static(RESEARCH_USE_NOTICE, classes="notice")
        yield Footer()

    def on_mount(self) -> None:
        self.load()

    def action_reload(self) -> None:
        self.load()

    def daemon_event(self, kind: str, data: dict) -> None:
        if data.get("case_id") == self.case_id and kind in ("finished", "outputs"):
            self.load()

    @work(exclusive=True, group="load-case")
    async def load(self) -> None:
        try:
            case = await self.client.case(self.case_id)
            files = {n: await self.client.file(self.case_id, n) for n in ("thumbnail.png", "heatmap.png",
                                                                           "top_patches.png")}
        except ApiUnavailable as exc:
            self.query_one("#verdict", Static).update(f"Cannot load case {self.case_id}: {exc}")
            return
        if case is None:
            self.query_one("#verdict", Static).update(f"There is no case {self.case_id}.")
            return
        self.case = case
        self.show_case(case)
        self.show_pictures(files)

    def show_case(self, c: dict) -> None:
        symbol, word, bg, fg, todo = verdict_words(c.get("verdict"))
        verdict = self.query_one("#verdict", Static)
        verdict.update(Text(f"{symbol}  {word}  {symbol}", style=f"bold {fg} on {bg}", justify="center"))
        verdict.styles.background = bg
        score = c.get("score")
        facts = [f"Case {c['id']}   specimen {c.get('specimen_id') or '-'}   status {c['status']}"]
        if score is not None:
            facts.append(f"Score {score:.3f} (mean of the top patch probabilities)   threshold "
                         f"{c.get('threshold') or 0:.3f}   {c.get('patches_scored') or 0} tissue patches scored")
        if c.get("early_positive"):
            facts.append(f"Called early: after {c.get('early_positive_after_tiles')} of "
                         f"{c.get('tiles_received') or c.get('tiles_expected') or '?'} tiles")
        self.query_one("#facts", Static).update("\n".join(facts))
        advice = [f"What to do: {todo}"] if c.get("verdict") else [todo]
        for r in c.get("reasons") or []:
            advice.append(f"  • {r['message']}")
        self.query_one("#advice", Static).update("\n".join(advice))
        self.query_one("#model", Static).update(
            f"Model {c.get('model_name') or '?'} {c.get('model_version') or ''} on {c.get('engine') or '?'}, "
            f"sha256 {(c.get('model_sha256') or '')[:16]}…")
        signed = c.get("signed_off_by")
        self.query_one("#signoff-state", Static).update(
            f"Signed off by {signed} at {c.get('signed_off_at')}" + (f": {c['sign_off_comment']}"
                                                                    if c.get("sign_off_comment") else "")
            if signed else "Not signed off yet: press s to sign off.")

    def show_pictures(self, files: dict[str, bytes | None]) -> None:
        heatmap, top = self.query_one("#heatmap", Picture), self.query_one("#top", Picture)
        if files.get("thumbnail.png") and files.get("heatmap.png"):
            thumb, heat = decode_png(files["thumbnail.png"]), decode_png(files["heatmap.png"])
            heatmap.set_draw(lambda w, h: halfblocks(heat_over_tissue(thumb, heat, w, h)))
        else:
            heatmap.set_draw(None, "(heatmap not written yet, or removed by retention)")
        if files.get("top_patches.png"):
            strip = decode_png(files["top_patches.png"])
            top.set_draw(lambda w, h: _top_rows(strip, w, h))
        else:
            top.set_draw(None, "(top tiles not written yet)")

    def action_sign_off(self) -> None:
        if self.case is None or self.case.get("status") in ("receiving", "processing"):
            self.notify("This case is not finished yet; sign-off comes after the call.", severity="warning")
            return

        def done(ok: bool | None) -> None:
            if ok:
                self.load()

        self.app.push_screen(SignOffDialog(self.client, self.case_id), done)


def _top_rows(strip, width: int, _lines: int) -> Text:
    """Every top tile, as many per row as fit: each 8 cells wide and 4 lines tall (6 x 3 when narrow)."""
    side = strip.shape[0]
    n = strip.shape[1] // side
    cells = 8 if width >= 44 else 6
    per_row = max(1, (width + 1) // (cells + 1))
    out = Text(no_wrap=True)
    for start in range(0, n, per_row):
        if start:
            out.append("\n\n")
        out.append_text(patch_row(strip[:, start * side:(start + per_row) * side], per_row, cells))
    return out


# fixed widths: the table fits 80 columns and does not jump about as rows arrive
COLUMNS = [("received (UTC)", 16), ("case", 12), ("specimen", 12), ("call", 16), ("score", 5), ("signed", 6)]


class HistoryScreen(Screen):
    """Every case, newest first; filter by verdict, search by case or specimen, Enter opens the card."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back"), Binding("r", "reload", "Reload"),
                Binding("slash", "focus_search", "Search")]

    def __init__(self, client: ApiClient) -> None:
        super().__init__(id="history")
        self.client = client
        self.rows: list[dict] = []

    def compose(self) -> ComposeResult:
        yield from _chrome()
        with Horizontal(id="filters"):
            yield Input(placeholder="search case or specimen", id="search")
            yield Select([("suspicious", "suspicious"), ("benign-appearing", "benign-appearing"),
                          ("cannot call", "cannot-call")], prompt="any verdict", id="verdict-filter")
        yield DataTable(id="cases", cursor_type="row", zebra_stripes=True)
        yield Static(RESEARCH_USE_NOTICE, classes="notice")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for label, width in COLUMNS:
            table.add_column(label, width=width)
        table.focus()
        self.load()

    def action_reload(self) -> None:
        self.load()

    def action_focus_search(self) -> None:
        self.query_one("#search", Input).focus()

    @on(Select.Changed, "#verdict-filter")
    def _verdict_changed(self) -> None:
        self.load()

    @on(Input.Changed, "#search")
    def _search_changed(self) -> None:
        self.fill()

    @work(exclusive=True, group="load-history")
    async def load(self) -> None:
        choice = self.query_one("#verdict-filter", Select).value
        verdict = choice if isinstance(choice, str) else None
        try:
            self.rows = await self.client.cases(verdict=verdict)
        except ApiUnavailable as exc:
            self.notify(str(exc), severity="error")
            return
        self.fill()

    def fill(self) -> None:
        needle = self.query_one("#search", Input).value.strip().lower()
        table = self.query_one(DataTable)
        table.clear()
        for c in self.rows:
            if needle and needle not in c["id"].lower() and needle not in (c.get("specimen_id") or "").lower():
                continue
            symbol, word, *_ = verdict_words(c.get("verdict"))
            call = f"{symbol} {word}" if c.get("verdict") else c["status"]
            score = f"{c['score']:.3f}" if c.get("score") is not None else "-"
            table.add_row((c.get("received_at") or "")[:16].replace("T", " "), c["id"], c.get("specimen_id") or "-",
                          call, score, c.get("signed_off_by") or "-", key=c["id"])

    @on(DataTable.RowSelected)
    def _open(self, event: DataTable.RowSelected) -> None:
        self.app.push_screen(CaseScreen(self.client, str(event.row_key.value)))


class SignOffDialog(ModalScreen[bool]):
    """Initials and a comment; sent with the API token; any refusal explained in words."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, client: ApiClient, case_id: str) -> None:
        super().__init__(id="signoff")
        self.client = client
        self.case_id = case_id

    def compose(self) -> ComposeResult:
        with Vertical(id="signoff-box"):
            yield Label(f"Sign off case {self.case_id}", id="signoff-title")
            yield Input(placeholder="your initials", max_length=16, id="initials")
            yield Input(placeholder="comment (optional)", max_length=2000, id="comment")
            yield Static("", id="signoff-error")
            with Horizontal(id="signoff-buttons"):
                yield Button("Sign off", variant="primary", id="confirm")
                yield Button("Cancel", id="cancel")

    def action_cancel(self) -> None:
        self.dismiss(False)

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(False)

    @on(Input.Submitted)
    @on(Button.Pressed, "#confirm")
    def _confirm(self) -> None:
        initials = self.query_one("#initials", Input).value.strip()
        if not initials:
            self.query_one("#signoff-error", Static).update("Type your initials first.")
            self.query_one("#initials", Input).focus()
            return
        self.send(initials, self.query_one("#comment", Input).value.strip())

    @work(exclusive=True, group="sign-off")
    async def send(self, initials: str, comment: str) -> None:
        try:
            await self.client.sign_off(self.case_id, initials, comment)
        except (ActionRefused, ApiUnavailable) as exc:
            self.query_one("#signoff-error", Static).update(f"Not signed off: {exc}.")
            return
        self.app.notify(f"Case {self.case_id} signed off by {initials}.")
        self.dismiss(True)
