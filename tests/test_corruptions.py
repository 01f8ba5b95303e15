"""Appendix E.2 corruptions: parameters, dtypes and the statistics each severity is defined by."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from usjepa.shards import corruptions as C
from usjepa.shards.corruptions import corrupt


def texture(h=224, w=224, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = cv2.resize(rng.uniform(40, 220, (h // 8, w // 8)).astype(np.float32), (w, h))
    return np.clip(low + rng.normal(0, 10, (h, w)), 0, 255).astype(np.uint8)


def test_parameter_table_follows_the_paper():
    assert [C.blur_params(e).ksize for e in (1, 2, 3)] == [5, 9, 13]
    assert [C.blur_params(e).sigma for e in (1, 2, 3)] == [1.0, 2.0, 3.0]
    assert [C.contrast_alpha(e) for e in (1, 2, 3)] == pytest.approx([0.7, 0.5, 0.3])
    assert C.contrast_alpha(0) == 1.0 and C.contrast_alpha(1.5) == pytest.approx(0.6)
    sp = [C.speckle_params(e) for e in (1, 2, 3)]
    assert [p.sigma_noise for p in sp] == pytest.approx([0.35, 0.70, 1.05])  # raw η, before smoothing
    assert [p.grain_px for p in sp] == pytest.approx([0.8, 1.1, 1.4])  # OpenCV's σ for kernel size 2ε+1
    assert [p.std_corr for p in sp] == pytest.approx([0.124, 0.180, 0.212], abs=2e-3)  # what reaches the image
    assert C.speckle_params(1, image_side=448).grain_px == pytest.approx(1.6)  # scales with the image
    with pytest.raises(ValueError):
        corrupt(texture(), "fog", 1)
    with pytest.raises(ValueError):
        C.blur_params(-1)


def test_blur_equals_opencv_gaussian_with_paper_kernel():
    img = texture()
    for eps in (1, 2, 3):
        out = corrupt(img, "blur", eps)
        k = 2 * int(np.floor(2 * eps)) + 1
        ref = cv2.GaussianBlur(img.astype(np.float32), (k, k), eps)
        assert out.dtype == np.uint8
        assert np.abs(out.astype(np.float32) - ref).max() <= 0.5 + 1e-3
    assert corrupt(img, "blur", 0.2).tolist() == img.tolist()  # kernel 1: identity


def test_contrast_shrinks_towards_the_masked_median():
    img = texture().astype(np.float32)
    mask = np.zeros(img.shape, bool)
    mask[50:150, 30:200] = True
    mu = float(np.median(img[mask]))
    for eps, alpha in zip((1, 2, 3), (0.7, 0.5, 0.3)):
        out = corrupt(img, "contrast", eps, mask=mask)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, mu + alpha * (img - mu), rtol=1e-5, atol=1e-3)
    u8 = texture(seed=3)
    assert C.masked_median(u8, mask) == float(np.median(u8[mask]))
    assert C.masked_median(u8, None) == float(np.median(u8))


@pytest.mark.parametrize("eps", [1, 2, 3])
def test_speckle_is_raw_noise_of_std_035_eps_smoothed_by_a_growing_kernel(eps):
    flat = np.full((224, 224), 100.0, np.float32)
    rng = np.random.default_rng(eps)
    out = np.stack([corrupt(flat, "speckle", eps, rng=rng) for _ in range(30)])
    eta = out / 100.0 - 1.0  # I' = I (1 + η_corr); no clipping at these levels (η_corr > -1 always here)
    p = C.speckle_params(eps)
    assert abs(eta.std() / p.std_corr - 1) < 0.05
    assert abs(eta.mean()) < 0.01
    # undo the smoothing: the std of the raw noise is the paper's 0.35 ε
    assert p.std_corr / float((C.speckle_kernel(p.grain_px).astype(np.float64) ** 2).sum()) == pytest.approx(0.35 * eps)
    # neighbour correlation of a Gaussian-smoothed white field: exp(-d² / 4σ_K²); grows with ε
    ac1 = (eta[:, :, :-1] * eta[:, :, 1:]).mean() / eta.var()
    assert abs(ac1 - np.exp(-1 / (4 * p.grain_px**2))) < 0.05


def test_speckle_is_seeded_and_keeps_uint8_range():
    img = texture()
    a = corrupt(img, "speckle", 2, rng=7)
    b = corrupt(img, "speckle", 2, rng=np.random.default_rng(7))
    assert a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, corrupt(img, "speckle", 2, rng=8))
    assert corrupt(img, "speckle", 0).tolist() == img.tolist()


def test_training_blur_kernel_and_uint8_speckle_match_the_evaluation_functions():
    """The pixel pipelines take the blur as a kernel (DALI's ``fn.filter``) and speckle in uint8: both must be
    the evaluation corruption on a uint8 image (up to one gray level of rounding)."""
    img = texture(seed=4)
    for eps in (0.6, 1.3, 1.9):
        k = C.blur_kernel(eps)
        assert k.dtype == np.float32 and k.shape == (C.blur_params(eps).ksize,) * 2
        assert abs(float(k.sum()) - 1.0) < 1e-5
        conv = cv2.filter2D(img, -1, k, borderType=cv2.BORDER_REFLECT_101)
        assert np.abs(conv.astype(int) - corrupt(img, "blur", eps).astype(int)).max() <= 1
    field = C.speckle_field(img.shape, 2.0, np.random.default_rng(5))
    via_u8 = C.apply_speckle_u8(img, field)
    assert via_u8.dtype == np.uint8
    assert np.array_equal(via_u8, corrupt(img, "speckle", 2.0, rng=np.random.default_rng(5)))
    bright = np.full((8, 8), 250, np.uint8)
    assert C.apply_speckle_u8(bright, np.full((8, 8), 0.5, np.float32)).max() == 255  # saturates, no wrap
