"""The arithmetic of the measurement suite: convergence series, the cache-step rule, FID, PSNR, SSIM.

numpy (and scipy for the matrix square root) only, so every figure here is checked by tests against
hand-computed values. The profiler (``cair_export.lab.profile``) and the quality evaluation
(``cair_export.lab.evaluate``) feed it arrays; nothing here touches a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cair_runtime.errors import InvalidInputError

DEFAULT_THRESHOLD = 0.05  # the cache-step rule: relative change of cross-attention output under 5 %


# --- convergence ---------------------------------------------------------------------------


def relative_l2(current: np.ndarray, previous: np.ndarray, axes: tuple[int, ...] | None = None) -> np.ndarray:
    """Relative L2 change ``||x_t - x_{t-1}|| / ||x_{t-1}||`` over ``axes`` (all axes when None).

    The norm is the Frobenius norm of the whole tensor (per prompt when ``axes`` leaves the batch
    axis out); a zero ``x_{t-1}`` gives inf (or 0 when ``x_t`` is zero too).
    """
    current = np.asarray(current, dtype=np.float64)
    previous = np.asarray(previous, dtype=np.float64)
    difference = np.sqrt(np.sum((current - previous) ** 2, axis=axes))
    reference = np.sqrt(np.sum(previous**2, axis=axes))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(reference > 0, difference / np.where(reference > 0, reference, 1.0),
                         np.where(difference > 0, np.inf, 0.0))
    return ratio


@dataclass(frozen=True)
class SeriesSummary:
    """Per-step mean and variance over prompts of a (prompts, modules, steps) change series."""

    steps: list[int]  # step t of each entry: the change from step t-1 to step t (t = 2..T)
    mean: list[float]  # mean over prompts of the per-prompt module average
    variance: list[float]  # population variance over prompts (ddof 0)
    per_module_mean: list[list[float]]  # (modules, steps): mean over prompts, per module


def summarise_series(changes: np.ndarray, first_step: int = 2) -> SeriesSummary:
    """Average a (prompts, modules, steps) change array over modules, then mean/variance over prompts."""
    changes = np.asarray(changes, dtype=np.float64)
    if changes.ndim != 3 or 0 in changes.shape:
        raise InvalidInputError(f"change series has shape {changes.shape}; expected (prompts, modules, steps) "
                                "with none empty")
    per_prompt = changes.mean(axis=1)  # (prompts, steps): unweighted mean over modules
    return SeriesSummary(
        steps=list(range(first_step, first_step + changes.shape[2])),
        mean=per_prompt.mean(axis=0).tolist(),
        variance=per_prompt.var(axis=0).tolist(),
        per_module_mean=changes.mean(axis=0).tolist(),
    )


RULES = ("below-threshold", "fraction-of-first")


def recommend_cache_step(steps: Sequence[int], mean_change: Sequence[float], num_inference_steps: int,
                         threshold: float = DEFAULT_THRESHOLD, rule: str = "below-threshold") -> int:
    """The cache-step rule: n = the first step t whose mean relative change from step t-1 is small.

    ``rule="below-threshold"``: the change is below ``threshold`` (e.g. 0.05: under 5 %).
    ``rule="fraction-of-first"``: the change is below ``threshold`` times the first measured change
    (scale-free: e.g. 0.5 caches once the change has halved since step 2).
    At that step the cross-attention output has settled, so it is cached there. When no step
    qualifies, n = T (no caching: the plain baseline).
    """
    if rule not in RULES:
        raise InvalidInputError(f"rule {rule!r} is unknown; expected one of {', '.join(RULES)}")
    if threshold <= 0:
        raise InvalidInputError(f"threshold {threshold} must be positive, e.g. 0.05 for 5 %")
    if len(steps) != len(mean_change) or not steps:
        raise InvalidInputError(f"{len(steps)} steps but {len(mean_change)} changes; give one change per step")
    bound = threshold * mean_change[0] if rule == "fraction-of-first" else threshold
    for step, change in zip(steps, mean_change):
        if change < bound:
            return min(int(step), int(num_inference_steps))  # PNDM evaluates T+1 times
    return int(num_inference_steps)


# --- Fréchet distance ----------------------------------------------------------------------


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and sample covariance (D, D) of features (N, D), as FID computes them."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise InvalidInputError(f"features have shape {features.shape}; expected (N >= 2, D)")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FID: Heusel et al. 2017, ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (scipy sqrtm).

    As pytorch-fid: when the product is near singular, ``1e-6 * I`` is added to both covariances;
    a tiny imaginary part from sqrtm is dropped.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise InvalidInputError(f"Fréchet distance of mismatched statistics: means {mu1.shape}, {mu2.shape}, "
                                f"covariances {sigma1.shape}, {sigma2.shape}")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """Fréchet distance between two feature sets (N, D) and (M, D)."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


# --- image similarity ----------------------------------------------------------------------


def psnr(image: np.ndarray, reference: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(range^2 / MSE)``; inf for identical images."""
    mse = float(np.mean((np.asarray(image, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 2-D Gaussian window (size, size), as Wang et al.'s ``fspecial('gaussian', 11, 1.5)``."""
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(coords**2) / (2 * sigma**2))
    window = np.outer(g, g)
    return window / window.sum()


def _filter_valid(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Weighted sums of every full window position ('valid' correlation), (H-k+1, W-k+1)."""
    from numpy.lib.stride_tricks import sliding_window_view

    patches = sliding_window_view(image, window.shape)  # (H-k+1, W-k+1, k, k)
    return np.einsum("ijkl,kl->ij", patches, window)


def ssim(image: np.ndarray, reference: np.ndarray, data_range: float = 255.0, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """SSIM: Wang et al. 2004, Gaussian window 11 / 1.5, K1 0.01, K2 0.03, 'valid' windows only.

    Grey (H, W) or colour (H, W, C) images; colour SSIM is the mean over channels of each
    channel's mean SSIM map (as skimage's ``channel_axis``). Local statistics use the window's
    weights (population covariance), as the reference MATLAB code does.
    """
    x, y = np.asarray(image, np.float64), np.asarray(reference, np.float64)
    if x.shape != y.shape:
        raise InvalidInputError(f"SSIM of images of different shapes {x.shape} and {y.shape}")
    if x.ndim == 3:
        return float(np.mean([ssim(x[..., c], y[..., c], data_range, window_size, sigma, k1, k2)
                              for c in range(x.shape[2])]))
    if x.ndim != 2 or min(x.shape) < window_size:
        raise InvalidInputError(f"SSIM needs (H, W[, C]) images of at least {window_size} px a side, got {x.shape}")
    window = gaussian_window(window_size, sigma)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = _filter_valid(x, window), _filter_valid(y, window)
    var_x = _filter_valid(x * x, window) - mu_x**2
    var_y = _filter_valid(y * y, window) - mu_y**2
    cov = _filter_valid(x * y, window) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


# --- prompt adherence ----------------------------------------------------------------------


def attribute_accuracy(predicted: Sequence[dict[str, str]], truth: Sequence[dict[str, str]],
                       attributes: Sequence[str]) -> dict[str, float]:
    """Share of images whose predicted attribute equals the prompt's, per attribute, plus "all"."""
    if len(predicted) != len(truth) or not truth:
        raise InvalidInputError(f"{len(predicted)} predictions for {len(truth)} prompts; need one each, at least one")
    hits = np.array([[p[a] == t[a] for a in attributes] for p, t in zip(predicted, truth)], dtype=bool)
    table = {a: float(hits[:, i].mean()) for i, a in enumerate(attributes)}
    table["all"] = float(hits.all(axis=1).mean())
    return table
