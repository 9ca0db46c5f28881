"""The packages' layers, checked from outside import-linter (which `make test` also runs): no module below the
daemon's service imports the tools, the API, the UI or the command line, and no library package holds
command-line code (it is all in appliance.commands)."""

import ast

from tests.conftest import ROOT

LOWER = ("model", "pipeline", "store", "lis", "dicom", "service")
ABOVE = ("api", "site", "offline", "tui", "commands", "cli")


def imported(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):  # function-level imports count too
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_nothing_below_the_service_imports_the_layers_above_it():
    found = []
    for package in LOWER:
        for path in sorted((ROOT / "appliance" / package).rglob("*.py")):
            for name in imported(path):
                parts = name.split(".")
                if parts[0] == "appliance" and len(parts) > 1 and parts[1] in ABOVE:
                    found.append(f"{path.relative_to(ROOT)} imports {name}")
    assert found == []


def test_command_line_code_lives_in_appliance_commands_only():
    click_users = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "appliance").rglob("*.py")
                         if "import click" in p.read_text() and "commands" not in p.parts)
    assert click_users == []
