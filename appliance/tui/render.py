"""Pure drawing logic for the terminal: half-block pictures, the heatmap over the tissue, verdict wording.

A half-block cell ("▀") shows two pixels, one above the other: the foreground colours the top one and the
background the bottom one, so a W x 2H picture fills W x H terminal cells.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from rich.style import Style
from rich.text import Text

from appliance.colormap import colormap
from appliance.terms import Verdict

HALF = "▀"
# Okabe-Ito colours (safe for the common colour-vision deficiencies); a word and a symbol go with each, so
# the colour is never the only signal.
VERDICTS = {
    Verdict.SUSPICIOUS: ("▲", "SUSPICIOUS", "#E69F00", "#000000",
                   "Prioritise this case for pathologist review."),
    Verdict.BENIGN: ("●", "BENIGN-APPEARING", "#0072B2", "#FFFFFF",
                         "Routine queue: the pathologist reviews it as usual."),
    Verdict.CANNOT_CALL: ("?", "CANNOT CALL", "#BBBBBB", "#000000",
                    "No call was made: act on the reasons below, then rescan."),
}


def verdict_words(verdict: str | None) -> tuple[str, str, str, str, str]:
    """(symbol, word, background, foreground, what to do) for a verdict; a case still running has none."""
    return VERDICTS.get(verdict or "", ("…", (verdict or "no call yet").upper(), "#444444", "#FFFFFF",
                                        "Waiting for the scan to finish."))


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im)


def fit(rows: int, cols: int, max_cols: int, max_lines: int) -> tuple[int, int]:
    """(width in cells, height in pixel rows, even) for a rows x cols picture, keeping its aspect."""
    scale = min(max_cols / max(cols, 1), 2 * max_lines / max(rows, 1))
    w = max(1, int(cols * scale))
    h = max(2, int(rows * scale) // 2 * 2)
    return w, h


def halfblocks(rgb: np.ndarray) -> Text:
    """An (h, w, 3) uint8 picture as half-block text, h/2 lines of w cells (an odd last row gets black)."""
    if rgb.shape[0] % 2:
        rgb = np.concatenate([rgb, np.zeros((1,) + rgb.shape[1:], dtype=rgb.dtype)])
    text = Text(no_wrap=True, overflow="crop")
    for r in range(0, rgb.shape[0], 2):
        for top, bottom in zip(rgb[r], rgb[r + 1]):
            text.append(HALF, Style(color=_hex(top), bgcolor=_hex(bottom)))
        if r + 2 < rgb.shape[0]:
            text.append("\n")
    return text


def heat_over_tissue(thumb: np.ndarray, heat: np.ndarray, max_cols: int, max_lines: int) -> np.ndarray:
    """The tissue thumbnail (rows, cols, 3) with the heatmap (grey+alpha per heatmap cell, as heatmap.png)
    blended over the scored cells in cividis, resized to fit max_cols x max_lines cells."""
    w, h = fit(thumb.shape[0], thumb.shape[1], max_cols, max_lines)
    tissue = np.asarray(Image.fromarray(thumb).resize((w, h), Image.BOX)).astype(np.float32)
    value = np.asarray(Image.fromarray(heat[..., 0]).resize((w, h), Image.NEAREST)).astype(np.float32) / 255
    scored = np.asarray(Image.fromarray(heat[..., 1]).resize((w, h), Image.NEAREST)) > 127
    tissue[scored] = 0.35 * tissue[scored] + 0.65 * colormap(value[scored])
    return (tissue + 0.5).astype(np.uint8)


def legend(width: int = 20) -> Text:
    """The cividis scale from 0 to 1 as one line of cells."""
    text = Text("0 ", no_wrap=True)
    for v in np.linspace(0, 1, width):
        text.append(" ", Style(bgcolor=_hex(colormap(np.array([v]))[0])))
    text.append(" 1  patch probability of IDC")
    return text


def patch_row(strip: np.ndarray, count: int, cells: int) -> Text:
    """The first ``count`` patches of top_patches.png (square, side by side) as cells x cells/2 thumbnails
    separated by a blank column."""
    side = strip.shape[0]
    n = min(count, strip.shape[1] // side)
    if n == 0:
        return Text("")
    small = [np.asarray(Image.fromarray(strip[:, i * side:(i + 1) * side]).resize((cells, cells), Image.BOX))
             for i in range(n)]
    gap = np.zeros((cells, 1, 3), dtype=np.uint8)
    row = np.concatenate([part for s in small for part in (s, gap)][:-1], axis=1)
    return halfblocks(row)


def eta_words(seconds: float | None) -> str:
    if seconds is None:
        return "ETA: estimating"
    if seconds <= 0:
        return "ETA: done"
    return f"ETA: {seconds:.0f} s" if seconds < 120 else f"ETA: {seconds / 60:.0f} min"


def _hex(rgb) -> str:
    r, g, b = (int(v) for v in rgb[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def delivery_words(deliveries: list[dict]) -> str:
    """The case's messages to the lab's systems in words, one line per destination (its latest revision);
    empty when none are configured."""
    latest: dict[str, dict] = {}
    for d in deliveries:
        if d["destination"] not in latest or d["revision"] >= latest[d["destination"]]["revision"]:
            latest[d["destination"]] = d
    lines = []
    for dest, d in sorted(latest.items()):
        kind, _, where = dest.partition(":")
        name = f"{'HL7' if kind == 'mllp' else 'FHIR'} {where}"
        if d["status"] == "delivered":
            lines.append(f"Sent to LIS ✓ ({name}, message {d['message_id']})")
        elif d["status"] == "failed":
            lines.append(f"NOT sent to LIS ({name}): {d.get('last_error') or 'rejected'}. Fix the receiver, then "
                         f"send it again: POST /deliveries/{d['id']}/retry")
        else:
            tried = f"attempt {d['attempts']} failed: {d['last_error']}" if d.get("attempts") else "sending"
            lines.append(f"Sending to LIS ({name}): {tried}; trying again")
    return "\n".join(lines)
