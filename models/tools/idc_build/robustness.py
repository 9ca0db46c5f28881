"""Out-of-fold AUC under what differs between labs and scanners besides the stain: scale, focus, compression,
brightness, contrast and gamma.

Each shift is applied to every development patch with fixed parameters and with Pillow/numpy code that is
not the training augmentation's (training resamples, blurs and adjusts in torch with random parameters, and
compresses with 4:4:4 JPEG): the model is not rewarded for having seen the exact transform. Every patch is
scored by the fold member that did not train on its patient, and the pooled AUC is compared with the
unshifted one.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from .metrics import auc

PATCH = 50


def _each(x: np.ndarray, fn) -> np.ndarray:
    out = np.empty_like(x)
    for i, a in enumerate(x):
        out[i] = np.asarray(fn(Image.fromarray(a)).convert("RGB"))
    return out


def _scaled(factor: float):
    """Resampled by ``factor`` about the centre (bicubic): enlarged and cropped, or shrunk and padded with
    the patch's own mirror image, back to 50 x 50."""
    n = int(round(PATCH * factor))

    def fn(im):
        a = np.asarray(im.resize((n, n), Image.BICUBIC))
        if n >= PATCH:
            o = (n - PATCH) // 2
            return Image.fromarray(a[o:o + PATCH, o:o + PATCH])
        lo = (PATCH - n) // 2
        return Image.fromarray(np.pad(a, ((lo, PATCH - n - lo), (lo, PATCH - n - lo), (0, 0)), mode="symmetric"))
    return fn


def _jpeg(quality: int):
    def fn(im):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)  # Pillow's default 4:2:0 chroma subsampling (training: 4:4:4)
        buf.seek(0)
        return Image.open(buf)
    return fn


def _gamma(g: float):
    lut = np.clip(np.round(255.0 * (np.arange(256) / 255.0) ** g), 0, 255).astype(np.uint8)
    return lambda x: lut[x]


# name -> (what it is, function of a uint8 NHWC batch); parameters at or beyond the edges of training's ranges
SHIFTS = {
    "scale_0.75": ("shrunk to 0.75x (a coarser scanner), bicubic, mirrored edges",
                   lambda x: _each(x, _scaled(0.75))),
    "scale_1.25": ("enlarged to 1.25x (a finer scanner), bicubic, centre crop", lambda x: _each(x, _scaled(1.25))),
    "blur_1.2": ("Gaussian blur radius 1.2 px (Pillow): slightly out of focus",
                 lambda x: _each(x, lambda im: im.filter(ImageFilter.GaussianBlur(1.2)))),
    "jpeg_50": ("JPEG quality 50 with 4:2:0 chroma subsampling", lambda x: _each(x, _jpeg(50))),
    "brightness_1.12": ("brightness x1.12 (Pillow ImageEnhance)",
                        lambda x: _each(x, lambda im: ImageEnhance.Brightness(im).enhance(1.12))),
    "contrast_0.75": ("contrast x0.75 (Pillow ImageEnhance)",
                      lambda x: _each(x, lambda im: ImageEnhance.Contrast(im).enhance(0.75))),
    "gamma_1.3": ("gamma 1.3 (darker mid-tones), lookup table", _gamma(1.3)),
}


def shift_table(images, labels, folds, predict, log=print) -> dict:
    """{"unshifted": pooled AUC, shift name: {"what", "pooled_auc", "drop", "fold_auc"}}; predict(fold, uint8
    patches) -> the probabilities of the member that did not train on that fold."""
    k = int(folds.max()) + 1

    def pooled(x):
        p = np.full(len(x), np.nan)
        for f in range(k):
            p[folds == f] = predict(f, x[folds == f])
        return p

    base = auc(labels, pooled(images))
    out = {"unshifted_pooled_auc": round(base, 4)}
    for name, (what, fn) in SHIFTS.items():
        p = pooled(fn(images))
        a = auc(labels, p)
        out[name] = {"what": what, "pooled_auc": round(a, 4), "drop": round(base - a, 4),
                     "fold_auc": [round(auc(labels[folds == f], p[folds == f]), 4) for f in range(k)]}
        log(f"lab shift {name}: pooled OOF AUC {a:.4f} (drop {base - a:+.4f})")
    return out
