"""The bundled demo case (IDC patient 10253, CC0) and the CASE_BEGIN a scanner sends for a list of tiles."""

from __future__ import annotations

from pathlib import Path

from firmware_bridge.emulator import TileOnDemand, TileToSend
from firmware_bridge.sink import CaseInfo

DEMO_CASE = Path(__file__).resolve().parent / "demo_case" / "idc-10253.tif"
DEMO_CASE_MPP = 4.0  # microns per pixel of the bundled case (the IDC patches' own)


def case_info_for(case_id: str, specimen_id: str, tiles: list[TileToSend | TileOnDemand], mpp: float,
                  tile_size: int, accession: str = "") -> CaseInfo:
    width = max(t.x + t.w for t in tiles)
    height = max(t.y + t.h for t in tiles)
    return CaseInfo(
        case_id=case_id, specimen_id=specimen_id, modality="brightfield-he", microns_per_pixel=mpp,
        tile_width=tile_size, tile_height=tile_size, channels=3, dtype="uint8", expected_tiles=len(tiles),
        image_width=width, image_height=height, overlap=0, accession=accession,
    )
