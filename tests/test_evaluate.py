"""The evaluation's arithmetic: FID, PSNR, SSIM and accuracy tables against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from cair_export.lab.quality_metrics import (
    attribute_accuracy,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    gaussian_window,
    psnr,
    ssim,
)
from cair_runtime.errors import InvalidInputError


def test_fid_of_identical_gaussians_is_zero():
    mu = np.array([1.0, -2.0, 0.5])
    a = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.1], [0.0, 0.1, 0.5]])
    assert frechet_distance(mu, a, mu, a) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_two_known_gaussians_matches_the_closed_form():
    # Diagonal covariances commute: Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(s1) - sqrt(s2))^2.
    mu1, mu2 = np.array([0.0, 0.0]), np.array([3.0, 4.0])  # ||mu1 - mu2||^2 = 25
    s1, s2 = np.diag([4.0, 1.0]), np.diag([1.0, 9.0])  # (2 - 1)^2 + (1 - 3)^2 = 5
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(30.0)


def test_fid_in_one_dimension_is_the_wasserstein_distance_squared():
    # N(0, 1) vs N(1, 4): (0 - 1)^2 + (1 - 2)^2 = 2
    assert frechet_distance(np.array([0.0]), np.array([[1.0]]), np.array([1.0]), np.array([[4.0]])) == pytest.approx(2.0)


def test_fid_from_features_uses_sample_statistics():
    features = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    mu, sigma = feature_statistics(features)
    np.testing.assert_allclose(mu, [1.0, 1.0])
    np.testing.assert_allclose(sigma, np.diag([4 / 3, 4 / 3]))  # ddof 1: 4 ones squared / 3
    assert fid_from_features(features, features + [1.0, 0.0]) == pytest.approx(1.0)  # a shift of 1
    with pytest.raises(InvalidInputError):
        feature_statistics(np.zeros((1, 2)))


def test_psnr_of_a_hand_computed_pair():
    a = np.zeros((2, 2), dtype=np.uint8)
    b = np.array([[10, 0], [0, 0]], dtype=np.uint8)  # MSE = 100 / 4 = 25
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / 25))
    assert psnr(a, a) == float("inf")


def test_gaussian_window_is_normalised_and_symmetric():
    window = gaussian_window(11, 1.5)
    assert window.shape == (11, 11) and window.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(window, window.T)
    assert window[5, 5] == window.max()


def test_ssim_of_identical_images_is_one():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    assert ssim(image, image) == pytest.approx(1.0)


def test_ssim_of_constant_images_is_the_luminance_term():
    # No variance anywhere: SSIM = (2 a b + C1) / (a^2 + b^2 + C1), C1 = (0.01 * 255)^2.
    a, b, c1 = 100.0, 120.0, (0.01 * 255) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert ssim(np.full((12, 12), a), np.full((12, 12), b)) == pytest.approx(expected)


def test_ssim_of_one_window_matches_the_weighted_formula():
    # An 11x11 image has exactly one window: compute Wang et al.'s formula by hand with its weights.
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 255, (11, 11)), rng.uniform(0, 255, (11, 11))
    w = gaussian_window()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
    cov = (w * (x - mx) * (y - my)).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    expected = (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert ssim(x, y) == pytest.approx(expected)


def test_ssim_of_colour_images_averages_channels():
    rng = np.random.default_rng(2)
    x, y = rng.uniform(0, 255, (12, 12, 2)), rng.uniform(0, 255, (12, 12, 2))
    assert ssim(x, y) == pytest.approx((ssim(x[..., 0], y[..., 0]) + ssim(x[..., 1], y[..., 1])) / 2)
    with pytest.raises(InvalidInputError):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))  # smaller than the window


def test_attribute_accuracy_table():
    truth = [{"shape": "circle", "colour": "red"}, {"shape": "star", "colour": "blue"},
             {"shape": "cross", "colour": "green"}, {"shape": "square", "colour": "red"}]
    predicted = [{"shape": "circle", "colour": "red"}, {"shape": "star", "colour": "red"},
                 {"shape": "circle", "colour": "green"}, {"shape": "square", "colour": "red"}]
    table = attribute_accuracy(predicted, truth, ("shape", "colour"))
    assert table == {"shape": 0.75, "colour": 0.75, "all": 0.5}
    with pytest.raises(InvalidInputError):
        attribute_accuracy(predicted[:2], truth, ("shape",))


def test_held_out_prompts_cycle_and_carry_their_truth():
    from cair_export.lab.evaluate import held_out_prompts
    from cair_export.lab.shapes import data

    count = len(data.held_out_scenes()) + 2
    prompts, truth = held_out_prompts(count)
    assert len(prompts) == len(truth) == count
    assert prompts[-1] == prompts[1]  # cycled
    assert truth[0]["shape"] in prompts[0] and truth[0]["colour"] in prompts[0]
