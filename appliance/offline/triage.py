"""Offline triage of a case on disk (`appliance triage`): the same TriageSession the daemon streams into."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from appliance.model.engine import Engine
from appliance.pipeline import TriageSession
from appliance.pipeline.summary import validated
from appliance.terms import CaseFile
from appliance.offline.sources import DEFAULT_TILE_SIZE, Skipped, case_extent, count_case_tiles, iter_case_tiles


def triage_path(
    engine: Engine,
    path: Path,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    batch_size: int = 64,
    out_dir: Path | None = None,
    microns_per_pixel: float | None = None,
    progress: Callable[[int, int | None, float], None] | None = None,
) -> dict:
    """Triage a single image or a tile folder and return the JSON-ready result.

    With ``out_dir`` the case's files (overlay, OME-TIFFs, regions, summary) are written there and the
    mosaic is kept in ``out_dir/.work`` while the case runs. Unreadable tile files are listed under
    ``skipped_inputs`` instead of stopping the case. ``microns_per_pixel`` is the input's resolution
    (default: the model's own, i.e. no resampling).
    """
    path = Path(path)
    skipped: list[Skipped] = []
    total = count_case_tiles(path, tile_size)
    ox, oy, width, height = case_extent(path)
    workdir = Path(out_dir) / ".work" if out_dir else None
    session = TriageSession(engine, batch_size=batch_size, scanner_mpp=microns_per_pixel, width=width,
                            height=height, workdir=workdir, origin=(ox, oy))
    try:
        for n, tile in enumerate(iter_case_tiles(path, tile_size, skipped), 1):
            session.add_tile(tile.x, tile.y, tile.pixels)
            if progress:
                progress(n, total, session.score)
        result = session.finish().to_dict()
        result["input"] = str(path)
        result["skipped_inputs"] = [asdict(s) for s in skipped]
        if out_dir:
            written = session.write_outputs(Path(out_dir), case_id_for(path), result)
            result = json.loads(Path(written[CaseFile.SUMMARY]).read_text())  # what the lab opens, exactly
    finally:
        session.close()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return validated(result)


def case_id_for(path: Path) -> str:
    """A readable case id from an input path (letters, digits, '.', '_', '-')."""
    stem = Path(path).name.split(".")[0] or "case"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem)[:64]
