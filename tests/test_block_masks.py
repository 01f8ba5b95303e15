"""Block-mask sampler: contract, USrc properties, fallbacks, determinism, config (kernels/block_masks.py)."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usjepa.kernels import block_masks
from usjepa.kernels.block_masks import MaskConfig, mask_lengths, sample_block_masks, sample_block_masks_reference
from usjepa.kernels.mask_config import block_size
from usjepa.kernels.patch_grid import patch_validity

G = 14
CFG = MaskConfig()
SAMPLERS = [sample_block_masks, sample_block_masks_reference]


def sector_grid(aperture_deg=75.0, depth=0.9, apex_y=-0.1, size=224):
    """14 x 14 validity of a pixel-level fan (apex above the top edge), like a convex-probe frame."""
    y, x = np.mgrid[0:size, 0:size] / size
    dy, dx = y - apex_y, x - 0.5
    r = np.hypot(dx, dy)
    angle = np.degrees(np.arctan2(np.abs(dx), dy))
    fan = (angle <= aperture_deg / 2) & (r >= 0.15) & (r <= depth - apex_y)
    return patch_validity(fan, G)


def named_grids():
    one = np.zeros((G, G), bool)
    one[6, 9] = True
    corner = np.zeros((G, G), bool)
    corner[13, 13] = True
    row = np.zeros((G, G), bool)
    row[13] = True
    col = np.zeros((G, G), bool)
    col[:, 0] = True
    diagonal = np.eye(G, dtype=bool)
    return {
        "single": one, "single_corner": corner, "empty": np.zeros((G, G), bool),
        "all": np.ones((G, G), bool), "sliver_row": row, "sliver_col": col, "diagonal": diagonal,
        "random": np.random.default_rng(7).random((G, G)) < 0.5, "sector": sector_grid(),
        "narrow_sector": sector_grid(30, 0.6),
    }


def real(row):
    """A padded index row without its PAD tail, checking that padding only ever follows the real entries."""
    n = int((row >= 0).sum())
    assert np.all(row[n:] == -1), "PAD (-1) only after the real indices"
    return row[:n]


def check_masks(valid, ctx, tgt, cfg=CFG):
    """The invariants every output must satisfy."""
    B = valid.shape[0]
    N = cfg.grid * cfg.grid
    assert ctx.dtype == np.int64 and tgt.dtype == np.int64
    assert ctx.shape[0] == B and tgt.shape[:2] == (cfg.n_targets, B)
    assert mask_lengths(ctx).min() >= cfg.min_keep and mask_lengths(tgt).min() >= 1  # min_keep; never empty
    assert mask_lengths(ctx).max() == ctx.shape[1] and mask_lengths(tgt).max() == tgt.shape[2]  # no idle width
    if cfg.lengths == "batch_min":
        assert (mask_lengths(ctx) == ctx.shape[1]).all() and (mask_lengths(tgt) == tgt.shape[2]).all()
    flat = valid.reshape(B, N)
    for i in range(B):
        c = real(ctx[i])
        assert np.all(np.diff(c) > 0) and c.min() >= 0 and c.max() < N  # sorted, unique, in range
        in_targets = set()
        for j in range(cfg.n_targets):
            t = real(tgt[j, i])
            assert np.all(np.diff(t) > 0) and t.min() >= 0 and t.max() < N
            in_targets |= set(t.tolist())
        assert not in_targets & set(c.tolist()), "context and targets overlap"
        if cfg.usrc and flat[i].sum() >= cfg.min_keep + cfg.n_targets:
            t_all = tgt[:, i].ravel()
            assert flat[i][c].all() and flat[i][t_all[t_all >= 0]].all(), "index outside the valid area"


@pytest.mark.parametrize("sampler", SAMPLERS, ids=["numba", "reference"])
@pytest.mark.parametrize("name", list(named_grids()))
def test_named_grids_never_empty_and_valid(sampler, name):
    grid = named_grids()[name]
    valid = np.stack([grid] * 3 + [np.ones((G, G), bool)])
    for seed in range(5 if sampler is sample_block_masks else 2):
        ctx, tgt = sampler(valid, CFG, seed)
        check_masks(valid, ctx, tgt)
        ctx1, tgt1 = sampler(valid[:1], CFG, seed)
        check_masks(valid[:1], ctx1, tgt1)


def test_usrc_indices_stay_inside_a_sector():
    valid = np.stack([sector_grid(a, d) for a in (40, 60, 90) for d in (0.6, 0.8, 1.0)])
    for seed in range(20):
        ctx, tgt = sample_block_masks(valid, CFG, seed)
        check_masks(valid, ctx, tgt)


def test_grids_below_min_keep_grow_by_nearest_patches():
    """Fewer than min_keep + T valid patches: the nearest invalid patches are added, nothing else."""
    one = np.zeros((1, G, G), bool)
    one[0, 6, 9] = True
    seen = set()
    for seed in range(30):
        ctx, tgt = sample_block_masks(one, CFG, seed)
        seen |= set(ctx[0].tolist()) | set(tgt[:, 0].ravel().tolist())
    seen.discard(-1)  # padding
    r, c = np.divmod(np.array(sorted(seen)), G)
    assert 6 * G + 9 in seen
    d = np.sort(np.hypot(r - 6, c - 9))
    # the 13 patches within distance 2 of (6, 9), then the first (raster order) of those at sqrt(5)
    assert len(seen) == CFG.min_keep + CFG.n_targets and d[12] == 2.0 and d[13] == np.sqrt(5)
    assert 4 * G + 8 in seen


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 6),
    density=st.floats(0.0, 1.0),
    grid_seed=st.integers(0, 2**32 - 1),
    seed=st.integers(0, 2**63 - 1),
    usrc=st.booleans(),
    tau=st.floats(0.05, 1.0),
    n_targets=st.integers(1, 6),
    lengths=st.sampled_from(["per_image", "batch_min"]),
    tgt_scale_of=st.sampled_from(["grid", "valid"]),
)
def test_random_grids_keep_the_invariants(B, density, grid_seed, seed, usrc, tau, n_targets, lengths, tgt_scale_of):
    cfg = MaskConfig(usrc=usrc, tau=tau, n_targets=n_targets, lengths=lengths, tgt_scale_of=tgt_scale_of)
    valid = np.random.default_rng(grid_seed).random((B, G, G)) < density
    ctx, tgt, blocks = sample_block_masks(valid, cfg, seed, return_blocks=True)
    check_masks(valid, ctx, tgt, cfg)
    assert blocks.shape == (B, 1 + n_targets, 4)
    top, left, h, w = blocks[..., 0], blocks[..., 1], blocks[..., 2], blocks[..., 3]
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= G).all() and (left + w <= G).all()
    # Targets lie inside their rectangles (the intersection with the valid set only removes patches).
    for i in range(B):
        for j in range(n_targets):
            r, c = np.divmod(real(tgt[j, i]), G)
            t, l, hh, ww = blocks[i, 1 + j]
            assert ((r >= t) & (r < t + hh) & (c >= l) & (c < l + ww)).all()


def reachable_sizes(scale, aspect):
    """Every (h, w) that some (scale, aspect) in the ranges produces: a dense sweep, independent of the
    sampler's uniforms."""
    s = np.linspace(scale[0], scale[1], 801)[:, None]
    a = np.linspace(aspect[0], aspect[1], 801)[None, :]
    area = s * G * G
    h = np.clip(np.floor(np.sqrt(area * a) + 0.5), 1, G).astype(int)
    w = np.clip(np.floor(np.sqrt(area / a) + 0.5), 1, G).astype(int)
    return set(zip(h.ravel().tolist(), w.ravel().tolist()))


@pytest.mark.parametrize("sampler", SAMPLERS, ids=["numba", "reference"])
def test_block_sizes_within_scale_and_aspect_bounds(sampler):
    tgt_ok = reachable_sizes(CFG.tgt_scale, CFG.tgt_aspect)
    ctx_ok = reachable_sizes(CFG.ctx_scale, CFG.ctx_aspect)
    # rounded areas stay within the scale bounds up to the rounding of each side
    assert min(h * w for h, w in tgt_ok) >= 12 and max(h * w for h, w in tgt_ok) <= 30
    assert ctx_ok == {(13, 13), (14, 14)}  # I-JEPA caps the side at 13: the full grid was unreachable
    valid = np.stack([sector_grid(), np.ones((G, G), bool)])
    seen_t, seen_c = set(), set()
    for seed in range(200 if sampler is sample_block_masks else 40):
        _, tgt, blocks = sampler(valid, CFG, seed, return_blocks=True)
        seen_c |= {tuple(b) for b in blocks[:, 0, 2:].tolist()}
        seen_t |= {tuple(b) for b in blocks[:, 1:, 2:].reshape(-1, 2).tolist()}
        assert (tgt.shape[2] <= blocks[:, 1:, 2] * blocks[:, 1:, 3]).all()
        if seed < 10:  # all-valid images keep whole targets: one size per batch, so nothing is cut
            _, tgt, blocks = sampler(valid[1:].repeat(3, 0), CFG, seed, return_blocks=True)
            assert tgt.shape[2] == blocks[0, 1, 2] * blocks[0, 1, 3]
    assert seen_t <= tgt_ok and seen_c <= ctx_ok
    if sampler is sample_block_masks:
        assert len(seen_t) >= 5 and seen_c == ctx_ok


def test_block_size_formula_endpoints():
    assert block_size(0.0, 0.0, (0.075, 0.125), (0.75, 1.5), G) == (3, 4)
    assert block_size(0.0, 0.0, (1.0, 1.0), (1.0, 1.0), G) == (14, 14)
    assert block_size(0.999, 0.999, (0.075, 0.125), (0.75, 1.5), G) == (6, 4)


def test_deterministic_for_a_seed_and_any_thread_count():
    # >= PARALLEL_MIN_BATCH images, so that the public function itself takes the prange kernel
    valid = np.stack([sector_grid(a, d) for a in (30, 60, 90) for d in (0.5, 1.0)] * 90)
    assert len(valid) >= block_masks.PARALLEL_MIN_BATCH
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = sample_block_masks(valid, CFG, 1234, return_blocks=True)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = sample_block_masks(valid, CFG, 1234, return_blocks=True)
        again = sample_block_masks(valid, CFG, 1234, return_blocks=True)
        args = block_masks._kernel_args(valid[:64], CFG, 77)
        serial = block_masks._sample_batch_serial(*args)
        parallel = block_masks._sample_batch_parallel(*args)
    finally:
        numba.set_num_threads(before)
    for a, b, c in zip(one, many, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)
    other = sample_block_masks(valid, CFG, 1235)
    assert not np.array_equal(other[1], one[1]) or not np.array_equal(other[0], one[0])
    # The reference is deterministic for a seed too.
    r1, r2 = (sample_block_masks_reference(valid[:4], CFG, 5) for _ in range(2))
    np.testing.assert_array_equal(r1[1], r2[1])


def test_image_masks_do_not_depend_on_the_rest_of_the_batch():
    """Image i's blocks come from the stream (seed, i) alone (the equalised lengths of course may change)."""
    valid = np.stack([sector_grid(a) for a in (30, 50, 70, 90)])
    _, _, blocks4 = sample_block_masks(valid, CFG, 9, return_blocks=True)
    _, _, blocks2 = sample_block_masks(valid[:2], CFG, 9, return_blocks=True)
    np.testing.assert_array_equal(blocks4[:2], blocks2)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=["numba", "reference"])
def test_very_different_scan_regions_keep_each_images_context(sampler):
    """Per-image lengths: a tiny scan region next to full frames and fans changes no other image's masks;
    each image gets exactly what it gets alone (its stream is (seed, i), so 'alone' = the same position)."""
    tiny = np.zeros((G, G), bool)
    tiny[13, :] = True  # 14 valid patches = min_keep + T: its context keeps just min_keep..13
    valid = np.stack([np.ones((G, G), bool), sector_grid(30, 0.6), sector_grid(90, 1.0), tiny])
    for seed in range(4 if sampler is sample_block_masks else 2):
        ctx, tgt = sampler(valid, CFG, seed)
        check_masks(valid, ctx, tgt)
        for i in range(len(valid)):
            others = valid.copy()
            others[np.arange(len(valid)) != i] = valid[i] if i != 3 else True  # the rest of the batch replaced
            ctx_i, tgt_i = sampler(others, CFG, seed)
            np.testing.assert_array_equal(real(ctx[i]), real(ctx_i[i]))
            for j in range(CFG.n_targets):
                np.testing.assert_array_equal(real(tgt[j, i]), real(tgt_i[j, i]))
        assert mask_lengths(ctx)[0] >= 13 * 13 - 4 * 25 and mask_lengths(ctx)[3] <= 13


def test_batch_min_lengths_let_one_tiny_image_set_the_batchs_context():
    """The old behaviour, kept as ``lengths="batch_min"`` for the ablation: Kc is the smallest context."""
    cfg = MaskConfig(lengths="batch_min")
    tiny = np.zeros((G, G), bool)
    tiny[13, :] = True
    valid = np.stack([np.ones((G, G), bool)] * 7 + [tiny])
    for seed in range(10):
        ctx, tgt = sample_block_masks(valid, cfg, seed)
        check_masks(valid, ctx, tgt, cfg)
        assert CFG.min_keep <= ctx.shape[1] <= 13
        alone, _ = sample_block_masks(valid[:7], cfg, seed)
        assert alone.shape[1] >= 13 * 13 - 4 * 30


def test_targets_scaled_to_the_valid_region():
    """tgt_scale_of="valid": a target covers tgt_scale x |V| patches (rounded), so a narrow fan gets small
    targets and keeps more context than with targets sized against the whole grid."""
    narrow = np.stack([sector_grid(30, 0.6)] * 8)
    n_valid = int(narrow[0].sum())
    for sampler in SAMPLERS:
        _, _, b_grid = sampler(narrow, MaskConfig(tgt_scale_of="grid"), 5, return_blocks=True)
        ctx, tgt, b_valid = sampler(narrow, MaskConfig(tgt_scale_of="valid"), 5, return_blocks=True)
        area = b_valid[0, 1, 2] * b_valid[0, 1, 3]
        assert 0.075 * n_valid * 0.5 <= area <= 0.125 * n_valid * 2 and area < b_grid[0, 1, 2] * b_grid[0, 1, 3]
    ctx_grid, _ = sample_block_masks(narrow, MaskConfig(tgt_scale_of="grid"), 5)
    assert mask_lengths(ctx).mean() > mask_lengths(ctx_grid).mean()


def test_usrc_off_ignores_the_grid():
    cfg = MaskConfig(usrc=False)
    empty = np.zeros((3, G, G), bool)
    full = np.ones((3, G, G), bool)
    for seed in range(5):
        for a, b in zip(sample_block_masks(empty, cfg, seed), sample_block_masks(full, cfg, seed)):
            np.testing.assert_array_equal(a, b)


def test_accepts_torch_and_integer_grids():
    torch = pytest.importorskip("torch")
    valid = np.stack([sector_grid()] * 2)
    ref = sample_block_masks(valid, CFG, 3)
    for other in (torch.from_numpy(valid), valid.astype(np.uint8), valid.astype(np.float32)):
        for a, b in zip(ref, sample_block_masks(other, CFG, 3)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad, match", [
    (np.ones((G, G), bool), "shape"), (np.ones((2, G, G + 1), bool), "shape"),
    (np.ones((0, G, G), bool), "at least one"), (np.full((1, G, G), "x"), "boolean"),
])
def test_bad_grids_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        sample_block_masks(bad, CFG, 0)


def test_bad_seeds_and_configs_are_clear_errors():
    valid = np.ones((1, G, G), bool)
    with pytest.raises(ValueError, match="seed"):
        sample_block_masks(valid, CFG, -1)
    with pytest.raises(TypeError, match="seed"):
        sample_block_masks(valid, CFG, 1.5)
    with pytest.raises(TypeError, match="MaskConfig"):
        sample_block_masks(valid, {"grid": 14}, 0)
    with pytest.raises(ValueError, match="tau"):
        MaskConfig(tau=10)
    with pytest.raises(ValueError, match="tgt_scale"):
        MaskConfig(tgt_scale=(0.2, 0.1))
    with pytest.raises(ValueError, match="min_keep"):
        MaskConfig(min_keep=0)
    with pytest.raises(ValueError, match="lengths"):
        MaskConfig(lengths="shortest")
    with pytest.raises(ValueError, match="tgt_scale_of"):
        MaskConfig(tgt_scale_of="frame")
    with pytest.raises(ValueError, match="cannot fit"):
        MaskConfig(grid=3, min_keep=8, n_targets=4)


def test_config_from_yaml_section():
    import yaml

    d = yaml.safe_load("grid: 14\nn_targets: 4\ntgt_scale: [0.075, 0.125]\ntau: 0.5\nusrc: false\n")
    cfg = MaskConfig.from_dict(d)
    assert cfg.tgt_scale == (0.075, 0.125) and cfg.usrc is False and cfg == MaskConfig(**d)
    assert MaskConfig.from_dict(None) == MaskConfig()
    with pytest.raises(ValueError, match=r"unknown MaskConfig keys \['taus'\]"):
        MaskConfig.from_dict({"taus": 0.5})
    with pytest.raises(TypeError):
        MaskConfig(**{"taus": 0.5})


def test_patch_validity_any_pixel_rule():
    m = np.zeros((224, 224), bool)
    m[16 * 3 + 15, 16 * 5] = True  # last pixel row of patch (3, 5)
    grid = patch_validity(m)
    assert grid.shape == (G, G) and grid.sum() == 1 and grid[3, 5]
    assert patch_validity(np.ones((2, 100, 150)), G).all()  # sides need not be multiples of 14
    with pytest.raises(ValueError):
        patch_validity(np.ones((10, 10)), G)
