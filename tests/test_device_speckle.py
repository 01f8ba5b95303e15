"""Speckle drawn on the device after the pipeline has the statistics of the worker's ``speckle_field`` (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from usjepa.shards.augment import DataConfig
from usjepa.shards.corruptions import apply_speckle_u8, speckle_field
from usjepa.shards.device_speckle import speckle_gain
from usjepa.shards.loader import build_loader
from usjepa.shards.synthetic_shards import write_synthetic_corpus

SIDE = 224


def field_stats(fields: np.ndarray) -> dict:
    """Mean, std, lag-1/2 correlations along y and x, and quantiles of η_corr fields [N, H, W]."""
    f = fields - fields.mean()
    var = (f**2).mean()
    corr = {f"{axis}{lag}": float((f[:, lag:, :] * f[:, :-lag, :]).mean() / var if axis == "y"
                                  else (f[:, :, lag:] * f[:, :, :-lag]).mean() / var)
            for axis in ("y", "x") for lag in (1, 2, 3)}
    q = np.quantile(fields / np.sqrt(var), [0.01, 0.1, 0.5, 0.9, 0.99])
    return {"mean": float(fields.mean()), "std": float(np.sqrt(var)), **corr, "q": q}


def worker_fields(eps: float, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([speckle_field((SIDE, SIDE), eps, rng) for _ in range(n)])


def device_fields(eps: float, n: int, seed: int) -> np.ndarray:
    e = np.full(n, eps, np.float32)
    seeds = np.random.default_rng(seed).integers(1, 2**31, n)
    return (speckle_gain(e, seeds, (SIDE, SIDE), torch.device("cpu")) - 1.0)[:, 0].numpy()


def assert_same_statistics(a: dict, b: dict) -> None:
    assert abs(a["mean"]) < 0.01 * a["std"] and abs(b["mean"]) < 0.01 * b["std"]
    assert b["std"] == pytest.approx(a["std"], rel=0.02)
    for k in ("y1", "y2", "y3", "x1", "x2", "x3"):
        assert b[k] == pytest.approx(a[k], abs=0.015), k
    np.testing.assert_allclose(b["q"], a["q"], atol=0.05)  # Gaussian shape, in units of the std


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0, 3.0])
def test_device_field_has_the_worker_fields_statistics(eps):
    assert_same_statistics(field_stats(worker_fields(eps, 24, 1)), field_stats(device_fields(eps, 24, 2)))


def test_the_comparison_tells_severities_apart():
    """The same checks reject a field of another severity (the test can fail)."""
    with pytest.raises(AssertionError):
        assert_same_statistics(field_stats(worker_fields(1.0, 24, 1)), field_stats(device_fields(1.5, 24, 2)))


def test_unspeckled_samples_are_untouched_and_the_draw_is_reproducible():
    eps = np.array([0.0, 1.0, 0.0, 2.0], np.float32)
    seeds = np.array([0, 11, 0, 12])
    g = speckle_gain(eps, seeds, (48, 64), torch.device("cpu"))
    assert g.shape == (4, 1, 48, 64)
    assert torch.equal(g[0], torch.ones_like(g[0])) and torch.equal(g[2], torch.ones_like(g[2]))
    assert (g[1] != 1).float().mean() > 0.99
    torch.testing.assert_close(speckle_gain(eps, seeds, (48, 64), torch.device("cpu")), g, rtol=0, atol=0)
    other = speckle_gain(eps, np.array([0, 13, 0, 12]), (48, 64), torch.device("cpu"))
    assert not torch.equal(other[1], g[1])


def test_speckled_uint8_frames_match_the_worker_version_in_distribution():
    """I·(1 + η) on uint8 pixels, rounded and saturated: the relative change has the same spread."""
    rng = np.random.default_rng(3)
    img = rng.integers(40, 200, (SIDE, SIDE)).astype(np.uint8)
    from usjepa.shards.device_speckle import apply_gain_u8

    n, eps = 16, 1.5
    worker = np.stack([apply_speckle_u8(img, speckle_field((SIDE, SIDE), eps, rng)) for _ in range(n)])
    gain = speckle_gain(np.full(n, eps, np.float32), np.arange(1, n + 1), (SIDE, SIDE), torch.device("cpu"))
    dev = apply_gain_u8(torch.from_numpy(img).float().expand(n, 1, SIDE, SIDE).clone(), gain)[:, 0].numpy()
    assert dev.min() >= 0 and dev.max() <= 255 and np.array_equal(dev, np.round(dev))
    rel_w = (worker.astype(np.float64) - img) / img
    rel_d = (dev.astype(np.float64) - img) / img
    assert rel_d.std() == pytest.approx(rel_w.std(), rel=0.03)
    assert abs(rel_d.mean() - rel_w.mean()) < 0.005


def test_loader_device_speckle_matches_worker_speckle(tmp_path):
    """speckle_on="device" through the real loader (torch backend, on CPU): the same samples, crops, masks and
    unspeckled pixels as the worker path; speckled pixels differ by noise of the same strength."""
    root = write_synthetic_corpus(tmp_path, {"a": 24}, size=(120, 160), per_shard=12, seed=4)
    base = {"num_workers": 0, "cap": None, "blur_p": 0.0, "contrast_p": 0.0}
    out = {}
    for name, extra in {"clean": {"speckle_p": 0.0}, "worker": {"speckle_on": "worker", "speckle_p": 0.5},
                        "device": {"speckle_on": "device", "speckle_p": 0.5}}.items():
        loader = build_loader(root, "train", 8, {**base, **extra}, None, 0, 1, "cpu", 7, "torch")
        out[name] = list(loader)
        loader.close()
    again = build_loader(root, "train", 8, {**base, "speckle_on": "device", "speckle_p": 0.5}, None, 0, 1, "cpu", 7,
                         "torch")
    for a, b in zip(out["device"], list(again)):
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)  # reproducible
    rel = {"worker": [], "device": []}
    for c, w, d in zip(out["clean"], out["worker"], out["device"]):
        assert w.keys == d.keys == c.keys
        assert torch.equal(w.ctx_idx, d.ctx_idx) and torch.equal(w.valid, d.valid)
        gray = lambda b: (b.images[:, 0] * DataConfig.std + DataConfig.mean) * 255.0  # noqa: E731
        gc, gw, gd = gray(c), gray(w), gray(d)
        same_w = torch.isclose(gw, gc, atol=1e-3).flatten(1).all(1)
        same_d = torch.isclose(gd, gc, atol=1e-3).flatten(1).all(1)
        assert torch.equal(same_w, same_d)  # the same samples are speckled in both modes
        tissue = (gc > 30) & (gc < 200)
        for k in torch.nonzero(~same_d).flatten().tolist():
            rel["worker"].append(((gw[k] - gc[k]) / gc[k])[tissue[k]])
            rel["device"].append(((gd[k] - gc[k]) / gc[k])[tissue[k]])
    assert rel["device"], "no speckled sample drawn"
    sw, sd = torch.cat(rel["worker"]).std().item(), torch.cat(rel["device"]).std().item()
    assert sd == pytest.approx(sw, rel=0.1)
