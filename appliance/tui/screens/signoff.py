"""The sign-off dialog: initials and a comment, sent with the API token."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from appliance.tui.client import ActionRefused, ApiClient, ApiUnavailable


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
