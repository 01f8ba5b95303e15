"""The torch backend's GPU path (decode_on="device"): its fallback and blur on the CPU; the whole path
against the OpenCV worker path where CUDA and torchvision exist (skipped otherwise)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from usjepa.shards.corruptions import apply_blur
from usjepa.shards.gpu_decode import available, blur_on_device
from usjepa.shards.loader import build_loader
from usjepa.shards.synthetic_shards import write_synthetic_corpus

BASE = {"num_workers": 1, "cap": None, "speckle_p": 0.0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_synthetic_corpus(tmp_path_factory.mktemp("dec"), {"a": 24, "b": 8}, size=(120, 160), per_shard=16,
                                  seed=3)


def test_without_cuda_or_torchvision_it_warns_and_decodes_in_the_workers(corpus):
    if available():
        pytest.skip("CUDA and torchvision are here: the GPU path runs")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        loader = build_loader(corpus, "train", 8, {**BASE, "decode_on": "device"}, None, 0, 1, "cpu", 0, "torch")
    assert any("decode_on='device'" in str(x.message) for x in w)
    ref = build_loader(corpus, "train", 8, BASE, None, 0, 1, "cpu", 0, "torch")
    for a, b in zip(loader, ref):
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)


def test_bad_decode_on_is_a_clear_error():
    with pytest.raises(ValueError, match="decode_on"):
        build_loader("/nonexistent", "train", 8, {"decode_on": "gpu"})


def test_device_blur_matches_opencv_per_sample():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (4, 64, 80)).astype(np.uint8)
    eps = np.array([0.0, 0.4, 1.1, 2.0], np.float32)
    sizes = [1, 1, 5, 9]  # blur_params(eps).ksize; ε = 0.4 gives a 1-pixel kernel: no blur
    out = blur_on_device(torch.from_numpy(imgs).float()[:, None], eps, sizes, torch.device("cpu"))[:, 0].numpy()
    for k, e in enumerate(eps):
        ref = apply_blur(imgs[k], float(e)) if e > 0 else imgs[k]
        assert np.abs(out[k] - ref.astype(np.float32)).max() <= 1.0


@pytest.mark.skipif(not available(), reason="needs CUDA and torchvision (nvJPEG, roi_align)")
def test_gpu_decode_matches_the_opencv_path(corpus):
    dev = torch.device("cuda")
    ref = list(build_loader(corpus, "train", 8, {**BASE, "contrast_p": 0.0}, None, 0, 1, dev, 0, "torch"))
    got = list(build_loader(corpus, "train", 8, {**BASE, "contrast_p": 0.0, "decode_on": "device"}, None, 0, 1, dev,
                            0, "torch"))
    assert len(ref) == len(got) > 0
    for a, b in zip(ref, got):
        assert a.keys == b.keys and torch.equal(a.ctx_idx, b.ctx_idx) and torch.equal(a.valid, b.valid)
        diff = ((a.images - b.images).abs() * 0.226 * 255).flatten(1).mean(1)  # gray levels per image
        assert diff.max().item() < 3.0, diff
