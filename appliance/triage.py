"""Offline triage of a case on disk (`appliance triage`): the same TriageSession the daemon streams into."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

from .engine import Engine
from .pipeline import TriageSession
from .sources import DEFAULT_TILE_SIZE, Skipped, count_case_tiles, iter_case_tiles


def triage_path(
    engine: Engine,
    path: Path,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    batch_size: int = 64,
    progress: Callable[[int, int | None, float], None] | None = None,
) -> dict:
    """Triage a single image or a tile folder and return the JSON-ready result.

    Unreadable tile files are listed under ``skipped_inputs`` instead of stopping the case.
    """
    skipped: list[Skipped] = []
    total = count_case_tiles(path, tile_size)
    session = TriageSession(engine, batch_size=batch_size)
    for n, tile in enumerate(iter_case_tiles(path, tile_size, skipped), 1):
        session.add_tile(tile.x, tile.y, tile.pixels)
        if progress:
            progress(n, total, session.score)
    result = session.finish().to_dict()
    result["input"] = str(path)
    result["skipped_inputs"] = [asdict(s) for s in skipped]
    return result
