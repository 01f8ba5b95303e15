"""Our ViT keeps timm's keys and maths; encoders load from URFM / timm / our formats; predictor and losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from usjepa.models import (
    CheckpointFormatError,
    DecoderConfig,
    MAEDecoder,
    MAEModel,
    Predictor,
    PredictorConfig,
    SALTModel,
    build_vit,
    export_encoder_safetensors,
    freeze,
    load_encoder,
    mae_loss,
    patchify,
    random_keep_indices,
    salt_loss,
    teacher_targets,
)

TINY = "vit_test_tiny"


def timm_vit_base_keys() -> dict[str, tuple]:
    """timm VisionTransformer('vit_base_patch16_224') state-dict keys and shapes, written out by hand."""
    D, N = 768, 196
    keys = {
        "cls_token": (1, 1, D),
        "pos_embed": (1, N + 1, D),
        "patch_embed.proj.weight": (D, 3, 16, 16),
        "patch_embed.proj.bias": (D,),
    }
    for i in range(12):
        b = f"blocks.{i}."
        keys.update({
            b + "norm1.weight": (D,), b + "norm1.bias": (D,),
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "norm2.weight": (D,), b + "norm2.bias": (D,),
            b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
        })  # fmt: skip
    keys.update({"norm.weight": (D,), "norm.bias": (D,), "head.weight": (1000, D), "head.bias": (1000,)})
    return keys


def test_vit_base_has_timms_exact_keys_and_shapes():
    with torch.device("meta"):
        model = build_vit("vit_base_patch16_224", num_classes=1000)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == timm_vit_base_keys()
    with torch.device("meta"):
        encoder = build_vit("vit_base_patch16_224")  # our default: an encoder without classifier
    assert "head.weight" not in encoder.state_dict()
    assert sum(p.numel() for p in encoder.parameters()) == 85_798_656  # timm's ViT-B/16 with num_classes=0


def reference_forward_features(model, x: torch.Tensor) -> torch.Tensor:
    """ViT written out with explicit softmax attention and plain ops, reading the same parameters."""
    sd = model.state_dict()
    cfg = model.cfg
    x = x.expand(-1, 3, -1, -1)
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=cfg.patch_size)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t], 1) + sd["pos_embed"]
    H, D = cfg.num_heads, cfg.embed_dim
    for i in range(cfg.depth):
        p = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        h = F.layer_norm(t, (D,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        q, k, v = (h @ p("attn.qkv.weight").T + p("attn.qkv.bias")).chunk(3, dim=-1)
        split = lambda z: z.reshape(z.shape[0], z.shape[1], H, D // H).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1) @ v
        a = a.transpose(1, 2).reshape(t.shape)
        t = t + a @ p("attn.proj.weight").T + p("attn.proj.bias")
        h = F.layer_norm(t, (D,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        h = F.gelu(h @ p("mlp.fc1.weight").T + p("mlp.fc1.bias"))
        t = t + h @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
    return F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)


def test_forward_matches_written_out_reference_and_grayscale_is_replicated():
    torch.manual_seed(0)
    model = build_vit(TINY, num_classes=5).eval()
    x = torch.randn(2, 1, 224, 224)
    with torch.no_grad():
        feats = model.forward_features(x)
        ref = reference_forward_features(model, x)
        assert feats.shape == (2, 197, 64)
        torch.testing.assert_close(feats, ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(model.forward_features(x.expand(-1, 3, -1, -1)), feats)
        torch.testing.assert_close(model(x), model.head(ref[:, 0]), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(model.patch_tokens(x), ref[:, 1:], atol=2e-5, rtol=1e-4)


def test_patch_tokens_by_index_see_only_those_patches_and_keep_their_positions():
    torch.manual_seed(0)
    model = build_vit(TINY).eval()
    x = torch.randn(2, 1, 224, 224)
    idx = torch.tensor([[0, 13, 100, 195], [5, 6, 7, 182]])
    with torch.no_grad():
        out = model.patch_tokens(x, idx)
        assert out.shape == (2, 4, 64)
        # Changing a patch outside the context changes nothing (patch 1 = row 0, columns 16..31).
        y = x.clone()
        y[:, :, :16, 16:32] += 5.0
        torch.testing.assert_close(model.patch_tokens(y, idx), out)
        # Permuting the indices permutes the tokens: each token keeps its own position embedding.
        perm = torch.tensor([2, 0, 3, 1])
        torch.testing.assert_close(model.patch_tokens(x, idx[:, perm]), out[:, perm], atol=1e-5, rtol=1e-5)
        # All indices in raster order = the full forward.
        full = torch.arange(196).expand(2, -1)
        torch.testing.assert_close(model.patch_tokens(x, full), model.patch_tokens(x), atol=1e-5, rtol=1e-5)


def test_wrong_input_size_is_a_clear_error():
    model = build_vit(TINY)
    with pytest.raises(ValueError, match="expected images"):
        model.patch_tokens(torch.zeros(1, 1, 112, 112))
    with pytest.raises(ValueError, match="unknown ViT config keys"):
        build_vit({"name": TINY, "dept": 3})
    with pytest.raises(ValueError, match="unknown ViT architecture"):
        build_vit("vit_huge_typo")


def test_urfm_format_maps_every_key(tmp_path):
    torch.manual_seed(1)
    src = build_vit(TINY).eval()
    D = src.cfg.embed_dim
    ema = {"module." + k: v.clone() for k, v in src.state_dict().items()}
    # URFM's MIM pretraining leaves a decoder and a mask token beside the encoder.
    ema["module.mask_token"] = torch.randn(1, 1, D)
    ema["module.decoder_embed.weight"] = torch.randn(32, D)
    ema["module.decoder.blocks.0.attn.qkv.weight"] = torch.randn(96, 32)
    path = tmp_path / "urfm.pth"
    torch.save({"ema_state_dict": ema, "epoch": 99, "optimizer": {"state": {}}}, path)

    loaded = load_encoder(path, TINY).eval()
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(1, 1, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.patch_tokens(x), src.patch_tokens(x))

    # A missing encoder key, and a wrongly shaped one, are named in the error.
    del ema["module.blocks.1.mlp.fc2.bias"]
    ema["module.pos_embed"] = torch.zeros(1, 50, D)
    torch.save({"ema_state_dict": ema}, path)
    with pytest.raises(CheckpointFormatError, match=r"blocks\.1\.mlp\.fc2\.bias") as e:
        load_encoder(path, TINY)
    assert "pos_embed: file (1, 50, 64)" in str(e.value)


def test_timm_style_files_and_our_export_load(tmp_path):
    torch.manual_seed(2)
    src = build_vit(TINY, num_classes=7).eval()
    x = torch.randn(1, 1, 224, 224)
    ref = src.patch_tokens(x).detach()
    # timm checkpoint as torch file with a classifier head: the head is dropped for an encoder.
    torch.save({"state_dict": src.state_dict()}, tmp_path / "timm.pth")
    torch.testing.assert_close(load_encoder(tmp_path / "timm.pth", TINY).patch_tokens(x), ref)
    # ...and kept when the architecture has a head.
    with_head = load_encoder(tmp_path / "timm.pth", TINY, num_classes=7)
    torch.testing.assert_close(with_head(x), src(x))
    # Our export records its architecture.
    out = export_encoder_safetensors(src, tmp_path / "enc.safetensors")
    torch.testing.assert_close(load_encoder(out).patch_tokens(x), ref)
    # Garbage is a clear error, not a crash deep inside torch.
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="not a readable torch checkpoint"):
        load_encoder(tmp_path / "junk.pth", TINY)
    with pytest.raises(FileNotFoundError):
        load_encoder(tmp_path / "absent.pth", TINY)


def test_our_weights_load_into_timm_strictly(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(3)
    ours = build_vit("vit_base_patch16_224", num_classes=1000).eval()
    theirs = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 1, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x.expand(-1, 3, -1, -1)))
        torch.testing.assert_close(ours(x), theirs(x.expand(-1, 3, -1, -1)))
    # The exported encoder (no head) loads into timm's num_classes=0 model strictly.
    path = export_encoder_safetensors(build_vit("vit_base_patch16_224"), tmp_path / "enc.safetensors")
    from safetensors.torch import load_file

    timm.create_model("vit_base_patch16_224", num_classes=0).load_state_dict(load_file(path), strict=True)


def test_predictor_shapes_and_block_independence():
    torch.manual_seed(4)
    enc = build_vit(TINY)
    pred = Predictor(PredictorConfig(embed_dim=32, depth=2, num_heads=2), 64, 48, 196).eval()
    B, Kc, T, Kt = 2, 20, 3, 5
    ctx = torch.randn(B, Kc, 64)
    ctx_idx = torch.stack([torch.randperm(196)[:Kc] for _ in range(B)])
    tgt_idx = torch.randint(0, 196, (T, B, Kt))
    with torch.no_grad():
        out = pred(ctx, ctx_idx, tgt_idx)
        assert out.shape == (T, B, Kt, 48)
        # Each target block is its own sequence: block 0's prediction ignores what block 1 asks for.
        other = tgt_idx.clone()
        other[1] = torch.randint(0, 196, (B, Kt))
        torch.testing.assert_close(pred(ctx, ctx_idx, other)[0], out[0])
    assert enc.cfg.num_patches == 196


def test_salt_loss_is_mean_over_blocks_of_smooth_l1():
    torch.manual_seed(5)
    p, y = torch.randn(4, 2, 3, 8), torch.randn(4, 2, 3, 8)
    manual = sum(F.smooth_l1_loss(p[i], y[i]) for i in range(4)) / 4
    torch.testing.assert_close(salt_loss(p, y), manual)
    with pytest.raises(ValueError):
        salt_loss(p, y[:, :, :2])


def padded_batch(B=3, T=2, seed=0):
    """Per-image masks of very different lengths, padded with -1 as the mask kernel pads them."""
    g = torch.Generator().manual_seed(seed)
    ctx_len, tgt_len = [40, 12, 25][:B], [[6, 2, 4], [3, 5, 1]][:T]
    ctx_idx = torch.full((B, max(ctx_len)), -1)
    tgt_idx = torch.full((T, B, max(max(r) for r in tgt_len)), -1)
    for i in range(B):
        perm = torch.randperm(196, generator=g)
        ctx_idx[i, : ctx_len[i]] = perm[: ctx_len[i]].sort().values
        start = ctx_len[i]
        for j in range(T):
            n = tgt_len[j][i]
            tgt_idx[j, i, :n] = perm[start : start + n].sort().values
            start += n
    return ctx_idx, tgt_idx


def test_padding_never_changes_a_real_tokens_output():
    """A padded batch against the images one at a time (each cut to its own real indices): the student's
    context tokens and the predictions agree at every real position; padding values are irrelevant."""
    torch.manual_seed(7)
    model = SALTModel(build_vit(TINY), Predictor(PredictorConfig(32, 2, 2), 64, 48, 196)).eval()
    x = torch.randn(3, 1, 224, 224)
    ctx_idx, tgt_idx = padded_batch()
    with torch.no_grad():
        ctx, pred = model(x, ctx_idx, tgt_idx)
        for i in range(3):
            kc = int((ctx_idx[i] >= 0).sum())
            for j in range(tgt_idx.shape[0]):
                kt = int((tgt_idx[j, i] >= 0).sum())
                ctx1, pred1 = model(x[i : i + 1], ctx_idx[i : i + 1, :kc], tgt_idx[j : j + 1, i : i + 1, :kt])
                torch.testing.assert_close(ctx[i, :kc], ctx1[0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(pred[j, i, :kt], pred1[0, 0], atol=1e-5, rtol=1e-5)


def test_loss_ignores_padding_and_averages_real_target_tokens():
    torch.manual_seed(8)
    _, tgt_idx = padded_batch()
    real = tgt_idx >= 0
    p, y = torch.randn(*tgt_idx.shape, 8), torch.randn(*tgt_idx.shape, 8)
    loss = salt_loss(p, y, real)
    junk = p.clone()
    junk[~real] = 1e6  # whatever the padding slots predict
    torch.testing.assert_close(salt_loss(junk, y, real), loss)
    manual = sum(F.smooth_l1_loss(p[j][real[j]], y[j][real[j]]) for j in range(tgt_idx.shape[0])) / tgt_idx.shape[0]
    torch.testing.assert_close(loss, manual)
    # gradients reach the real predictions only
    p.requires_grad_(True)
    salt_loss(p, y, real).backward()
    assert (p.grad[~real] == 0).all() and (p.grad[real].abs().sum(-1) > 0).all()


def test_target_norm_layernorm_standardises_each_target_token():
    torch.manual_seed(9)
    teacher = freeze(build_vit(TINY))
    x = torch.randn(2, 1, 224, 224)
    _, tgt_idx = padded_batch(B=2)
    y = teacher_targets(teacher, x, tgt_idx, norm="layernorm")
    torch.testing.assert_close(y.mean(-1), torch.zeros(y.shape[:-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(y.shape[:-1]), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="target norm"):
        teacher_targets(teacher, x, tgt_idx, norm="batch")


def test_teacher_gets_no_gradient_and_does_not_change():
    torch.manual_seed(6)
    teacher = freeze(build_vit(TINY))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = SALTModel(build_vit(TINY), Predictor(PredictorConfig(32, 1, 2), 64, 64, 196))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(2, 1, 224, 224)
    ctx_idx = torch.arange(100).expand(2, -1)
    tgt_idx = torch.arange(150, 190).reshape(4, 1, 10).expand(4, 2, 10).contiguous()
    for _ in range(2):
        loss = salt_loss(model(x, ctx_idx, tgt_idx)[1], teacher_targets(teacher, x, tgt_idx))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(p.grad is not None for p in model.student.parameters())


def test_mae_pieces():
    torch.manual_seed(7)
    imgs = torch.randn(2, 1, 224, 224)
    patches = patchify(imgs, 16)
    assert patches.shape == (2, 196, 256)
    torch.testing.assert_close(patches[1, 14 + 2], imgs[1, 0, 16:32, 32:48].reshape(-1))
    g = torch.Generator().manual_seed(0)
    keep = random_keep_indices(2, 196, 0.75, g)
    assert keep.shape == (2, 49) and all(len(set(r.tolist())) == 49 for r in keep)
    enc = build_vit(TINY)
    model = MAEModel(enc, MAEDecoder(DecoderConfig(32, 1, 2), 64, 196, 256))
    pred = model(imgs, keep)
    assert pred.shape == (2, 196, 256)
    valid = torch.ones(2, 14, 14, dtype=torch.bool)
    loss = mae_loss(pred, imgs, keep, valid, 16)
    loss.backward()
    assert torch.isfinite(loss) and enc.cls_token.grad is not None
    # A perfect prediction of the normalised masked patches gives zero loss.
    t = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    assert mae_loss(t, imgs, keep, valid, 16).item() < 1e-10
    # The encoder checkpoint drops the decoder the same way URFM's does.
    assert all(k.startswith("decoder") for k in model.decoder.state_dict())


def test_flop_counts_match_known_figures():
    from usjepa.models import salt_step_flops, vit_config, vit_forward_flops

    base = vit_config("vit_base_patch16_224")
    # ViT-B/16 at 224 is 17.6 GMACs (timm / fvcore count) = 35.1 GFLOPs per image forward.
    assert abs(vit_forward_flops(base) / 1e9 - 35.1) < 0.2
    pred = Predictor(PredictorConfig(), 768, 768, 196)
    full = salt_step_flops(base, base, pred, 1, n_ctx=196, n_blocks=4, n_tgt=20)
    # Student fwd+bwd (3x) + teacher fwd (1x) on the full image, plus the predictor.
    assert full > 4 * vit_forward_flops(base) and full < 4 * vit_forward_flops(base) + 3 * 4 * 12e9


def test_collapse_statistic_and_warning(caplog):
    from usjepa.models.salt import token_std
    from usjepa.monitor import CollapseMonitor

    torch.manual_seed(10)
    x, real = torch.randn(3, 5, 8), torch.rand(3, 5) > 0.3
    torch.testing.assert_close(token_std(x, real), x[real].std(0, unbiased=False).mean())
    collapsed = torch.randn(1, 1, 8).expand(3, 5, 8)  # every token the same vector
    assert float(token_std(collapsed, real)) < 1e-6
    monitor = CollapseMonitor(torch.device("cpu"))
    monitor.observe(torch.tensor([0.5, 0.4, 0.9]))
    assert monitor.record(10) == pytest.approx({"std_student": 0.5, "std_pred": 0.4, "std_target": 0.9})
    assert monitor.record(20) == {}  # reset after each record
    with caplog.at_level("WARNING", logger="usjepa.train"):
        monitor.observe(torch.tensor([0.001, 0.001, 0.9]))
        monitor.record(30)
    assert "collapsing" in caplog.text and "step 30" in caplog.text
