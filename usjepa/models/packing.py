"""Sequence packing: every batch's real tokens, and nothing else, in one row per network.

Each image keeps its own mask lengths, so a padded batch ``[B, Kc]`` has a new shape almost every step (a
new cuDNN attention graph per shape on Hopper, a recompile under ``torch.compile``) and spends 18-30 % of
the student's and predictor's FLOPs on padding. Packed, the tokens of all sequences sit back to back in one
row ``[L, D]``: the linear layers, norms and MLPs (97 % of the FLOPs) see only real tokens, and attention
keeps each sequence to itself:

* CUDA: FlexAttention with a document ("sequence-id") block mask — one fused kernel over the packed row
  that skips every 128 x 128 block holding no pair of the same sequence, no padding, no per-batch shape;
* CPU (FlexAttention has no CPU backward): the row is gathered into ``[n_seq, Lmax]`` for the attention
  alone (SDPA with a key-padding mask) and scattered back; a few % of the FLOPs, padded.

``L`` is rounded up to ``PACK_MULTIPLE`` tokens (FlexAttention's block; the tail is a sequence of its own
that nothing reads), so a run sees a handful of distinct lengths, and they are marked dynamic for
``torch.compile``: one graph, no recompile per batch. The plan is built on the host from the lengths the
loader counted on the host (``Batch.lengths``): no device-to-host sync.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PACK_MULTIPLE = 128  # FlexAttention's block size; packed lengths are multiples of it
PAD_MULTIPLE = 16  # the CPU path's per-sequence width is rounded up to this (few distinct shapes)


def round_up(n: int, m: int) -> int:
    return -(-int(n) // m) * m


@dataclass
class PackedAttention:
    """How one packed row ``[L, ...]`` splits into sequences, in the form its attention kernel takes."""

    block_mask: object | None = None  # FlexAttention BlockMask (CUDA)
    pad_index: torch.Tensor | None = None  # int64 [n_seq, Lmax]: packed slot of each (sequence, position)
    pad_valid: torch.Tensor | None = None  # bool [n_seq, 1, 1, Lmax]: a real position
    unpad_index: torch.Tensor | None = None  # int64 [L]: seq * Lmax + position of each packed slot


def attention_layout(lengths: np.ndarray, total: int, device: torch.device, flex: bool) -> PackedAttention:
    """Sequences of ``lengths`` (host ints, > 0) packed back to back in a row of ``total`` slots."""
    lengths = np.asarray(lengths, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    used = int(offsets[-1])
    if flex:
        return PackedAttention(block_mask=document_block_mask(lengths, total, device))
    width = round_up(lengths.max(), PAD_MULTIPLE)
    pos = np.arange(width)
    valid = pos[None, :] < lengths[:, None]
    pad_index = np.where(valid, offsets[:-1, None] + pos[None, :], 0)
    seq = np.repeat(np.arange(len(lengths)), lengths)
    unpad = np.zeros(total, np.int64)
    unpad[:used] = seq * width + (np.arange(used) - offsets[:-1][seq])
    pad_index, unpad, valid = _to_device([pad_index, unpad, valid], device)
    valid = valid[:, None, None, :]
    mark_packed_dynamic((pad_index, 1), (valid, 3), (unpad, 0))
    return PackedAttention(pad_index=pad_index, pad_valid=valid, unpad_index=unpad)


def document_block_mask(lengths: np.ndarray, total: int, device: torch.device):
    """FlexAttention's mask for sequences packed back to back (the tail ``total - sum`` is one more
    sequence). Built from block tables on the host, O((L/128)^2), rather than by evaluating the mask at every
    token pair (``create_block_mask``), which at the predictor's ~70 000 tokens would cost seconds."""
    from torch.nn.attention.flex_attention import BlockMask

    bs = PACK_MULTIPLE
    assert total % bs == 0
    lengths = np.concatenate([lengths, [total - int(np.sum(lengths))]]) if np.sum(lengths) < total else lengths
    ends = np.cumsum(lengths)
    starts = ends - lengths
    doc = np.repeat(np.arange(len(lengths)), lengths)
    nb = total // bs
    first, last = doc[np.arange(nb) * bs], doc[np.arange(nb) * bs + bs - 1]
    lo, hi = starts[first] // bs, (ends[last] - 1) // bs  # kv blocks a q block can see: its sequences' span
    num = (hi - lo + 1).astype(np.int32)
    idx = lo[:, None] + np.arange(nb)[None, :]
    idx = np.where(np.arange(nb)[None, :] < num[:, None], idx, 0).astype(np.int32)
    doc_t, num_t, idx_t = _to_device([doc, num, idx], device)

    def same_sequence(b, h, q_idx, kv_idx):
        return doc_t[q_idx] == doc_t[kv_idx]

    # a document mask is symmetric (block i meets block j iff j meets i), so the q-side tables the backward
    # reads are the kv-side ones: no transpose (from_kv_blocks' costs ~0.4 s on a CPU at the predictor's size)
    num_t, idx_t = num_t[None, None], idx_t[None, None]
    return BlockMask(seq_lengths=(total, total), kv_num_blocks=num_t, kv_indices=idx_t, full_kv_num_blocks=None,
                     full_kv_indices=None, q_num_blocks=num_t, q_indices=idx_t, full_q_num_blocks=None,
                     full_q_indices=None, BLOCK_SIZE=(bs, bs), mask_mod=same_sequence)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedAttention) -> torch.Tensor:
    """``q, k, v [L, H, d]`` of one packed row -> ``[L, H, d]``; no token attends outside its sequence."""
    if layout.block_mask is not None:
        o = _flex_attention(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), block_mask=layout.block_mask)
        return o[0].transpose(0, 1)
    n, width = layout.pad_index.shape
    heads, d = q.shape[1:]
    padded = [t[layout.pad_index].transpose(1, 2) for t in (q, k, v)]  # [n, H, Lmax, d]
    o = F.scaled_dot_product_attention(*padded, attn_mask=layout.pad_valid)
    return o.transpose(1, 2).reshape(n * width, heads, d)[layout.unpad_index]


def _flex_attention(q, k, v, block_mask):
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():  # inside the compiled step: fused into its graph
        return flex_attention(q, k, v, block_mask=block_mask)
    return _compiled_flex()(q, k, v, block_mask=block_mask)  # eager step: flex's eager form is a dense reference


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _to_device(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Host arrays -> device tensors in one pinned, non-blocking copy per dtype group (no host wait)."""
    out = []
    for a in arrays:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if device.type == "cuda":
            t = t.pin_memory().to(device, non_blocking=True)
        out.append(t)
    return out


def mark_packed_dynamic(*tensor_dims: tuple[torch.Tensor, int]) -> None:
    """The packed lengths change between batches (multiples of PACK_MULTIPLE, of PAD_MULTIPLE): compile them
    symbolic from the first step, so that torch.compile builds one graph instead of one per length."""
    for t, dim in tensor_dims:
        torch._dynamo.maybe_mark_dynamic(t, dim)
