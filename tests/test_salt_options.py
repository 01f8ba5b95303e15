"""Issue 22's reproduction options: multi-block stage 1, sin-cos position embeddings, L1 loss, exact
schedules, and the oracle diagnostics that say whether a student learned more than the image mean."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from usjepa.config import ConfigError, load_config, schedule_epochs
from usjepa.models.mae import DecoderConfig, MAEDecoder, MAEModel, mae_loss, stage1_masks
from usjepa.models.salt import Predictor, PredictorConfig, oracle_diagnostics, padded_target_rows, salt_loss
from usjepa.models.vit import build_vit, sincos_2d
from usjepa.schedules import lr_at


def test_sincos_position_embedding_is_fixed_and_keeps_timm_keys():
    vit = build_vit({"name": "vit_test_tiny", "pos_embed": "sincos"})
    learned = build_vit("vit_test_tiny")
    assert vit.state_dict().keys() == learned.state_dict().keys()
    table = vit.pos_embed[0]
    assert torch.equal(table[0], torch.zeros(64)) and torch.allclose(table[1:], sincos_2d(64, 14))
    assert not vit.pos_embed.requires_grad and learned.pos_embed.requires_grad
    # row r, column c: the first half encodes the row, the second the column, sin then cos per half
    r, c = 3, 5
    omega = 1.0 / 10000 ** (torch.arange(16, dtype=torch.float64) / 16)
    expect = torch.cat([torch.sin(r * omega), torch.cos(r * omega), torch.sin(c * omega), torch.cos(c * omega)])
    assert torch.allclose(table[1 + r * 14 + c].double(), expect, atol=1e-6)
    pred = Predictor(PredictorConfig(embed_dim=32, depth=1, num_heads=2, pos_embed="sincos"), 64, 64, 196)
    assert torch.allclose(pred.pos_embed[0], sincos_2d(32, 14)) and not pred.pos_embed.requires_grad
    with pytest.raises(ValueError, match="pos_embed"):
        build_vit({"name": "vit_test_tiny", "pos_embed": "rope"})


def test_l1_loss_option():
    pred, target = torch.zeros(1, 1, 2, 4), torch.full((1, 1, 2, 4), 3.0)
    assert salt_loss(pred, target, kind="l1").item() == pytest.approx(3.0)
    assert salt_loss(pred, target).item() == pytest.approx(2.5)  # Smooth L1, beta 1: |x| - 0.5
    with pytest.raises(ValueError, match="loss"):
        salt_loss(pred, target, kind="mse")


def test_oracle_diagnostics_by_hand():
    """Two images, one target block of two positions each (one padded slot): the image-mean oracle, the
    position-mean oracle and their sum, with Smooth L1 on errors < 1 (0.5 x^2), and the spreads."""
    D = 1
    tgt_idx = torch.tensor([[[0, 1, -1], [0, 1, -1]]])  # [T=1, B=2, Kt=3]
    targets = torch.tensor([[[[0.0], [0.4], [9.0]], [[0.2], [0.6], [9.0]]]])  # padding values must not count
    pred = torch.zeros(1, 2, 3, D)
    image, position, weight = padded_target_rows(tgt_idx)
    d = oracle_diagnostics(pred.reshape(-1, D), targets.reshape(-1, D), image, position, weight, 2, 4)
    # image means 0.2 and 0.4; errors: image 1 ±0.2, image 2 ±0.2 -> 0.5 * 0.04 = 0.02
    assert d[0].item() == pytest.approx(0.02, abs=1e-6)
    # position means 0.1 (pos 0) and 0.5 (pos 1): errors ±0.1 -> 0.005
    assert d[1].item() == pytest.approx(0.005, abs=1e-6)
    # position + image - batch mean (0.3): image 1 predicts 0.0 / 0.4 exactly, image 2 0.2 / 0.6 exactly
    assert d[2].item() == pytest.approx(0.0, abs=1e-6)
    assert d[3].item() == 0.0 and d[4].item() == pytest.approx(0.2, abs=1e-6)  # spreads: pred 0, targets ±0.2


def test_multiblock_stage1_sees_the_context_and_reconstructs_the_target_blocks():
    torch.manual_seed(0)
    enc = build_vit("vit_test_tiny")
    dec = MAEDecoder(DecoderConfig(embed_dim=32, depth=1, num_heads=2, masking="multiblock"), 64, 196, 256)
    images = torch.rand(2, 1, 224, 224)
    ctx = torch.tensor([[0, 1, 2, 3], [5, 6, -1, -1]])  # image 2 padded
    tgt = torch.tensor([[[10, 11, -1], [12, 13, 14]]])
    batch = SimpleNamespace(images=images, ctx_idx=ctx, tgt_idx=tgt)
    keep, targets = stage1_masks(dec.cfg, batch, 196, torch.Generator().manual_seed(0))
    assert keep is ctx and targets is tgt
    pred = MAEModel(enc, dec)(images, keep)
    assert pred.shape == (2, 196, 256) and torch.isfinite(pred).all()
    valid = torch.ones(2, 14, 14, dtype=torch.bool)
    loss = mae_loss(pred, images, keep, valid, 16, targets)
    # by hand: mean over the 5 target patches (10, 11 of image 1; 12, 13, 14 of image 2) only
    from usjepa.models.mae import patchify
    t = patchify(images, 16)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    err = (pred - t).pow(2).mean(-1)
    assert loss.item() == pytest.approx(((err[0, 10] + err[0, 11] + err[1, 12:15].sum()) / 5).item(), rel=1e-5)
    # the padded context slot never overwrites patch 0 of image 2: its prediction is the mask token's
    random = DecoderConfig(masking="random", mask_ratio=0.75)
    keep_r, none = stage1_masks(random, batch, 196, torch.Generator().manual_seed(0))
    assert none is None and keep_r.shape == (2, 49)
    with pytest.raises(ValueError, match="masking"):
        DecoderConfig(masking="tube")


def test_schedule_epochs_end_the_cosine_at_the_steps_run(tmp_path):
    cfg = load_config(None, ["model.teacher=x", "optim.epochs=3", "optim.schedule_epochs=2.5",
                             "optim.warmup_epochs=0.25", "model.loss=l1"])
    assert schedule_epochs(cfg) == 2.5 and cfg.model.loss == "l1"
    assert lr_at(2.5, 2.5, 0.25, 0.0, 1.0, 0.01) == pytest.approx(0.01)  # the last step reaches lr_final
    assert lr_at(2.5, 3.0, 0.25, 0.0, 1.0, 0.01) > 0.05  # the epochs-rounded-up horizon cut it short
    assert schedule_epochs(load_config(None, ["model.teacher=x", "optim.epochs=3", "optim.warmup_epochs=1"])) == 3.0
    with pytest.raises(ConfigError, match="past optim.epochs"):
        load_config(None, ["model.teacher=x", "optim.epochs=2", "optim.schedule_epochs=2.5", "optim.warmup_epochs=1"])
    with pytest.raises(ConfigError, match="model.loss"):
        load_config(None, ["model.teacher=x", "model.loss=mse"])
    with pytest.raises(ConfigError, match="predictor.pos_embed"):
        load_config(None, ["model.teacher=x", "model.predictor.pos_embed=rope"])
    assert math.isfinite(cfg.optim.lr_peak)


def test_multiblock_sincos_l1_runs_train_and_log_the_oracles(tmp_path):
    """The options end to end through ``usjepa.train``: a stage-1 multi-block teacher with sin-cos position
    embeddings, then an L1 student whose metrics carry the oracle losses and spreads."""
    import json

    from usjepa.shards.synthetic_shards import write_synthetic_corpus
    from usjepa.train import train

    shards = write_synthetic_corpus(tmp_path / "shards", {"toy": 16}, size=(240, 300), per_shard=16, val={"toy": 8})
    base = [str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"), "--set", f"data.root={shards}",
            "--set", "data.loader={num_workers: 0}",
            "--set", "train.log_every=1", "--set", "train.max_steps=2", "--set", "optim.epochs=1",
            "--set", "optim.warmup_epochs=0"]
    s1 = tmp_path / "s1"
    assert train(base + ["--out", str(s1), "--set", "stage=1", "--set", "model.decoder.masking=multiblock",
                         "--set", "model.arch={name: vit_test_tiny, pos_embed: sincos}"]) == 0
    rec = [json.loads(x) for x in (s1 / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert rec and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rec)
    s2 = tmp_path / "s2"
    teacher = s1 / "export" / "encoder_last.safetensors"
    assert train(base + ["--out", str(s2), "--set", f"model.teacher={teacher}", "--set", "model.loss=l1"]) == 0
    rec = [json.loads(x) for x in (s2 / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    for key in ("loss_oracle_image_mean", "loss_oracle_position_mean", "loss_oracle_position_plus_image_mean",
                "spread_pred_in_image", "spread_target_in_image"):
        assert all(math.isfinite(r[key]) and r[key] >= 0 for r in rec), key
    assert all(r["spread_target_in_image"] > 0 for r in rec)
