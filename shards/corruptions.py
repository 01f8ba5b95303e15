"""Image corruptions of the paper's Appendix E.2, one implementation for augmentation and evaluation.

``corrupt(img, kind, eps, mask, rng)`` is what evaluation calls; the training pipelines (DALI and the
OpenCV baseline) take the *same* per-severity parameters from the small functions below
(``blur_params``, ``contrast_alpha``, ``speckle_params``, ``speckle_field``), so there is one
definition of what "blur at ε" means.

Severity ε is a float: evaluation uses ε ∈ {1, 2, 3}; augmentation draws ε from a range in ``DataConfig``.

* **blur**: Gaussian, σ = ε, kernel 2⌊2ε⌋+1 (paper). Border: reflect-101 (OpenCV's and DALI's default).
* **contrast**: I' = μ + α(ε)(I − μ), μ = median inside the USrc mask (whole image without a mask).
  α(1, 2, 3) = 0.7, 0.5, 0.3 (paper), linearly interpolated between (0, 1) and those points, held at 0.3
  beyond ε = 3.
* **speckle**: I' = I·(1 + η_corr), η_corr = η * K, η ~ N(0, σ_noise²), σ_noise = 0.35ε, clipped at 0 (and at
  255 for uint8). The paper only says that the kernel grows with ε. Our choices:

  - σ_noise is the std of the raw noise η **before** smoothing, as the paper writes it. Smoothing divides the
    std by ≈ 2√π·σ_K, so the noise that reaches the image is much weaker: std(η_corr) = 0.124, 0.180, 0.212 at
    ε = 1, 2, 3 (``SpeckleParams.std_corr``). Reading σ_noise as the std *after* smoothing (0.35 … 1.05) turns
    the frame into black-and-white blobs from ε = 2 on, which no encoder could survive, whereas the paper
    reports F1 drops of 0.6-45 % at ε = 3; the literal reading is the one consistent with its results.
  - K is a Gaussian of σ_K(ε) = 0.5 + 0.3ε pixels (0.8, 1.1, 1.4 px), i.e. OpenCV's own σ for a kernel of
    size 2ε+1 = 3, 5, 7 — the "kernel size grows with ε" of the paper — evaluated over ±3σ_K rather than cut
    at that size. Pixels are those of a 224-pixel image; σ_K scales with the longer side for other sizes.
  - The grains are about one pixel, so the field is drawn at full resolution (a low-resolution draw would
    change its spectrum); it costs ~0.25 ms per 224² image in the CPU worker, once, for both pipelines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

KINDS = ("blur", "contrast", "speckle")
SEVERITIES = (1, 2, 3)

# (ε, α) points of the contrast depletion factor; α(0) = 1 is the identity.
_CONTRAST_EPS = (0.0, 1.0, 2.0, 3.0)
_CONTRAST_ALPHA = (1.0, 0.7, 0.5, 0.3)

SPECKLE_SIGMA_PER_EPS = 0.35  # paper: σ_noise = 0.35 ε
SPECKLE_REFERENCE_SIDE = 224  # σ_K is given in pixels of an image with this longer side


@dataclass(frozen=True)
class BlurParams:
    sigma: float
    ksize: int  # odd window size; 1 means identity


@dataclass(frozen=True)
class SpeckleParams:
    sigma_noise: float  # std of the raw noise η (paper: 0.35 ε)
    grain_px: float  # σ_K of the smoothing Gaussian, in pixels of the image being corrupted
    std_corr: float  # std of η_corr = η * K (what multiplies the image)


def blur_params(eps: float) -> BlurParams:
    eps = float(eps)
    if eps < 0:
        raise ValueError(f"blur severity must be >= 0, got {eps}")
    return BlurParams(sigma=eps, ksize=2 * int(math.floor(2 * eps)) + 1)


def blur_taps(eps: float) -> np.ndarray:
    """The 1-D Gaussian of ``blur_params(eps)`` (float32 [k], sums to 1): ``cv2.GaussianBlur`` applies it along
    each axis."""
    p = blur_params(eps)
    return cv2.getGaussianKernel(p.ksize, p.sigma, cv2.CV_32F).ravel()


def blur_kernel(eps: float) -> np.ndarray:
    """The 2-D Gaussian of ``blur_params(eps)`` (float32 [k, k], sums to 1): the outer product of its taps."""
    k = blur_taps(eps)
    return np.outer(k, k)


def contrast_alpha(eps: float) -> float:
    if eps < 0:
        raise ValueError(f"contrast severity must be >= 0, got {eps}")
    return float(np.interp(float(eps), _CONTRAST_EPS, _CONTRAST_ALPHA))


def speckle_kernel(grain_px: float) -> np.ndarray:
    """1-D Gaussian taps over ±3σ (float32, sums to 1); the 2-D kernel is its outer product."""
    half = max(1, int(math.ceil(3.0 * grain_px)))
    return cv2.getGaussianKernel(2 * half + 1, grain_px).astype(np.float32).ravel()


def speckle_params(eps: float, image_side: int = SPECKLE_REFERENCE_SIDE) -> SpeckleParams:
    """``image_side``: the longer side of the image the noise multiplies."""
    if eps < 0:
        raise ValueError(f"speckle severity must be >= 0, got {eps}")
    grain = (0.5 + 0.3 * float(eps)) * image_side / SPECKLE_REFERENCE_SIDE
    sigma = SPECKLE_SIGMA_PER_EPS * float(eps)
    k = speckle_kernel(grain).astype(np.float64)
    return SpeckleParams(sigma_noise=sigma, grain_px=grain, std_corr=sigma * float((k**2).sum()))


def speckle_field(out_hw: tuple[int, int], eps: float, rng: np.random.Generator) -> np.ndarray:
    """η_corr (float32 [H, W]): N(0, σ_noise²) white noise smoothed by the Gaussian K(ε).

    ``corrupt`` and both training pipelines draw speckle through this function."""
    p = speckle_params(eps, max(out_hw))
    # OpenCV's generator draws 224² normals 3.4x faster than numpy's Philox (0.19 vs 0.64 ms), and training
    # draws a field for half of all samples. Seeded from ``rng``, the field stays a pure function of it.
    white = np.empty(out_hw, np.float32)
    cv2.setRNGSeed(int(rng.integers(1, 2**31)))  # OpenCV's generator is per thread
    cv2.randn(white, 0.0, float(p.sigma_noise))
    k = speckle_kernel(p.grain_px)
    return cv2.sepFilter2D(white, cv2.CV_32F, k, k, borderType=cv2.BORDER_REFLECT_101)


def apply_blur(x: np.ndarray, eps: float) -> np.ndarray:
    """Blur of severity ``eps`` (the OpenCV pipelines' and ``corrupt``'s blur); uint8 in → uint8 out, rounded."""
    p = blur_params(eps)
    if p.ksize == 1:
        return x
    return cv2.GaussianBlur(x, (p.ksize, p.ksize), p.sigma, borderType=cv2.BORDER_REFLECT_101)


def apply_speckle(x: np.ndarray, field: np.ndarray) -> np.ndarray:
    """I·(1 + η_corr) on a float32 image, clipped at 0."""
    out = x * (1.0 + field)
    return np.maximum(out, 0.0, out=out)


def apply_speckle_u8(x: np.ndarray, field: np.ndarray) -> np.ndarray:
    """I·(1 + η_corr) on a uint8 image, rounded and saturated to 0..255 (the training pipelines' speckle:
    DALI casts ``img * (1 + η)`` to uint8 the same way, up to the rounding of exact halves)."""
    return cv2.multiply(x, 1.0 + field, dtype=cv2.CV_8U)


def masked_median(img: np.ndarray, mask: np.ndarray | None) -> float:
    """Median brightness inside the USrc mask (the whole image when the mask is None or empty)."""
    whole = mask is None or not mask.any()
    if img.dtype == np.uint8:  # a masked histogram (no copy of the pixels), then its middle: O(n), no sort
        m = None if whole else np.ascontiguousarray(mask, dtype=bool).view(np.uint8)
        cum = np.cumsum(cv2.calcHist([np.ascontiguousarray(img)], [0], m, [256], [0, 256]).ravel())
        n = int(cum[-1])
        lo = int(np.searchsorted(cum, (n - 1) // 2 + 1))
        hi = int(np.searchsorted(cum, n // 2 + 1))
        return 0.5 * (lo + hi)
    return float(np.median(img if whole else img[mask.astype(bool)]))


def _as_generator(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def corrupt(
    img: np.ndarray,
    kind: str,
    eps: float,
    mask: np.ndarray | None = None,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Corrupt a grayscale image [H, W] (uint8 or float on the 0..255 scale) with severity ``eps``.

    uint8 in → uint8 out (rounded, clipped to 0..255); float in → float32 out (speckle clipped at 0 only).
    ``mask``: bool [H, W] USrc mask, used by contrast for its median. ``rng``: Generator or seed (speckle).
    """
    if kind not in KINDS:
        raise ValueError(f"corruption kind must be one of {KINDS}, got {kind!r}")
    img = np.asarray(img)
    if img.ndim != 2:
        raise ValueError(f"corrupt expects a grayscale [H, W] image, got shape {img.shape}")
    is_u8 = img.dtype == np.uint8
    if not is_u8 and not np.issubdtype(img.dtype, np.floating):
        raise TypeError(f"corrupt expects uint8 or float images, got {img.dtype}")
    x = img.astype(np.float32)
    if kind == "blur":
        out = apply_blur(x, eps)
    elif kind == "contrast":
        mu = masked_median(img, mask)
        a = contrast_alpha(eps)
        out = mu + a * (x - mu)
    else:
        if eps == 0:
            out = x
        else:
            out = apply_speckle(x, speckle_field(img.shape, eps, _as_generator(rng)))
    if is_u8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(np.float32)
