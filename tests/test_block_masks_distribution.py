"""Block-mask sampler: no positional bias, uniform subsampling, and agreement of the Numba kernel with the
plain-Python reference in distribution. All draws are seeded, so every test is deterministic."""

from __future__ import annotations

import math

import numpy as np
import pytest

from usjepa.kernels import block_masks
from usjepa.kernels.block_masks import MaskConfig, sample_block_masks, sample_block_masks_reference

from test_block_masks import G, named_grids, sector_grid


def chi2_z(observed, expected, variance=None):
    """Chi-square statistic (n - 1 degrees of freedom) as a standard normal score (Wilson-Hilferty);
    about N(0, 1) under the null. variance defaults to the multinomial one, the expected count."""
    observed, expected = np.asarray(observed, float), np.asarray(expected, float)
    k = observed.size - 1
    x = ((observed - expected) ** 2 / (expected if variance is None else variance)).sum()
    return ((x / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))


def acceptable_positions(valid, h, w, tau):
    """All top-left corners (last row/column included) whose block holds >= tau' valid patches (Eq. 3)."""
    n_valid = int(valid.sum())
    thr = max(1, math.ceil(tau * min(h * w, n_valid) - 1e-9))
    return {(t, l) for t in range(G - h + 1) for l in range(G - w + 1)
            if valid[t : t + h, l : l + w].sum() >= thr}


def fixed_size(h, w, **kw):
    """A config whose targets are always h x w (scale and aspect ranges collapsed)."""
    return MaskConfig(tgt_scale=(h * w / G**2,) * 2, tgt_aspect=(h / w,) * 2, **kw)


@pytest.mark.parametrize("h, w", [(4, 4), (3, 5)])
@pytest.mark.parametrize("grid_name", ["all", "sector", "small_sector"])
def test_target_positions_uniform_over_acceptable_positions(grid_name, h, w):
    cfg = fixed_size(h, w)
    # (in much smaller valid areas the whole-image retries, which keep min_keep context patches free,
    # pull the targets toward the ends of the area: documented in docs/kernels.md)
    grid = sector_grid(50, 0.8) if grid_name == "small_sector" else named_grids()[grid_name]
    ok = sorted(acceptable_positions(grid, h, w, cfg.tau))
    counts = dict.fromkeys(ok, 0)
    valid = np.stack([grid] * 128)
    for seed in range(20):
        _, _, blocks = sample_block_masks(valid, cfg, seed, return_blocks=True)
        assert (blocks[:, 1:, 2:] == (h, w)).all()
        for t, l in blocks[:, 1:, :2].reshape(-1, 2).tolist():
            counts[(t, l)] += 1  # a KeyError here is a block the USrc rule should have rejected
    n = sum(counts.values())
    observed = np.array([counts[p] for p in ok])
    assert chi2_z(observed, np.full(len(ok), n / len(ok))) < 4.0
    # the last row and the last column of positions are reachable (I-JEPA's randint(0, G - h) misses them)
    assert sum(c for (t, l), c in counts.items() if t == max(t for t, _ in ok)) > 0
    assert sum(c for (t, l), c in counts.items() if l == max(l for _, l in ok)) > 0


@pytest.mark.parametrize("grid_name", ["all", "sector"])
def test_per_patch_target_frequency_matches_the_valid_area_expectation(grid_name):
    """Per-patch selection frequency of the targets vs its exact expectation: positions uniform over the
    acceptable ones, for the size each batch drew, intersected with the valid area."""
    cfg = MaskConfig()
    grid = named_grids()[grid_name]
    valid = np.stack([grid] * 128)
    observed = np.zeros((G, G))
    expected = np.zeros((G, G))
    out_seen = np.zeros(G * G, bool)
    for seed in range(40):
        _, tgt, blocks = sample_block_masks(valid, cfg, seed, return_blocks=True)
        out_seen[np.unique(tgt[tgt >= 0])] = True
        h, w = blocks[0, 1, 2:]
        ok = acceptable_positions(grid, h, w, cfg.tau)
        cover = np.zeros((G, G))
        for t, l in ok:
            cover[t : t + h, l : l + w] += 1
        expected += cover / len(ok) * (valid.shape[0] * cfg.n_targets)
        for t, l in blocks[:, 1:, :2].reshape(-1, 2).tolist():
            observed[t : t + h, l : l + w] += 1
    observed *= grid  # M_i = B_i ∩ valid
    expected *= grid
    # binomial counts: |o - e| / sqrt(e) is at most about N(0, 1) per patch
    assert expected[grid].min() > 50
    assert (np.abs(observed - expected)[grid] / np.sqrt(expected[grid])).max() < 4.5
    assert (observed[grid] > 0).all()
    # every valid patch, edge and corner patches included, reaches the output targets, and nothing else
    assert out_seen[grid.ravel()].all() and not out_seen[~grid.ravel()].any()
    if grid_name == "all":
        assert observed[G - 1].min() > 0 and observed[:, G - 1].min() > 0


def test_context_reaches_the_last_row_and_column():
    valid = np.ones((64, G, G), bool)
    seen = np.zeros(G * G, int)
    for seed in range(10):
        ctx, _ = sample_block_masks(valid, MaskConfig(), seed)
        np.add.at(seen, ctx.ravel(), 1)
    seen = seen.reshape(G, G)
    assert seen[G - 1].min() > 0 and seen[:, G - 1].min() > 0 and seen[G - 1, G - 1] > 0


@pytest.mark.parametrize("n, k", [(50, 20), (50, 40), (196, 1), (30, 30)])
def test_subsampling_is_uniform(n, k):
    rng = np.random.default_rng(0)
    mask0 = np.zeros(G * G, np.uint8)
    positions = np.sort(rng.choice(G * G, n, replace=False))
    mask0[positions] = 1
    rows = np.array([int("".join(str(b) for b in mask0[r * G : (r + 1) * G][::-1]), 2) for r in range(G)],
                    np.uint64)  # bit c of word r = patch (r, c)
    st = np.array([12345, 0], np.uint64)
    flag = np.empty(G * G, np.uint8)
    out = np.empty(k, np.int64)
    hits = np.zeros(G * G)
    reps = 4000
    for _ in range(reps):
        block_masks._subsample_sorted(rows, G, n, k, st, flag, out)
        assert np.all(np.diff(out) > 0) and mask0[out].all()
        hits[out] += 1
    if k < n:
        e = np.full(n, reps * k / n)
        assert chi2_z(hits[positions], e, e * (1 - k / n)) < 4.0
    else:
        assert (hits[positions] == reps).all()


def mixed_batch():
    g = named_grids()
    return np.stack([g["sector"], g["narrow_sector"], g["sliver_row"], g["random"], g["all"], g["single"]])


def run_many(sampler, valid, cfg, seeds):
    """Per image: per-patch selection counts of context and targets, histograms of the block tops and
    lefts (context, first target, all targets), and the equalised lengths per call."""
    B = valid.shape[0]
    ctx_counts = np.zeros((B, G * G))
    tgt_counts = np.zeros((B, G * G))
    corners = np.zeros((3, 2, B, G))  # [context | first target | all targets, top | left, image, value]
    lengths = []
    for seed in seeds:
        ctx, tgt, blocks = sampler(valid, cfg, seed, return_blocks=True)
        rows = np.arange(B)
        for i in range(B):
            ctx_counts[i, ctx[i][ctx[i] >= 0]] += 1
            t = tgt[:, i].ravel()
            np.add.at(tgt_counts[i], t[t >= 0], 1)
        for k in (0, 1):
            corners[0, k, rows, blocks[:, 0, k]] += 1
            corners[1, k, rows, blocks[:, 1, k]] += 1
            for j in range(1, cfg.n_targets + 1):
                corners[2, k, rows, blocks[:, j, k]] += 1
        lengths.append(((ctx >= 0).sum(), (tgt >= 0).sum()))
    return ctx_counts, tgt_counts, corners, np.array(lengths, float)


def max_two_sample_z(a, b, n_a, n_b):
    """Largest two-proportion z-score over cells (counts a, b out of n_a, n_b draws); cells correlate, so
    this is only a coarse check: a loose bound catches gross differences (fallbacks, lost patches)."""
    p = (a + b) / (n_a + n_b)
    se = np.sqrt(np.maximum(p * (1 - p), 1e-12) * (1 / n_a + 1 / n_b))
    return np.max(np.abs(a / n_a - b / n_b) / se)


def homogeneity_z(a, b):
    """Chi-square test that two histograms of independent draws come from one distribution, as a z-score."""
    keep = (a + b) > 0
    a, b = a[keep].astype(float), b[keep].astype(float)
    if a.size < 2:
        return 0.0
    fa = a.sum() / (a.sum() + b.sum())
    total = a + b
    x = ((a - fa * total) ** 2 / (fa * total) + (b - (1 - fa) * total) ** 2 / ((1 - fa) * total)).sum()
    k = a.size - 1
    return ((x / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))


@pytest.mark.parametrize("usrc, lengths, tgt_scale_of", [(True, "per_image", "grid"), (False, "per_image", "grid"),
                                                         (True, "batch_min", "grid"), (True, "per_image", "valid")])
def test_numba_and_reference_agree_in_distribution(usrc, lengths, tgt_scale_of):
    """Default settings on ordinary and degenerate grids (every fallback runs), both length modes and
    both target scales."""
    cfg = MaskConfig(usrc=usrc, max_tries=5, lengths=lengths, tgt_scale_of=tgt_scale_of)  # fewer tries: faster
    valid = mixed_batch()
    n_ref, n_nb = 300, 3000
    ref = run_many(sample_block_masks_reference, valid, cfg, range(n_ref))
    nb = run_many(sample_block_masks, valid, cfg, range(10**6, 10**6 + n_nb))
    # context and target selection frequencies per image and patch, after equalisation
    assert max_two_sample_z(ref[0], nb[0], n_ref, n_nb) < 5.0
    assert max_two_sample_z(ref[1], nb[1], n_ref * cfg.n_targets, n_nb * cfg.n_targets) < 5.0
    # context and first-target positions: one independent draw per call and image
    for which in (0, 1):
        for k in (0, 1):
            for i in range(valid.shape[0]):
                assert homogeneity_z(ref[2][which, k, i], nb[2][which, k, i]) < 4.5, (which, k, i)
    # total kept lengths of context and targets per call: same means within 4 standard errors
    for col in (0, 1):
        a, b = ref[3][:, col], nb[3][:, col]
        se = math.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) <= 4 * se + 1e-9


def test_numba_and_reference_agree_on_block_positions():
    """Fixed target size (so the T targets of an image are independent draws): tops and lefts of all
    targets, a sensitive check of off-by-one position ranges."""
    cfg = fixed_size(4, 5)
    g = named_grids()
    valid = np.stack([g["sector"], g["random"], g["all"], sector_grid(50, 0.8)])
    n_ref, n_nb = 600, 3000
    ref = run_many(sample_block_masks_reference, valid, cfg, range(n_ref))
    nb = run_many(sample_block_masks, valid, cfg, range(10**6, 10**6 + n_nb))
    for k in (0, 1):
        for i in range(valid.shape[0]):
            assert homogeneity_z(ref[2][2, k, i], nb[2][2, k, i]) < 4.5, (k, i)
