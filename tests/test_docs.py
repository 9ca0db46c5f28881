"""The documentation the repository promises: the settings reference current with Settings, the README short
and opening with the two commands, and every page it links to there."""

import re

from appliance.config import Settings, settings_reference
from tests.conftest import ROOT


def test_the_settings_reference_is_current_with_the_settings_object():
    page = (ROOT / "docs" / "settings.md").read_text()
    assert page == settings_reference(), "docs/settings.md is stale: appliance config reference > docs/settings.md"
    for name in Settings.model_fields:  # each key once, with its environment variable
        assert page.count(f"| `{name}` | `APPLIANCE_{name.upper()}` |") == 1


def test_the_readme_is_short_opens_with_the_two_commands_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    block = re.search(r"```sh\n(.*?)```", text, re.S).group(1).splitlines()
    assert [line.split()[:2] for line in block] == [["make", "run"], ["make", "test"]]
    assert "make test" in (ROOT / "Makefile").read_text() and "make test" in (ROOT / ".ci" / "run").read_text()
    assert "Not for diagnosis" in text
    links = re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]+)?\)", text)
    assert len(links) >= 10
    for link in links:
        assert (ROOT / link).is_file(), link
