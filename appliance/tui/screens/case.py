"""The verdict card: the call in words, colour and symbol, what to do, the heatmap and the top tiles."""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static

from appliance.terms import OPEN_STATUSES, RESEARCH_USE_NOTICE, CaseFile, rule_words, whose_threshold
from appliance.tui.client import ApiClient, ApiUnavailable, BadAnswer
from appliance.tui.messages import FilesWritten, VerdictGiven
from appliance.tui.render import (decode_png, delivery_words, halfblocks, heat_over_tissue, legend, patch_row,
                                  verdict_words)
from appliance.tui.widgets import Picture, chrome
from appliance.tui.screens.signoff import SignOffDialog

PICTURES = (CaseFile.THUMBNAIL, CaseFile.HEATMAP, CaseFile.TOP_PATCHES)  # what the card draws


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
        yield from chrome()
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

    @on(VerdictGiven)
    @on(FilesWritten)
    def _reload_when_mine(self, event: VerdictGiven | FilesWritten) -> None:
        # before its mount the screen has nothing to show a case on yet, and its mount loads the case anyway
        if event.case_id == self.case_id and self.is_mounted:
            self.load()

    @work(exclusive=True, group="load-case")
    async def load(self) -> None:
        try:
            case = await self.client.case(self.case_id)
            # the record lists the files that exist: fetch those, instead of asking for each and getting 404s
            present = {f["name"] for f in (case or {}).get("files", [])}
            files = {n: await self.client.file(self.case_id, n) for n in PICTURES if n in present}
        except (ApiUnavailable, BadAnswer) as exc:
            if self.is_attached:
                self.query_one("#verdict", Static).update(f"Cannot load case {self.case_id}: {exc}")
            return
        if not self.is_attached:  # closed while its case was read: nothing to show it on
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
        accession = f"   accession {c['accession']}" if c.get("accession") else ""
        facts = [f"Case {c['id']}   specimen {c.get('specimen_id') or '-'}{accession}   status {c['status']}"]
        if score is not None:
            facts.append(f"Score {score:.3f} ({rule_words(c.get('case_rule'))})   threshold "
                         f"{c.get('threshold') or 0:.3f} ({whose_threshold(c)})   "
                         f"{c.get('patches_scored') or 0} tissue patches scored")
        if c.get("early_positive"):
            # the early rule is named when it is not the final rule at the final threshold
            differs = c.get("early_threshold") is not None and (c["early_threshold"], c.get("early_rule")) != (
                c.get("threshold"), c.get("case_rule"))
            early = (f" ({rule_words(c.get('early_rule'))} passed {c['early_threshold']:.3f})" if differs else "")
            facts.append(f"Called early: after {c.get('early_positive_after_tiles')} of "
                         f"{c.get('tiles_received') or c.get('tiles_expected') or '?'} tiles{early}")
        self.query_one("#facts", Static).update("\n".join(facts))
        advice = [f"What to do: {todo}"] if c.get("verdict") else [todo]
        for r in c.get("reasons") or []:
            advice.append(f"  • {r['message']}")
        if c.get("warnings"):
            advice.append("QC warnings (found after the call; the call stands, check before relying on it):")
            advice.extend(f"  ! {w['message']}" for w in c["warnings"])
        self.query_one("#advice", Static).update("\n".join(advice))
        self.query_one("#model", Static).update(
            f"Model {c.get('model_name') or '?'} {c.get('model_version') or ''} on {c.get('engine') or '?'}, "
            f"sha256 {(c.get('model_sha256') or '')[:16]}…")
        signed = c.get("signed_off_by")
        state = (f"Signed off by {signed} at {c.get('signed_off_at')}" + (f": {c['sign_off_comment']}"
                                                                         if c.get("sign_off_comment") else "")
                 if signed else "Not signed off yet: press s to sign off.")
        sent = delivery_words(c.get("deliveries") or [])
        self.query_one("#signoff-state", Static).update(state + ("\n" + sent if sent else ""))

    def show_pictures(self, files: dict[str, bytes | None]) -> None:
        heatmap, top = self.query_one("#heatmap", Picture), self.query_one("#top", Picture)
        if files.get(CaseFile.THUMBNAIL) and files.get(CaseFile.HEATMAP):
            thumb, heat = decode_png(files[CaseFile.THUMBNAIL]), decode_png(files[CaseFile.HEATMAP])
            heatmap.set_draw(lambda w, h: halfblocks(heat_over_tissue(thumb, heat, w, h)))
        else:
            heatmap.set_draw(None, "(heatmap not written yet, or removed by retention)")
        if files.get(CaseFile.TOP_PATCHES):
            strip = decode_png(files[CaseFile.TOP_PATCHES])
            top.set_draw(lambda w, h: _top_rows(strip, w, h))
        else:
            top.set_draw(None, "(top tiles not written yet)")

    def action_sign_off(self) -> None:
        if self.case is None or self.case.get("status") in OPEN_STATUSES:
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
