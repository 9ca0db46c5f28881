"""What every bench does at the end: write its result as JSON (``--json PATH``) and say where."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path | None, result: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
