"""Multi-block JEPA masks with ultrasound-region conditioning (USrc), as a Numba kernel.

``sample_block_masks(valid, cfg, seed) -> (ctx_idx int64[B, Kc], tgt_idx int64[T, B, Kt])``: raster indices
``row * G + col`` into the patch sequence (no CLS), sorted ascending; each row holds its image's whole mask
and ends in ``PAD`` (-1) slots up to the batch's longest (Kc, Kt = the longest masks).
The algorithm (docs/kernels.md has the full description, its fallbacks and measured speed):

1. One target size and one context size per batch (I-JEPA), from scale x G² and aspect; sides up to G.
   With ``tgt_scale_of="valid"`` the batch draws one target scale and aspect, and each image sizes its
   targets as scale x |V| (step 2's V).
2. Per image, V = the valid patches (all patches when ``cfg.usrc`` is False), grown by the nearest
   invalid patches when it holds fewer than min_keep + T (fallback 1).
3. Each target block: top-left uniform over *all* positions (last row/column included) whose block has
   |B ∩ V| >= tau' (Eq. 3), by rejection, then from the enumerated list (the same distribution);
   M_i = B ∩ V. When no position reaches tau', the positions covering the most of V (fallback 2).
4. Context block: uniform over positions with |B_c ∩ V| >= tau' (Eq. 4) that leave >= min_keep patches
   once the targets are removed; M_c = (B_c ∩ V) minus all targets. Up to max_tries whole-image attempts,
   then fallback 3 (best block, then free valid patches, then patches handed back from targets).
5. Lengths: every mask whole, padded with PAD (``lengths="per_image"``); or, with ``"batch_min"``, every
   mask cut to the smallest one of the batch by a uniformly random subset.

Every draw of image i comes from a counter-based stream seeded by (seed, i), so the result depends on
the seed only, never on the number of threads. `sample_block_masks_reference` is the plain-Python twin.

Representation: each mask is G row words (bit c of word r = patch (r, c)), so a block count is h
popcounts and set operations are word operations; this is what makes a batch of 128 cost well under
a millisecond on one core.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .block_masks_reference import sample_block_masks_reference
from .mask_config import PAD, MaskConfig, block_hw, block_size, check_inputs, scale_aspect

__all__ = ["MaskConfig", "PAD", "mask_lengths", "sample_block_masks", "sample_block_masks_reference", "MAX_GRID",
           "PARALLEL_MIN_BATCH"]

MAX_GRID = 63  # row words are uint64 and a block's column mask is (1 << w) - 1
# Batches at least this large run the prange kernel when Numba has more than one thread. Below it the
# serial kernel is used: a batch of 128 costs ~0.2 ms on one core, while waking worker threads on a
# machine whose cores are busy decoding images (the data loader's case) measured 0.1-2 ms on its own.
PARALLEL_MIN_BATCH = 512
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64 increment
_BATCH_STREAM = 0xD1B54A32D192ED03  # keeps the batch stream apart from the per-image streams
_U_GOLDEN = np.uint64(_GOLDEN)
_U_M1 = np.uint64(0xBF58476D1CE4E5B9)
_U_M2 = np.uint64(0x94D049BB133111EB)
_U0, _U1 = np.uint64(0), np.uint64(1)
_U30, _U27, _U31, _U32 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(32)
_LOW32, _SPARE = np.uint64(0xFFFFFFFF), np.uint64(1 << 32)  # the spare half, and its "present" flag


# ---------------------------------------------------------------- splitmix64, in Python and in Numba


def _mix_py(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _batch_uniforms(seed: int, n: int) -> list[float]:
    state = _mix_py(seed) ^ _BATCH_STREAM
    out = []
    for _ in range(n):
        state = (state + _GOLDEN) & _MASK64
        out.append((_mix_py(state) >> 11) * 2.0**-53)
    return out


@njit(cache=True, error_model="numpy")
def _mix(z):
    z = (z ^ (z >> _U30)) * _U_M1
    z = (z ^ (z >> _U27)) * _U_M2
    return z ^ (z >> _U31)


@njit(cache=True, error_model="numpy")
def _randint(st, n):
    """Uniform integer in [0, n) from the stream st = [splitmix64 state, spare half]: each 64-bit output
    serves two draws of 32 bits, scaled by n (multiply-shift, no division; bias below n / 2**32)."""
    if st[1] != _U0:
        x = st[1] & _LOW32
        st[1] = _U0
    else:
        st[0] += _U_GOLDEN
        z = _mix(st[0])
        x = z >> _U32
        st[1] = (z & _LOW32) | _SPARE
    return np.int64((x * np.uint64(n)) >> _U32)


# ---------------------------------------------------------------- bit helpers (LLVM ctpop / cttz)


@intrinsic
def _popcount(typingctx, x):
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


@intrinsic
def _lowest_bit(typingctx, x):
    """Index of the lowest set bit (x != 0)."""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return types.uint64(types.uint64), codegen


@njit(cache=True, error_model="numpy")
def _cols(l, w):
    return ((_U1 << np.uint64(w)) - _U1) << np.uint64(l)


@njit(cache=True, error_model="numpy")
def _count(rows, t, l, h, w):
    """Set patches of the row words `rows` inside the block (t, l, h, w)."""
    m = _cols(l, w)
    s = 0
    for r in range(t, t + h):
        s += np.int64(_popcount(rows[r] & m))
    return s


@njit(cache=True, error_model="numpy")
def _has_bit(rows, G, p):
    return (rows[p // G] >> np.uint64(p % G)) & _U1


_block_hw = njit(cache=True, error_model="numpy")(block_hw)


# ---------------------------------------------------------------- block placement


@njit(cache=True, error_model="numpy")
def _place(A, F, G, h, w, thr, min_free, max_tries, st):
    """Top-left corner uniform over every position (last row/column included) with count(A) >= thr and
    count(F) >= min_free: rejection first, then exact enumeration (same distribution; straight away when
    there are no more positions than tries, e.g. the 2 x 2 of a 13 x 13 context). (-1, -1) if none."""
    nt, nl = G - h + 1, G - w + 1
    for _ in range(max_tries if nt * nl > max_tries else 0):
        t = _randint(st, nt)
        l = _randint(st, nl)
        if _count(A, t, l, h, w) >= thr and _count(F, t, l, h, w) >= min_free:
            return t, l
    n_ok = 0
    for t in range(nt):
        for l in range(nl):
            if _count(A, t, l, h, w) >= thr and _count(F, t, l, h, w) >= min_free:
                n_ok += 1
    if n_ok == 0:
        return -1, -1
    k = _randint(st, n_ok)
    for t in range(nt):
        for l in range(nl):
            if _count(A, t, l, h, w) >= thr and _count(F, t, l, h, w) >= min_free:
                if k == 0:
                    return t, l
                k -= 1
    return -1, -1  # unreachable


@njit(cache=True, error_model="numpy")
def _place_best(A, G, h, w, st):
    """Fallback 2: uniform over the positions whose block covers the most of A."""
    best, n_best = -1, 0
    for t in range(G - h + 1):
        for l in range(G - w + 1):
            c = _count(A, t, l, h, w)
            if c > best:
                best, n_best = c, 1
            elif c == best:
                n_best += 1
    k = _randint(st, n_best)
    for t in range(G - h + 1):
        for l in range(G - w + 1):
            if _count(A, t, l, h, w) == best:
                if k == 0:
                    return t, l
                k -= 1
    return 0, 0  # unreachable


@njit(cache=True, error_model="numpy")
def _target_candidates(V, G, h, w, thr, cand):
    """All positions (t * G + l) whose block holds >= thr valid patches or, when there is none, those
    holding the most (fallback 2). Built once per image, when rejection first fails, then reused."""
    n = 0
    best = 0
    for t in range(G - h + 1):
        for l in range(G - w + 1):
            c = _count(V, t, l, h, w)
            best = max(best, c)
            if c >= thr:
                cand[n] = t * G + l
                n += 1
    if n == 0:
        for t in range(G - h + 1):
            for l in range(G - w + 1):
                if _count(V, t, l, h, w) == best:
                    cand[n] = t * G + l
                    n += 1
    return n


# ---------------------------------------------------------------- fallbacks 1 and 3


@njit(cache=True, error_model="numpy")
def _grow_valid(V, G, n_min):
    """Fallback 1: add the invalid patches nearest to the valid ones (squared distance between patch
    centres; to the grid centre when none is valid; ties in raster order) until n_min are valid."""
    N = G * G
    nv = 0
    for r in range(G):
        nv += np.int64(_popcount(V[r]))
    if nv >= n_min:
        return nv
    big = np.int64(1) << 40
    dist = np.full(N, big, np.int64)
    for p in range(N):
        if _has_bit(V, G, p):
            continue
        r, c = p // G, p % G
        if nv == 0:
            dist[p] = (2 * r - (G - 1)) ** 2 + (2 * c - (G - 1)) ** 2
        else:
            for q in range(N):
                if _has_bit(V, G, q):
                    d = (2 * r - 2 * (q // G)) ** 2 + (2 * c - 2 * (q % G)) ** 2
                    if d < dist[p]:
                        dist[p] = d
    for _ in range(n_min - nv):
        best = -1
        for p in range(N):
            if not _has_bit(V, G, p) and (best < 0 or dist[p] < dist[best]):
                best = p
        V[best // G] |= _U1 << np.uint64(best % G)
    return n_min


@njit(cache=True, error_model="numpy")
def _shuffle(buf, n, st):
    for j in range(n - 1):
        r = j + _randint(st, n - j)
        buf[j], buf[r] = buf[r], buf[j]


@njit(cache=True, error_model="numpy")
def _hand_back(V, F, masks, counts, G, T, min_keep, nc, st, buf):
    """Fallback 3: free valid patches outside the context block first, then patches taken back from the
    targets, in random order, never emptying a target, until the context has min_keep patches.
    |V| >= min_keep + T guarantees success. Returns the new context size."""
    mc = masks[0]
    n_out = 0
    for p in range(G * G):
        if _has_bit(F, G, p) and not _has_bit(mc, G, p):
            buf[n_out] = p
            n_out += 1
    _shuffle(buf, n_out, st)
    n_claimed = 0
    for p in range(G * G):
        if _has_bit(V, G, p) and not _has_bit(F, G, p):
            buf[n_out + n_claimed] = p
            n_claimed += 1
    _shuffle(buf[n_out:], n_claimed, st)
    for k in range(n_out + n_claimed):
        if nc >= min_keep:
            break
        p = buf[k]
        r, bit = p // G, _U1 << np.uint64(p % G)
        keep_out = False
        for j in range(1, T + 1):
            if masks[j, r] & bit and counts[j] == 1:
                keep_out = True
        if keep_out:
            continue
        for j in range(1, T + 1):
            if masks[j, r] & bit:
                masks[j, r] &= ~bit
                counts[j] -= 1
        mc[r] |= bit
        nc += 1
    return nc


# ---------------------------------------------------------------- one image, then the batch


@njit(cache=True, error_model="numpy")
def _sample_one(V, G, T, th, tw, t_scale, t_aspect, ch, cw, tau, min_keep, max_tries, st, F, masks, counts, blocks,
                buf, cand):
    """Masks of one image as row words: masks[0] the context, masks[1:] the targets; their sizes into
    counts and the raw rectangles (top, left, h, w) into blocks. V is the image's valid row words, grown
    in place. After fallback 3 the context may reach outside its block (pass 2 walks every row).
    t_scale > 0 sizes the targets as t_scale x |V| (tgt_scale_of="valid") instead of the batch's th x tw."""
    nv = _grow_valid(V, G, min_keep + T)
    if t_scale > 0.0:
        th, tw = _block_hw(t_scale * nv, t_aspect, G)
    tau_t = max(1, int(math.ceil(tau * min(th * tw, nv) - 1e-9)))
    tau_c = max(1, int(math.ceil(tau * min(ch * cw, nv) - 1e-9)))
    n_cand = -1  # target positions: rejection until it first fails, then the enumerated list
    tcols = _cols(0, tw)

    ct, cl = -1, -1
    for _attempt in range(max_tries):
        # Targets (Eq. 3): |B_i ∩ V| >= tau', M_i = B_i ∩ V; F = V minus all targets.
        F[:] = V
        for j in range(1, T + 1):
            t, l = -1, -1
            if n_cand < 0:
                for _ in range(max_tries):
                    tt, ll = _randint(st, G - th + 1), _randint(st, G - tw + 1)
                    if _count(V, tt, ll, th, tw) >= tau_t:
                        t, l = tt, ll
                        break
                if t < 0:
                    n_cand = _target_candidates(V, G, th, tw, tau_t, cand)
            if t < 0:
                q = cand[_randint(st, n_cand)]
                t, l = q // G, q % G
            blocks[j, 0], blocks[j, 1], blocks[j, 2], blocks[j, 3] = t, l, th, tw
            m = tcols << np.uint64(l)
            mj = masks[j]
            mj[:] = 0
            n = 0
            for r in range(t, t + th):
                mj[r] = V[r] & m
                F[r] &= ~m
                n += np.int64(_popcount(mj[r]))
            counts[j] = n
        # Context (Eq. 4): |B_c ∩ V| >= tau' and >= min_keep patches once the targets are removed.
        ct, cl = _place(V, F, G, ch, cw, tau_c, min_keep, max_tries, st)
        if ct >= 0:
            break

    fallback = ct < 0
    if fallback:  # fallback 3: the best context block of the last attempt, filled up below
        ct, cl = _place_best(F, G, ch, cw, st)
    blocks[0, 0], blocks[0, 1], blocks[0, 2], blocks[0, 3] = ct, cl, ch, cw
    m = _cols(cl, cw)
    mc = masks[0]
    mc[:] = 0
    nc = 0
    for r in range(ct, ct + ch):
        mc[r] = F[r] & m
        nc += np.int64(_popcount(mc[r]))
    if fallback and nc < min_keep:
        nc = _hand_back(V, F, masks, counts, G, T, min_keep, nc, st, buf)
    counts[0] = nc


@njit(cache=True, error_model="numpy")
def _subsample_sorted(rows, G, n, k, st, flag, out):
    """Write a uniformly random k-subset of the n set patches of the row words into out, ascending:
    Floyd's algorithm draws min(k, n - k) distinct ranks into flag (uint8 scratch, length >= n), then
    one pass over the set bits in raster order emits the kept ones, stopping at the k-th."""
    keep_all = k >= n
    keep_marked = True
    if not keep_all:
        keep_marked = k <= n - k
        d = k if keep_marked else n - k
        flag[:n] = 0
        for j in range(n - d, n):
            r = _randint(st, j + 1)
            if flag[r]:
                flag[j] = 1
            else:
                flag[r] = 1
    rank, m = 0, 0
    for r in range(G):
        word = rows[r]
        while word:
            c = _lowest_bit(word)
            word &= word - _U1
            out[m] = r * G + np.int64(c)
            if keep_all:
                m += 1
            elif keep_marked:
                m += np.int64(flag[rank])
            else:
                m += 1 - np.int64(flag[rank])
            rank += 1
            if m == k:
                return


@njit(cache=True, error_model="numpy")
def _workspace(B, G, T):
    N = G * G
    return (np.empty((B, G), np.uint64), np.empty((B, G), np.uint64), np.empty((B, T + 1, G), np.uint64),
            np.empty((B, T + 1), np.int64), np.empty((B, T + 1, 4), np.int64), np.empty((B, N), np.int64),
            np.empty((B, N), np.int64), np.empty((B, N), np.uint8), np.zeros((B, 2), np.uint64))


@njit(cache=True, error_model="numpy")
def _masks_of_image(i, packed, G, T, th, tw, t_scale, t_aspect, ch, cw, tau, min_keep, max_tries, usrc, seed, V, F,
                    masks, counts, blocks, buf, cand, states):
    """Pass 1 for image i: unpack its valid rows and draw its blocks."""
    # Counter-based seeding: image i's stream depends on (seed, i) only, not on the thread running it.
    states[i, 0] = _mix(_mix(np.uint64(seed)) + np.uint64(i + 1) * _U_GOLDEN)
    for r in range(G):
        word = _U0
        if usrc:
            for b in range(packed.shape[2]):
                word |= np.uint64(packed[i, r, b]) << np.uint64(8 * b)
        else:
            word = _cols(0, G)
        V[i, r] = word
    _sample_one(V[i], G, T, th, tw, t_scale, t_aspect, ch, cw, tau, min_keep, max_tries, states[i], F[i], masks[i],
                counts[i], blocks[i], buf[i], cand[i])


@njit(cache=True, error_model="numpy")
def _mask_lengths(counts, batch_min):
    """Kept lengths [B, 1 + T] and the padded widths (Kc, Kt). Per image: every mask whole, the widths
    the longest context and target. batch_min: all cut to the smallest context / target of the batch."""
    B, T1 = counts.shape
    k_ctx, k_tgt = counts[0, 0], counts[0, 1]
    for i in range(B):
        k_ctx = min(k_ctx, counts[i, 0]) if batch_min else max(k_ctx, counts[i, 0])
        for j in range(1, T1):
            k_tgt = min(k_tgt, counts[i, j]) if batch_min else max(k_tgt, counts[i, j])
    lens = counts.copy()
    if batch_min:
        lens[:, 0] = k_ctx
        lens[:, 1:] = k_tgt
    return lens, k_ctx, k_tgt


@njit(cache=True, error_model="numpy")
def _cut_image(i, G, T, masks, counts, lens, states, flags, ctx_idx, tgt_idx):
    """Pass 2 for image i: each of its masks (a random subset of lens[i, j] patches when that is shorter),
    into rows already filled with PAD."""
    _subsample_sorted(masks[i, 0], G, counts[i, 0], lens[i, 0], states[i], flags[i], ctx_idx[i])
    for j in range(1, T + 1):
        _subsample_sorted(masks[i, j], G, counts[i, j], lens[i, j], states[i], flags[i], tgt_idx[j - 1, i])


@njit(cache=True, parallel=True, error_model="numpy")
def _sample_batch_parallel(packed, G, T, th, tw, t_scale, t_aspect, ch, cw, tau, min_keep, max_tries, usrc,
                          batch_min, seed):
    """packed: uint8 [B, G, ceil(G / 8)], the valid grid bit-packed along the row (little bit order)."""
    B = packed.shape[0]
    V, F, masks, counts, blocks, buf, cand, flags, states = _workspace(B, G, T)
    for i in prange(B):
        _masks_of_image(i, packed, G, T, th, tw, t_scale, t_aspect, ch, cw, tau, min_keep, max_tries, usrc, seed,
                        V, F, masks, counts, blocks, buf, cand, states)
    lens, k_ctx, k_tgt = _mask_lengths(counts, batch_min)
    ctx_idx = np.full((B, k_ctx), -1, np.int64)
    tgt_idx = np.full((T, B, k_tgt), -1, np.int64)
    for i in prange(B):
        _cut_image(i, G, T, masks, counts, lens, states, flags, ctx_idx, tgt_idx)
    return ctx_idx, tgt_idx, blocks


@njit(cache=True, error_model="numpy")
def _sample_batch_serial(packed, G, T, th, tw, t_scale, t_aspect, ch, cw, tau, min_keep, max_tries, usrc,
                          batch_min, seed):
    """The same as _sample_batch_parallel on the calling thread (identical results)."""
    B = packed.shape[0]
    V, F, masks, counts, blocks, buf, cand, flags, states = _workspace(B, G, T)
    for i in range(B):
        _masks_of_image(i, packed, G, T, th, tw, t_scale, t_aspect, ch, cw, tau, min_keep, max_tries, usrc, seed,
                        V, F, masks, counts, blocks, buf, cand, states)
    lens, k_ctx, k_tgt = _mask_lengths(counts, batch_min)
    ctx_idx = np.full((B, k_ctx), -1, np.int64)
    tgt_idx = np.full((T, B, k_tgt), -1, np.int64)
    for i in range(B):
        _cut_image(i, G, T, masks, counts, lens, states, flags, ctx_idx, tgt_idx)
    return ctx_idx, tgt_idx, blocks


def sample_block_masks(valid, cfg: MaskConfig, seed: int, *, return_blocks: bool = False):
    """Context and target patch indices for a batch of validity grids.

    valid: bool [B, G, G] (numpy, or a torch tensor), True = the patch holds ultrasound signal (any valid
        pixel). Ignored, apart from B, when ``cfg.usrc`` is False.
    seed: int in [0, 2**63); the same (valid, cfg, seed) gives the same masks on any number of threads.
    Returns ``ctx_idx`` int64 [B, Kc] and ``tgt_idx`` int64 [T, B, Kt]: each row its mask's indices sorted
    ascending, then PAD (-1) up to the widest mask of the batch (``mask_lengths`` counts them); with
    ``return_blocks=True`` also ``blocks`` int64 [B, 1 + T, 4]: the raw (top, left, height, width) of the
    context block (row 0) and the target blocks, before the intersection with the valid patches.
    """
    args = _kernel_args(valid, cfg, seed)
    parallel = len(args[0]) >= PARALLEL_MIN_BATCH and numba.get_num_threads() > 1
    kernel = _sample_batch_parallel if parallel else _sample_batch_serial
    ctx_idx, tgt_idx, blocks = kernel(*args)
    return (ctx_idx, tgt_idx, blocks) if return_blocks else (ctx_idx, tgt_idx)


def _kernel_args(valid, cfg: MaskConfig, seed: int) -> tuple:
    """Checked inputs, the batch's block sizes and the bit-packed grid, as the kernels take them."""
    valid, seed = check_inputs(valid, cfg, seed)
    G = cfg.grid
    if G > MAX_GRID:
        raise ValueError(f"the Numba kernel supports grids up to {MAX_GRID} patches per side, got {G}")
    u = _batch_uniforms(seed, 4)
    th, tw = block_size(u[0], u[1], cfg.tgt_scale, cfg.tgt_aspect, G)
    t_scale, t_aspect = scale_aspect(u[0], u[1], cfg.tgt_scale, cfg.tgt_aspect)
    if cfg.tgt_scale_of == "grid":
        t_scale = 0.0  # the kernel's flag for "one target size per batch"
    ch, cw = block_size(u[2], u[3], cfg.ctx_scale, cfg.ctx_aspect, G)
    packed = np.packbits(valid, axis=-1, bitorder="little")
    return (packed, G, cfg.n_targets, th, tw, t_scale, t_aspect, ch, cw, cfg.tau, cfg.min_keep, cfg.max_tries,
            cfg.usrc, cfg.lengths == "batch_min", seed)


def mask_lengths(idx):
    """Real (non-PAD) entries per row of a padded index array or tensor: ``[B, K] -> [B]``, ``[T, B, K] -> [T, B]``."""
    return (idx >= 0).sum(-1)
