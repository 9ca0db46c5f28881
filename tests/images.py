"""Real slides made worse in the ways a bench sees: out of focus, or stained like another lab's slides."""

import numpy as np

from appliance.pipeline.stain import fit_stains, turn_haematoxylin


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    r = int(3 * sigma)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    f = np.pad(img.astype(np.float32), ((r, r), (r, r), (0, 0)), mode="edge")
    f = sum(k[i] * f[i : i + img.shape[0]] for i in range(2 * r + 1))
    f = sum(k[i] * f[:, i : i + img.shape[1]] for i in range(2 * r + 1))
    return np.clip(f + 0.5, 0, 255).astype(np.uint8)


def stain_turned(img: np.ndarray, degrees: float) -> np.ndarray:
    """The slide re-coloured: its own haematoxylin vector (fitted on every 4th pixel) turned by ``degrees``
    in the H&E plane, in optical density, concentrations kept."""
    return turn_haematoxylin(img, fit_stains(img[::4, ::4]), degrees)
