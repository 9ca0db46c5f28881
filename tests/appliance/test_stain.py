"""Macenko stain fitting and normalisation on images made from known stain vectors."""

import numpy as np
import pytest

from appliance.pipeline.stain import (
    StainFit,
    StainFitError,
    apply_map,
    fit_stains,
    normalising_map,
    optical_density,
)

REF_HE = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])  # Ruifrok & Johnston H and E
REF_HE = REF_HE / np.linalg.norm(REF_HE, axis=0)


def synthetic_he(he: np.ndarray, strength=(1.0, 1.0), n=64, seed=0) -> np.ndarray:
    """An n x n 'tissue' image from stain vectors and random concentrations, with some glass."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.05, 1.0, (n * n, 2)) * np.asarray(strength)
    c[rng.random(n * n) < 0.2] = 0  # glass
    od = c @ he.T
    rgb = 256.0 * np.exp(-od) - 1.0
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8).reshape(n, n, 3)


def cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_optical_density_of_white_is_zero_and_grows_with_absorption():
    od = optical_density(np.array([[255, 255, 255], [127, 127, 127], [0, 0, 0]], dtype=np.uint8))
    assert od[0].tolist() == [0.0, 0.0, 0.0]
    assert 0 < od[1, 0] < od[2, 0]


def test_fit_recovers_the_stain_vectors_in_h_then_e_order():
    fit = fit_stains(synthetic_he(REF_HE))
    assert cosine(fit.he[:, 0], REF_HE[:, 0]) > 0.99
    assert cosine(fit.he[:, 1], REF_HE[:, 1]) > 0.99


def test_normalising_a_restained_copy_reproduces_the_reference_image():
    other = np.array([[0.50, 0.20], [0.80, 0.90], [0.33, 0.38]])
    other = other / np.linalg.norm(other, axis=0)
    reference_img = synthetic_he(REF_HE, seed=3)
    source_img = synthetic_he(other, strength=(1.4, 0.7), seed=3)  # same tissue, other lab
    m = normalising_map(fit_stains(source_img), fit_stains(reference_img))
    out = apply_map(source_img, m)
    before = np.abs(source_img.astype(int) - reference_img).mean()
    after = np.abs(out.astype(int) - reference_img).mean()
    assert out.dtype == np.uint8 and out.shape == source_img.shape
    assert after < before / 3, (before, after)


def test_glass_stays_glass():
    img = synthetic_he(REF_HE)
    fit = fit_stains(img)
    glass = np.full((4, 4, 3), 255, dtype=np.uint8)
    assert (apply_map(glass, normalising_map(fit, fit)) == 255).all()


def test_blank_or_wrong_input_is_refused_with_a_reason():
    with pytest.raises(StainFitError, match="stained pixels"):
        fit_stains(np.full((64, 64, 3), 250, dtype=np.uint8))
    with pytest.raises(Exception, match="uint8"):
        fit_stains(np.zeros((8, 8, 3), dtype=np.float32))


def test_fit_round_trips_through_a_dict():
    fit = fit_stains(synthetic_he(REF_HE))
    back = StainFit.from_dict(fit.to_dict())
    assert np.allclose(back.he, fit.he, atol=1e-5) and np.allclose(back.max_c, fit.max_c, atol=1e-5)
    with pytest.raises(ValueError):
        StainFit.from_dict({"he": [1, 2], "max_c": [1, 2]})
