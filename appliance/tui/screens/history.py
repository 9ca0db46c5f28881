"""The history screen: every case in a table, filtered by call and searched; Enter opens its card."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Select, Static

from appliance.terms import RESEARCH_USE_NOTICE, Verdict
from appliance.tui.client import ApiClient, ApiUnavailable, BadAnswer
from appliance.tui.render import verdict_words
from appliance.tui.widgets import chrome
from appliance.tui.screens.case import CaseScreen


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
        yield from chrome()
        with Horizontal(id="filters"):
            yield Input(placeholder="search case or specimen", id="search")
            yield Select([(v.value.replace("-", " ") if v == Verdict.CANNOT_CALL else v.value, v) for v in Verdict],
                         prompt="any verdict", id="verdict-filter")
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
        except (ApiUnavailable, BadAnswer) as exc:
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
