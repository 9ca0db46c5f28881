"""Synthetic lab shifts, for validating the model and its gates, never for the pipeline: uint8 RGB in, the same
pixels as another lab's stain or scanner might give them out. Each is turned by an angle in degrees, so one
curve of "turn -> AUC, QC reading, OOD score" describes each.

- ``own_basis``: the slide's own Macenko fit, its haematoxylin turned in its H&E plane away from eosin (the
  kind of shift the model's training augments with; `stain.turn_haematoxylin`).
- ``ruifrok_johnston``: a fixed Ruifrok & Johnston H, E, DAB basis (the same for every slide), its H vector
  turned in the plane of H and E, away from eosin, the stain concentrations kept.
- ``scanner_colour``: a scanner's colour profile off by a turn: linear-light RGB (sRGB decoded) rotated about
  the grey axis, so white glass stays white and every stain's hue moves together.
"""

from __future__ import annotations

import numpy as np

from appliance.pipeline.stain import StainFit, apply_map, turn_haematoxylin

# Ruifrok & Johnston, as in skimage.color: rows are the optical density of pure haematoxylin, eosin and DAB
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
SHIFTS = ("own_basis", "ruifrok_johnston", "scanner_colour")


def _turned_away(a: np.ndarray, b: np.ndarray, degrees: float) -> np.ndarray:
    """Unit vector a turned by ``degrees`` in the plane of a and b, away from b."""
    a = a / np.linalg.norm(a)
    u = b - (b @ a) * a
    u /= np.linalg.norm(u)
    t = np.radians(degrees)
    return np.cos(t) * a - np.sin(t) * u


def ruifrok_johnston_turn(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """The fixed Ruifrok & Johnston basis with H turned by ``degrees``: optical density unmixed on the basis
    and recombined on the turned one, as one 3x3 map in optical density."""
    basis = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
    turned = basis.copy()
    turned[0] = _turned_away(basis[0], basis[1], degrees)
    return apply_map(rgb, (np.linalg.inv(basis) @ turned).astype(np.float32))


_LINEAR = np.where(np.arange(256) / 255.0 <= 0.04045, np.arange(256) / 255.0 / 12.92,
                   ((np.arange(256) / 255.0 + 0.055) / 1.055) ** 2.4).astype(np.float32)


def _encode_srgb(linear: np.ndarray) -> np.ndarray:
    x = np.clip(linear, 0.0, 1.0)
    v = np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)
    return np.clip(v * 255.0 + 0.5, 0, 255).astype(np.uint8)


def scanner_colour_turn(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """Linear-light RGB rotated by ``degrees`` about the grey axis (Rodrigues' formula), sRGB encoded again."""
    k = np.ones(3) / np.sqrt(3.0)
    t = np.radians(degrees)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot = np.cos(t) * np.eye(3) + np.sin(t) * cross + (1 - np.cos(t)) * np.outer(k, k)
    return _encode_srgb(_LINEAR[rgb] @ rot.T.astype(np.float32))


def shifted(rgb: np.ndarray, shift: str, degrees: float, fit: StainFit | None = None) -> np.ndarray:
    """``rgb`` under ``shift`` (one of SHIFTS) turned by ``degrees``; ``own_basis`` needs the slide's own fit."""
    if degrees == 0:
        return rgb
    if shift == "own_basis":
        if fit is None:
            raise ValueError("the own_basis shift needs the slide's own stain fit")
        return turn_haematoxylin(rgb, fit, degrees)
    if shift == "ruifrok_johnston":
        return ruifrok_johnston_turn(rgb, degrees)
    if shift == "scanner_colour":
        return scanner_colour_turn(rgb, degrees)
    raise ValueError(f"unknown shift {shift!r}; one of {', '.join(SHIFTS)}")
