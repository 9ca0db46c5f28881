"""Reduced-size JPEG decoding for the model's path (appliance/pipeline/jpegscale.py): when it may be used, that it
changes the model's input by less than the full-size path is already off the truth, on real tissue upsampled to
40x and 20x (appliance/offline/scans.py), that tiles stay where the full-size path puts them, and that bad
payloads get a clear error."""

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from appliance.errors import InputError
from appliance.offline.scans import MODEL_MPP, SCANNER_MPP, jpeg, upsampled
from appliance.pipeline.jpegscale import dct_denominator, decode_reduced, jpeg_tile_to_model
from appliance.pipeline.resample import resample_tile, scale_factor
from tests.conftest import DEMO_CASE


@pytest.mark.parametrize("scale, x, w, expected", [
    (1 / 16, 0, 1024, 8),  # 40x to 4 um/px
    (1 / 8, 1024, 1024, 8),  # 20x: the reduced decode is the model's resolution itself
    (1 / 4, 0, 1024, 4),
    (1 / 3, 0, 1024, 2),
    (0.6, 0, 1024, 1),  # finer than the model by less than 2x: no reduction
    (1 / 16, 1020, 1024, 4),  # a position on a 4-px grid only
    (1 / 16, 0, 1001, 1),  # an odd-sized tile: decoded whole
    (1.0, 0, 1024, 1),
])
def test_the_reduction_keeps_tiles_seamless_and_no_coarser_than_the_model(scale, x, w, expected):
    assert dct_denominator(scale, x, 0, w, 1024) == expected


@pytest.fixture(scope="module")
def slide():
    return tifffile.imread(DEMO_CASE)


@pytest.mark.parametrize("magnification", list(SCANNER_MPP))
def test_the_reduced_path_changes_the_model_s_input_less_than_the_full_path_is_off_the_truth(slide, magnification):
    mpp = SCANNER_MPP[magnification]
    factor, scale = round(MODEL_MPP / mpp), scale_factor(mpp, MODEL_MPP)
    size = 1024 // factor
    change, own = [], []
    for n, (x, y) in enumerate([(1000, 800), (1000 + size, 800), (600, 1200)]):  # the first two side by side
        raw = upsampled(slide[y:y + size, x:x + size], factor, seed=n)
        payload = jpeg(raw, 80)
        sx, sy = x * factor, y * factor
        with Image.open(io.BytesIO(payload)) as img:
            full = resample_tile(np.asarray(img.convert("RGB")), sx, sy, scale)
        reduced = jpeg_tile_to_model(payload, sx, sy, scale)
        truth = resample_tile(raw, sx, sy, scale)[2].astype(np.int16)
        assert reduced[:2] == full[:2] == (x, y) and reduced[2].shape == full[2].shape == (size, size, 3)
        change.append(np.abs(reduced[2].astype(np.int16) - full[2]))
        own.append(np.abs(full[2].astype(np.int16) - truth))
    change, own = np.concatenate(change), np.concatenate(own)
    assert change.max() <= own.max() and change.mean() <= own.mean(), (change.mean(), own.mean())
    assert change.mean() > 0  # the two paths really differ: this compares them, not one path twice


def test_a_truncated_or_foreign_payload_is_refused_with_its_reason():
    tile = np.full((64, 64, 3), 180, np.uint8)
    tile[::3] = 90  # something to encode
    good = jpeg(tile)
    with pytest.raises(InputError, match="tile 7: jpeg payload cannot be decoded"):
        decode_reduced(good[: len(good) // 2], 8, label="tile 7")
    odd = jpeg(tile[:60])
    with pytest.raises(InputError, match="tile 7: a 64x60 jpeg cannot be decoded at 1/8"):
        decode_reduced(odd, 8, label="tile 7")
    assert decode_reduced(odd, lambda w, h: 4).shape == (15, 16, 3)
    grey = io.BytesIO()
    Image.fromarray(tile[..., 0]).save(grey, format="JPEG")
    with pytest.raises(InputError, match="jpeg is L 64x64"):
        decode_reduced(grey.getvalue(), 8)
    png = io.BytesIO()
    Image.fromarray(tile).save(png, format="PNG")
    with pytest.raises(InputError, match="cannot be decoded"):
        decode_reduced(png.getvalue(), 8)
    assert decode_reduced(good, 8).shape == (8, 8, 3)
