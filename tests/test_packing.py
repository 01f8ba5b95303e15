"""The packed SALT step (usjepa.models.packing): the same loss and gradients as the padded step, a handful of
compiled shapes over many batches, no recompile after warm-up and no graph break in the step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from usjepa.models import Predictor, PredictorConfig, SALTModel, build_vit, freeze
from usjepa.models.packing import PACK_MULTIPLE, attention_layout, packed_attention
from usjepa.models.salt import plan_salt_packing, salt_forward
from usjepa.step import compile_teacher

TINY = "vit_test_tiny"
N = 196


def random_masks(rng: np.random.Generator, B: int, T: int = 4):
    """Per-image masks of random lengths (context 20-90 patches, targets 3-30 per block), real indices first
    and -1 after, as the mask kernel writes them; plus the host lengths the loader counts."""
    ctx_len = rng.integers(20, 90, B)
    tgt_len = rng.integers(3, 30, (T, B))
    ctx_idx = torch.full((B, int(ctx_len.max())), -1)
    tgt_idx = torch.full((T, B, int(tgt_len.max())), -1)
    for i in range(B):
        perm = torch.from_numpy(rng.permutation(N))
        ctx_idx[i, : ctx_len[i]] = perm[: ctx_len[i]].sort().values
        for t in range(T):
            tgt_idx[t, i, : tgt_len[t, i]] = perm[ctx_len[i] : ctx_len[i] + tgt_len[t, i]].sort().values
    return ctx_idx, tgt_idx, ctx_len, tgt_len


def tiny_salt(seed: int = 0):
    torch.manual_seed(seed)
    teacher = freeze(build_vit(TINY))
    student = build_vit(TINY)
    return SALTModel(student, Predictor(PredictorConfig(48, 2, 2), 64, 64, N)), teacher


def loss_and_grads(model, teacher, x, ctx_idx, tgt_idx, packing, target_norm="none"):
    model.zero_grad(set_to_none=True)
    loss, stds = salt_forward(model, teacher, x, ctx_idx, tgt_idx, target_norm, packing=packing)
    loss.backward()
    return loss.detach(), stds, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("target_norm", ["none", "layernorm"])
def test_packed_step_equals_padded_step(target_norm):
    """Loss, collapse statistics and every parameter's gradient: packed == padded within 1e-5 (float32;
    the two sum the same terms in another order)."""
    model, teacher = tiny_salt()
    rng = np.random.default_rng(1)
    x = torch.randn(5, 1, 224, 224)
    ctx_idx, tgt_idx, ctx_len, tgt_len = random_masks(rng, 5)
    ref = loss_and_grads(model, teacher, x, ctx_idx, tgt_idx, None, target_norm)
    packing = plan_salt_packing(ctx_idx, tgt_idx, ctx_len, tgt_len, N)
    got = loss_and_grads(model, teacher, x, ctx_idx, tgt_idx, packing, target_norm)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
    assert ref[2].keys() == got[2].keys()
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], atol=1e-5, rtol=1e-4, msg=name)
    # every real token is packed once, nothing else but the tail
    assert packing.tokens["student"][0] == 5 + ctx_len.sum() and packing.tokens["targets"][0] == tgt_len.sum()
    assert all(n % PACK_MULTIPLE == 0 and 0 <= n - r < PACK_MULTIPLE for r, n in packing.tokens.values())


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # the reference form, on purpose
def test_flex_document_mask_equals_per_sequence_attention():
    """The CUDA path's FlexAttention block mask (forward; flex has no CPU backward) keeps every sequence to
    itself, exactly as attention over each sequence alone."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 170, 6)
    total = -(-int(lengths.sum()) // PACK_MULTIPLE) * PACK_MULTIPLE
    q, k, v = torch.randn(3, total, 2, 16).unbind(0)
    off = np.concatenate([[0], np.cumsum(lengths)])
    ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        *(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1) for a, b in zip(off[:-1], off[1:])])
    for flex in (True, False):
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401  (importable here)

        layout = attention_layout(lengths, total, torch.device("cpu"), flex=flex)
        if flex:  # eager flex (the dense reference form) here; the compiled kernel on CUDA
            from torch.nn.attention.flex_attention import flex_attention as fa

            out = fa(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=layout.block_mask)[0].transpose(0, 1)
        else:
            out = packed_attention(q, k, v, layout)
        torch.testing.assert_close(out[: off[-1]], ref, atol=1e-5, rtol=1e-5)


def test_compiled_packed_step_has_few_shapes_no_recompiles_no_graph_breaks():
    """100 batches of random lengths through the compiled packed step (dynamo with its eager backend: the
    tracing and guards of a GPU run without inductor's C++ build): at most 2 graphs, none after the warm-up,
    no graph break; the padded step's batch shapes, for contrast, change almost every batch."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, teacher = tiny_salt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    net = torch.compile(model, backend="eager")
    tnet = compile_teacher(teacher, backend="eager")
    rng = np.random.default_rng(2)
    x = torch.randn(4, 1, 224, 224)
    padded_shapes, packed_shapes, graphs_after_warmup = set(), set(), None
    for step in range(100):
        ctx_idx, tgt_idx, ctx_len, tgt_len = random_masks(rng, 4)
        packing = plan_salt_packing(ctx_idx, tgt_idx, ctx_len, tgt_len, N)
        padded_shapes.add((ctx_idx.shape[1], tgt_idx.shape[2]))
        for row, (_, n) in packing.tokens.items():
            packed_shapes.add((row, n))
        loss, _ = salt_forward(net, tnet, x, ctx_idx, tgt_idx, packing=packing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 9:
            graphs_after_warmup = counters["stats"]["unique_graphs"]
    assert len(padded_shapes) > 50  # what the padded step would have compiled
    for row in ("student", "predictor", "targets"):  # multiples of 128 tokens: a few per row
        assert len([n for r, n in packed_shapes if r == row]) <= 8, sorted(packed_shapes)
    assert 2 <= counters["stats"]["unique_graphs"] <= 4  # student + predictor, teacher; maybe one dynamic recompile
    assert counters["stats"]["unique_graphs"] == graphs_after_warmup, "recompiled after warm-up"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert sum(counters["recompiles"].values()) <= 1 if "recompiles" in counters else True
