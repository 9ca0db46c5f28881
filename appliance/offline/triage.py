"""Offline triage of a case on disk (`appliance triage`): the same TriageSession the daemon streams into."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

from appliance.model.engine import Engine
from appliance.pipeline import TriageSession
from appliance.pipeline.decision import ThresholdInForce
from appliance.pipeline.result import TriageResult
from appliance.pipeline.summary import validated
from appliance.terms import CaseFile
from appliance.offline.slides import Slide, SlideInfo, is_slide
from appliance.offline.sources import (DEFAULT_TILE_SIZE, Skipped, SourceTile, TileFolder, case_extent,
                                       count_case_tiles, iter_case_tiles)


def triage_path(engine: Engine, path: Path, **options) -> dict:
    """Triage a slide file, a single image or a tile folder and return the JSON-ready result (``triage_case``)."""
    return triage_case(engine, path, **options)[1]


def triage_case(
    engine: Engine,
    path: Path,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    batch_size: int = 64,
    out_dir: Path | None = None,
    microns_per_pixel: float | None = None,
    progress: Callable[[int, int | None, float], None] | None = None,
    geojson_tiles: bool = False,
    case_id: str | None = None,
    thresholds: ThresholdInForce | None = None,
    accession: str | None = None,
) -> tuple[TriageResult, dict]:
    """Triage a slide file, a single image or a tile folder; returns the typed result (what the case store
    records) and the JSON-ready summary.

    A slide (``slides.is_slide``) is read region by region at the pyramid level nearest the model's resolution,
    tissue tiles only, with the µm/px its metadata states (or ``microns_per_pixel`` when given); its patch
    positions are reported in the slide's level-0 pixels and ``slide`` says what was read. A plain image or a
    tile folder is at ``microns_per_pixel`` (default: the model's own, i.e. no resampling).

    With ``out_dir`` the case's files (overlay, OME-TIFFs, regions, summary) are written there and the
    mosaic is kept in ``out_dir/.work`` while the case runs; ``geojson_tiles`` adds every scored patch to
    regions.geojson as a QuPath tile object; ``case_id`` names the case in them (default: from the file name);
    ``thresholds`` are the ones in force (default: the model's); ``accession`` is the lab's accession number,
    recorded in the summary.
    Unreadable tile files are listed under ``skipped_inputs`` instead of stopping the case.
    """
    path = Path(path)
    if is_slide(path):
        with Slide(path, engine.manifest.input.microns_per_pixel, microns_per_pixel) as slide:
            return _triage(engine, path, slide.tiles(tile_size), slide.count_tiles(tile_size), (0, 0),
                           slide.level_width, slide.level_height, slide.info.level_microns_per_pixel, [],
                           batch_size=batch_size, out_dir=out_dir, progress=progress, slide=slide.info,
                           geojson_tiles=geojson_tiles, case_id=case_id, thresholds=thresholds,
                           accession=accession)
    skipped: list[Skipped] = []
    if path.is_dir():  # listed once: its extent, count and tiles
        folder = TileFolder.scan(path)
        ox, oy, width, height = folder.extent()
        tiles, total = folder.tiles(skipped), len(folder.files)
    else:
        ox, oy, width, height = case_extent(path)
        tiles, total = iter_case_tiles(path, tile_size, skipped), count_case_tiles(path, tile_size)
    return _triage(engine, path, tiles, total, (ox, oy), width, height, microns_per_pixel, skipped,
                   batch_size=batch_size, out_dir=out_dir, progress=progress, geojson_tiles=geojson_tiles,
                   case_id=case_id, thresholds=thresholds, accession=accession)


def _triage(engine: Engine, path: Path, tiles: Iterable[SourceTile], total: int | None, origin: tuple[int, int],
            width: int | None, height: int | None, scanner_mpp: float | None, skipped: list[Skipped], *,
            batch_size: int, out_dir: Path | None, progress, slide: SlideInfo | None = None,
            geojson_tiles: bool = False, case_id: str | None = None,
            thresholds: ThresholdInForce | None = None, accession: str | None = None
            ) -> tuple[TriageResult, dict]:
    made_out_dir = out_dir is not None and not Path(out_dir).exists()
    workdir = Path(out_dir) / ".work" if out_dir else None
    session = TriageSession(engine, batch_size=batch_size, scanner_mpp=scanner_mpp, width=width,
                            height=height, workdir=workdir, origin=origin, thresholds=thresholds)
    done = False
    try:
        for n, tile in enumerate(tiles, 1):
            session.add_tile(tile.x, tile.y, tile.pixels)
            if progress:
                progress(n, total, session.score)
        finished = session.finish()
        result = finished.summary(str(path), skipped_inputs=[asdict(s) for s in skipped], accession=accession or "")
        if slide is not None:
            to_level0(result, slide.downsample)
            result["slide"] = slide.to_dict()
        if out_dir:
            written = session.write_outputs(Path(out_dir), case_id or case_id_for(path), result,
                                            geojson_tiles=geojson_tiles)
            # what the lab opens, exactly (validated as it was written)
            result = json.loads(Path(written[CaseFile.SUMMARY]).read_text())
        else:
            validated(result)
        done = True
    finally:
        session.close()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        if made_out_dir and not done and not any(Path(out_dir).iterdir()):
            Path(out_dir).rmdir()  # a case that failed leaves nothing behind
    return finished, result


def to_level0(result: dict, downsample: float) -> None:
    """Patch positions of a slide read at a reduced level -> the slide's level-0 pixels (in place)."""
    if downsample == 1.0:
        return
    for key in ("patches", "top_patches"):
        for p in result[key]:
            p.update(x=round(p["x"] * downsample), y=round(p["y"] * downsample), w=round(p["w"] * downsample),
                     h=round(p["h"] * downsample))


def case_id_for(path: Path) -> str:
    """A readable case id from an input path (letters, digits, '.', '_', '-')."""
    stem = Path(path).name.split(".")[0] or "case"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem)[:64]
