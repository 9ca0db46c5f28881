"""A case's output files, the ones a lab opens: overlay.png, case.ome.tif + heatmap.ome.tif, regions.geojson,
summary.json. Everything is written to a temporary name and renamed, so a reader never sees half a file; the
files are written side by side, summary.json last.
"""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from appliance import RESEARCH_USE_NOTICE
from appliance.colormap import colormap
from appliance.durable import fsync_path, replace_durably
from appliance.pipeline.heatmap import Heatmap, Thumbnail, regions
from appliance.pipeline.mosaic import Mosaic
from appliance.pipeline.pyramid import BAND, write_pyramid
from appliance.pipeline.scanpyramid import ScanGrid, write_scan_pyramid
from appliance.pipeline.summary import validated
from appliance.terms import CaseFile, rule_words

# Regions smaller than this many patch cells are left out of regions.geojson: on the 19 complete development
# slides (out-of-fold scores) this raised mean slide Dice from 0.683 (every region) to 0.701 (4 cells) and
# 0.710 (8 cells); 4 keeps small foci (a 4-cell region is 200 x 200 um at 4 um/px).
MIN_REGION_CELLS = 4
HEATMAP_PX = 10  # model pixels per heatmap.ome.tif pixel (the heatmap's own detail is one patch stride)
# zlib level of the PNGs: 1, not PIL's default 6: the PNGs are written while the technician waits for the
# case's files, where level 6 costs more time than its few per cent of smaller files are worth
# (docs/performance.md, "Why the code is shaped so")
PNG_LEVEL = 1
TOP_PATCH_PX = 48  # side of each top patch in top_patches.png
WORKERS = 2  # threads writing the case's files at once (the bench PC has 2 cores, idle once the case ends)


def to_slide(features: list[dict], factor: float) -> None:
    """Polygons from mosaic pixels (the model's resolution) to a slide's level-0 pixels, in place."""
    for feat in features:
        feat["geometry"]["coordinates"] = [[[round(x * factor, 2), round(y * factor, 2)] for x, y in ring]
                                           for ring in feat["geometry"]["coordinates"]]
        m = feat["properties"]["measurements"]
        if "area_px" in m:
            m["area_px"] = round(m["area_px"] * factor * factor, 2)


def tile_features(tiles: list[tuple[int, int, int, int, float, float | None]], case_id: str) -> list[dict]:
    """One locked QuPath ``tile`` object per scored patch, as WSInfer writes them: a box (x, y, w, h in mosaic
    pixels) with the patch's probability (and the first stage's, when refined) under ``measurements``."""
    feats = []
    for i, (x, y, w, h, prob, first) in enumerate(tiles):
        m = {"probability": round(prob, 4)}
        if first is not None:
            m["first_stage"] = round(first, 4)
        feats.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench-triage-appliance:{case_id}:tile:{i}")),
            # counter-clockwise as numbers (positive shoelace area), as the region exteriors
            "geometry": {"type": "Polygon",
                         "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]]},
            "properties": {"objectType": "tile", "isLocked": True, "measurements": m},
        })
    return feats


def _replace_into(path: Path, write) -> None:
    """``write(tmp)``, then the file in place under ``path`` durably (appliance.durable): after a power cut the
    name holds the whole file or nothing, never a truncated one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -------------------------------------------------------------------------------------------- overlay
def overlay_image(thumb: np.ndarray, heat: np.ndarray, thumb_cell: int, heat_cell: int, result: dict,
                  case_id: str):
    """Tissue thumbnail with the heatmap blended over scored cells, a legend and the call."""
    from PIL import Image, ImageDraw, ImageFont

    rep = heat_cell // thumb_cell
    rows, cols = thumb.shape[:2]
    # colour per heatmap cell, then repeated to thumbnail cells (the colour map is per value, so the same)
    cells = np.repeat(np.repeat(np.dstack([colormap(heat), ~np.isnan(heat)]), rep, axis=0), rep, axis=1)
    r, c = min(rows, cells.shape[0]), min(cols, cells.shape[1])
    scored = np.zeros((rows, cols), dtype=bool)
    scored[:r, :c] = cells[:r, :c, 3] > 0
    heat_rgb = np.zeros((rows, cols, 3), dtype=np.uint8)
    heat_rgb[:r, :c] = cells[:r, :c, :3]
    img = _blend(thumb, heat_rgb, scored)
    zoom = max(1, min(4, 600 // max(1, max(rows, cols))))
    pic = Image.fromarray(img).resize((cols * zoom, rows * zoom), Image.NEAREST)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    width = max(pic.width, 560) + 20
    header = 84
    legend = 60
    canvas = Image.new("RGB", (width, header + pic.height + legend), "white")
    canvas.paste(pic, (10, header))
    d = ImageDraw.Draw(canvas)
    verdict = result["verdict"].upper()
    d.text((10, 8), f"Case {case_id}: {verdict}", fill="black", font=font)
    d.text((10, 28), f"score {result['score']:.3f} ({rule_words(result['case_rule'], result['top_k'])}), "
                     f"threshold {result['threshold']:.3f}; "
                     f"{len(result['patches'])} tissue patches", fill="black", font=small)
    reasons = "; ".join(r["code"] for r in result["reasons"])
    if reasons:
        d.text((10, 44), f"cannot call: {reasons}", fill="black", font=small)
    d.text((10, 62), RESEARCH_USE_NOTICE, fill=(150, 0, 0), font=small)
    y0 = header + pic.height + 10
    bar = colormap(np.linspace(0, 1, 256)[None, :].repeat(14, axis=0))
    canvas.paste(Image.fromarray(bar), (10, y0))
    d.rectangle([10, y0, 265, y0 + 13], outline="black")
    d.text((10, y0 + 18), "0", fill="black", font=small)
    d.text((250, y0 + 18), "1", fill="black", font=small)
    tx = 10 + int(round(result["threshold"] * 255))
    d.line([tx, y0 - 3, tx, y0 + 16], fill="black", width=2)
    d.text((280, y0), "patch probability of IDC (overlap-averaged);", fill="black", font=small)
    d.text((280, y0 + 16), "| = case threshold; cividis colormap", fill="black", font=small)
    return canvas


def _blend(thumb: np.ndarray, heat_rgb: np.ndarray, scored: np.ndarray, rows: int = 64) -> np.ndarray:
    """45 % tissue and 55 % heat colour where ``scored``, the tissue elsewhere; computed ``rows`` at a time, so
    its float temporaries are a few MB whatever the thumbnail's size: whole-thumbnail ones come in fresh pages
    each time, and faulting those in costs CPU beside the pyramid (docs/performance.md, "Why the code is
    shaped so")."""
    out = np.empty_like(thumb)
    for y in range(0, thumb.shape[0], rows):
        band = slice(y, y + rows)
        out[band] = np.where(scored[band, :, None], 0.45 * thumb[band].astype(np.float32) + 0.55 * heat_rgb[band],
                             thumb[band])
    return out


# --------------------------------------------------------------------------------------- preview images
def heat_image(heat: np.ndarray) -> np.ndarray:
    """The overlap-averaged heatmap as (rows, cols, 2) uint8 grey+alpha: probability x 255, alpha 0 where no
    tissue patch was scored; one pixel per heatmap cell (the terminal UI draws it over thumbnail.png)."""
    out = np.zeros(heat.shape + (2,), dtype=np.uint8)
    scored = ~np.isnan(heat)
    out[..., 0][scored] = np.round(np.clip(heat[scored], 0, 1) * 255).astype(np.uint8)
    out[..., 1][scored] = 255
    return out


def patch_strip(crops: list[np.ndarray], px: int = TOP_PATCH_PX) -> np.ndarray:
    """The top patches side by side, each resized to ``px`` x ``px`` (highest probability first)."""
    from PIL import Image

    strip = np.full((px, max(1, len(crops)) * px, 3), 255, dtype=np.uint8)
    for i, crop in enumerate(crops):
        small = Image.fromarray(np.ascontiguousarray(crop)).resize((px, px), Image.BILINEAR)
        strip[:, i * px:(i + 1) * px] = np.asarray(small)
    return strip


def _png(pixels: np.ndarray) -> Callable[[Path], None]:
    """A writer of ``pixels`` (RGB, or grey+alpha when 2 channels) as a PNG."""
    from PIL import Image

    mode = "LA" if pixels.ndim == 3 and pixels.shape[2] == 2 else "RGB"
    return lambda tmp: Image.fromarray(pixels, mode=mode).save(tmp, format="PNG", compress_level=PNG_LEVEL)


# -------------------------------------------------------------------------------------- tiled pyramids
def heatmap_image(heat: np.ndarray, cell: int, width: int, height: int, px: int) -> np.ndarray:
    """The heatmap as a colour image at ``px`` model pixels per pixel (glass where not scored), covering the
    same area as a ``width`` x ``height`` case.ome.tif; its physical pixel size says so, so the two line up
    in microns. A hundredth of the case's pixels at 10 px, so it is built in RAM."""
    rgb = colormap(heat)
    rgb[np.isnan(heat)] = 255
    rep = cell // px
    w, h = -(-width // px), -(-height // px)
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    big = np.repeat(np.repeat(rgb, rep, axis=0), rep, axis=1)[:h, :w]
    out[: big.shape[0], : big.shape[1]] = big
    return out


# ---------------------------------------------------------------------------------------------- all
def _regions_json(heat: np.ndarray, heatmap: Heatmap, patch_threshold: float, min_region_cells: int,
                  tiles: list[tuple] | None, case_id: str, result: dict, mpp: float, scan: ScanGrid | None) -> str:
    """regions.geojson: the regions over the patch threshold (and each scored patch, when ``tiles`` are given)."""
    feats = regions(heat, patch_threshold, heatmap.cell, min_region_cells)
    for i, feat in enumerate(feats):  # the same case gives the same ids (a re-run replaces, never duplicates)
        feat["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench-triage-appliance:{case_id}:region:{i}"))
    if tiles:
        feats += tile_features(tiles, case_id)
    units = "pixels of case.ome.tif"
    slide = result.get("slide")
    if scan is not None:  # case.ome.tif is the scan as it arrived
        units = "level-0 pixels of case.ome.tif"
        to_slide(feats, mpp / scan.mpp)
    elif slide:  # a slide file: drawn over the slide itself, so in its level-0 pixels
        units = f"level-0 pixels of {Path(result['input']).name}"
        to_slide(feats, mpp / slide["microns_per_pixel"])
    return json.dumps({"type": "FeatureCollection", "features": feats,
                       "properties": {"case_id": case_id, "threshold": patch_threshold, "units": units,
                                      "notice": RESEARCH_USE_NOTICE}})


def _top_patches_json(case_id: str, top: list[dict]) -> str:
    """top_patches.json: the top patches in case.ome.tif's pixels, with their class-activation maps (the
    viewer's gallery)."""
    return json.dumps({"case_id": case_id, "units": "pixels of case.ome.tif", "patches": top,
                       "cam": "each patch's map: the ensemble members' mean logit at each position of the last "
                              "feature map (its mean over positions is the patch's mean logit)",
                       "notice": RESEARCH_USE_NOTICE})


def _summary_json(summary: dict, case_id: str, outputs: list[str]) -> str:
    """summary.json, validated; compact: json's C encoder runs only without indent, and a large case's
    patches written indented are slow (docs/performance.md, "Why the code is shaped so")."""
    return json.dumps(validated(dict(summary, case_id=case_id, outputs=outputs)), separators=(",", ":"))


def _writers(case_id: str, result: dict, heat: np.ndarray, heatmap: Heatmap, thumbnail: Thumbnail,
             mosaic: Mosaic, patch_threshold: float, top_crops, min_region_cells: int, tiles: list[tuple] | None,
             top: Callable[[], list[dict]] | None, mpp: float, scan: ScanGrid | None
             ) -> dict[CaseFile, Callable[[Path], None]]:
    """Every file but summary.json, as {name: a function writing it to the path it is given}, the longest
    first (so the last to start are short): the case pyramid (the whole mosaic read, halved and JPEG-encoded) is
    most of the work."""
    work = mosaic.root.parent
    writers: dict[CaseFile, Callable[[Path], None]] = {}
    if scan is not None:
        writers[CaseFile.CASE_OME] = lambda tmp: write_scan_pyramid(tmp, scan, f"{case_id} (scan resolution)")
    elif mosaic.width and mosaic.height:
        writers[CaseFile.CASE_OME] = lambda tmp: write_pyramid(
            tmp, mosaic.width, mosaic.height, mosaic.bands(BAND), mpp, work, f"{case_id} (model resolution)")
    thumb = thumbnail.image()
    writers[CaseFile.OVERLAY] = lambda tmp: overlay_image(thumb, heat, thumbnail.cell, heatmap.cell, result,
                                                          case_id).save(tmp, format="PNG", compress_level=PNG_LEVEL)
    if top:
        writers[CaseFile.TOP_PATCHES_JSON] = lambda tmp: tmp.write_text(_top_patches_json(case_id, top()))
    writers[CaseFile.REGIONS] = lambda tmp: tmp.write_text(
        _regions_json(heat, heatmap, patch_threshold, min_region_cells, tiles, case_id, result, mpp, scan))
    if thumb.size:
        writers[CaseFile.THUMBNAIL] = _png(thumb)
    if mosaic.width and mosaic.height:
        px = HEATMAP_PX if heatmap.cell % HEATMAP_PX == 0 else heatmap.cell
        writers[CaseFile.HEATMAP_OME] = lambda tmp: _heatmap_pyramid(tmp, heat, heatmap.cell, mosaic, px, mpp,
                                                                     work, case_id)
    for name, pixels in ((CaseFile.HEATMAP, heat_image(heat)), (CaseFile.TOP_PATCHES, patch_strip(list(top_crops)))):
        if pixels.size:
            writers[name] = _png(pixels)
    return writers


def _heatmap_pyramid(path: Path, heat: np.ndarray, cell: int, mosaic: Mosaic, px: int, mpp: float, work: Path,
                     case_id: str) -> None:
    """heatmap.ome.tif: the colour-mapped heatmap as a pyramid of its own, over the same microns as the case's."""
    hm = heatmap_image(heat, cell, mosaic.width, mosaic.height, px)
    bands = (hm[y:y + BAND] for y in range(0, hm.shape[0], BAND))
    write_pyramid(path, hm.shape[1], hm.shape[0], bands, mpp * px, work,
                  f"{case_id} heatmap (cividis, patch probability)")


def write_outputs(out_dir: Path, case_id: str, summary: dict, *, heatmap: Heatmap, thumbnail: Thumbnail,
                  mosaic: Mosaic, patch_threshold: float, top_crops: list[np.ndarray] = (),
                  min_region_cells: int = MIN_REGION_CELLS, tiles: list[tuple] | None = None,
                  top: Callable[[], list[dict]] | None = None, scan: ScanGrid | None = None) -> dict[str, str]:
    """Write the case's files into ``out_dir``; returns {name: path}. ``summary`` follows TriageSummary;
    ``top_crops`` are the top patches' pixels, highest probability first; ``tiles`` (x, y, w, h, probability,
    first-stage probability) in mosaic pixels, when given, go into regions.geojson as one tile object each;
    ``top`` gives the top patches' records for top_patches.json (called on the pool: their class-activation
    maps take a model compiled at its first use, and the compiling then runs beside the pyramid, not before it).
    ``scan``: write case.ome.tif from the scanner's tiles at their own resolution, and regions.geojson in
    its pixels (the caller gives the top patches in them too).

    Once the case has ended the inference engine is idle, so the files are written side by side on WORKERS
    threads (encoding, halving and zlib release the GIL); summary.json, which lists them, is written last."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mpp = summary.get("microns_per_pixel") or 0.0
    writers = _writers(case_id, summary, heatmap.average(), heatmap, thumbnail, mosaic, patch_threshold, top_crops,
                       min_region_cells, tiles, top, mpp, scan)
    pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="case-files")
    try:
        (name, write), *rest = writers.items()
        written = [pool.submit(_replace_into, out_dir / name, write)]
        # summary.json's text (validated and dumped, a noticeable cost for a large case's patches) beside the
        # case pyramid; submitted second: the validation holds the GIL, and the pyramid's thread must have
        # started first
        summary_json = pool.submit(_summary_json, summary, case_id, sorted(writers) + [CaseFile.SUMMARY])
        written += [pool.submit(_replace_into, out_dir / name, write) for name, write in rest]
        for job in written:
            job.result()  # the first error, if any, is raised here
        text = summary_json.result()
    finally:
        pool.shutdown(cancel_futures=True)  # after an error, what has not started never will
    _replace_into(out_dir / CaseFile.SUMMARY, lambda tmp: tmp.write_text(text))
    # the case folder's own name (made when the case began), and its folder's: without them a power cut
    # loses every file of the case, whole as each one is
    fsync_path(out_dir.absolute().parent)
    fsync_path(out_dir.absolute().parent.parent)
    return {name: str(out_dir / name) for name in [*writers, CaseFile.SUMMARY]}
