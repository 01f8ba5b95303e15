"""Speckle drawn on the training device after the pixel pipeline (``DataConfig.speckle_on="device"``).

The CPU-first path draws each speckled sample's η_corr field in a loader worker (``corruptions.
speckle_field``: ~0.25 ms of OpenCV per 224² sample) and ships it into the pipeline as a 200 KB float32
gain. On a GPU box both are spent on noise. Here the worker decides only whether a sample is speckled, its
severity ε and a seed (``augment.draw_params``); the loader, on the device, draws white noise N(0, σ_noise²),
smooths it with the same Gaussian K(ε) (``corruptions.speckle_kernel`` taps, reflect-101 border) and
multiplies the uint8 frame by 1 + η_corr, rounded and saturated to 0..255 like the pipelines' speckle. Then
contrast and normalisation follow as before (``loader.normalise``).

Same parameters as ``corrupt``, another generator (torch's on the device instead of OpenCV's in the worker):
the same statistics, not the same draw (tests/test_device_speckle.py compares std, mean, spatial
correlation and distribution with ``speckle_field``). The noise of a batch is a pure function of the seeds
its worker drew for the batch's speckled samples and of the device type, so a resumed run draws it again.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from usjepa.shards.corruptions import speckle_kernel, speckle_params
from usjepa.shards.transfer import to_device


def batch_noise_seed(eps: np.ndarray, seeds: np.ndarray) -> int:
    """One generator seed for a batch, from its speckled samples' (ε, seed) pairs (host arrays)."""
    on = np.flatnonzero(eps > 0)
    entropy = [int(s) for s in seeds[on]] + [int(k) for k in on]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def speckle_taps(eps: np.ndarray, side: int) -> np.ndarray:
    """float32 [B, 2, K]: per sample the vertical taps scaled by σ_noise and the horizontal taps of K(ε),
    zero-padded to the batch's widest kernel (zero σ for ε = 0, so that sample's field is exactly 0)."""
    params = [speckle_params(float(e), side) if e > 0 else None for e in eps]
    taps = [speckle_kernel(p.grain_px) if p else np.ones(1, np.float32) for p in params]
    half = max(len(t) // 2 for t in taps)
    out = np.zeros((len(eps), 2, 2 * half + 1), np.float32)
    for k, (p, t) in enumerate(zip(params, taps)):
        if p is None:
            continue
        lo = half - len(t) // 2
        out[k, 0, lo : lo + len(t)] = t * np.float32(p.sigma_noise)
        out[k, 1, lo : lo + len(t)] = t
    return out


def speckle_gain(eps: np.ndarray, seeds: np.ndarray, hw: tuple[int, int], device: torch.device,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 [B, 1, H, W] on ``device``: 1 + η_corr for each sample with ε > 0, exactly 1 elsewhere.

    ``eps``/``seeds``: host arrays [B] (``PreparedBatch.speckle_eps/speckle_seed``). Asynchronous on a GPU:
    the taps travel from pinned memory, the noise is drawn on the device."""
    device = torch.device(device)
    eps = np.asarray(eps, np.float32)
    n, (h, w) = len(eps), hw
    taps = to_device(torch.from_numpy(speckle_taps(eps, max(h, w))), device)
    k = taps.shape[-1]
    half = k // 2
    if generator is None:
        generator = torch.Generator(device)
    generator.manual_seed(batch_noise_seed(eps, np.asarray(seeds, np.int64)))
    white = torch.randn((1, n, h, w), generator=generator, device=device, dtype=torch.float32)
    # reflect = reflect-101 (the edge pixel is not repeated), OpenCV's BORDER_REFLECT_101 of speckle_field
    white = F.pad(white, (half, half, half, half), mode="reflect")
    field = F.conv2d(white, taps[:, 0].reshape(n, 1, k, 1), groups=n)  # σ_noise · K along y
    field = F.conv2d(field, taps[:, 1].reshape(n, 1, 1, k), groups=n)  # K along x
    return field.reshape(n, 1, h, w).add_(1.0)


def apply_gain_u8(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """In place on float pixels holding uint8 values: ``x·gain``, rounded and saturated to 0..255."""
    return x.mul_(gain).round_().clamp_(0.0, 255.0)
