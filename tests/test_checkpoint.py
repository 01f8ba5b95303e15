"""Checkpoints (atomic, retention, loud failures), config strictness, and the Table 5 schedules."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from usjepa.checkpoint import (
    CheckpointError,
    capture_rng,
    check_resume_compatible,
    latest_checkpoint,
    list_step_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from usjepa.config import ConfigError, load_config
from usjepa.schedules import lr_at, set_optimizer_hparams, wd_at

REPO = Path(__file__).resolve().parents[1]


def fake_state(step: int) -> dict:
    return {"stage": 2, "step": step, "epoch": 0, "encoder": {"w": torch.ones(2) * step}, "head": {},
            "optimizer": {"state": {}, "param_groups": []}, "sampler": {"seed": 0, "epoch": 0, "consumed": step},
            "rng": capture_rng(), "config": {"stage": 2, "model": {"arch": "x"}}, "world_size": 1}


def test_save_keeps_last_k_and_best_and_loads_back(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(fake_state(step), tmp_path, keep_last=2, is_best=(step == 2))
    names = [p.name for p in list_step_checkpoints(tmp_path)]
    assert names == ["step_00000003.pt", "step_00000004.pt"]
    assert latest_checkpoint(tmp_path).name == "step_00000004.pt"
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")  # survives the rotation of its step file
    assert best["step"] == 2 and torch.equal(best["encoder"]["w"], torch.full((2,), 2.0))
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_missing_corrupt_foreign_and_mismatched_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    path = save_checkpoint(fake_state(7), tmp_path, keep_last=3)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # truncated, as by a full disk
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a usjepa training checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    saved = {"stage": 2, "seed": 0, "model": {"arch": "vit_base_patch16_224"}, "optim": {"epochs": 100},
             "train": {"log_every": 10}, "data": {"batch_size": 128, "root": "a"}}
    now = {**saved, "model": {"arch": "vit_test_tiny"}, "train": {"log_every": 1}, "data": {"batch_size": 128, "root": "b"}}
    with pytest.raises(CheckpointError, match=r"model\.arch: checkpoint 'vit_base_patch16_224' vs config 'vit_test_tiny'"):
        check_resume_compatible(saved, now, "ck.pt")
    check_resume_compatible(saved, {**saved, "train": {"log_every": 1}, "data": {"batch_size": 128, "root": "b"}}, "ck")


def test_rng_round_trip():
    state = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_schedules_follow_table_5():
    total, warm = 1000, 100
    assert lr_at(0, total, warm, 5e-6, 5e-5, 5e-7) == pytest.approx(5e-6)
    assert lr_at(50, total, warm, 5e-6, 5e-5, 5e-7) == pytest.approx(2.75e-5)
    assert lr_at(100, total, warm, 5e-6, 5e-5, 5e-7) == pytest.approx(5e-5)
    assert lr_at(550, total, warm, 5e-6, 5e-5, 5e-7) == pytest.approx((5e-5 + 5e-7) / 2)
    assert lr_at(1000, total, warm, 5e-6, 5e-5, 5e-7) == pytest.approx(5e-7)
    assert wd_at(0, total, 0.04, 0.4) == pytest.approx(0.04)
    assert wd_at(500, total, 0.04, 0.4) == pytest.approx(0.22)
    assert wd_at(1000, total, 0.04, 0.4) == pytest.approx(0.4)
    lrs = [lr_at(s, total, warm, 5e-6, 5e-5, 5e-7) for s in range(total + 1)]
    assert all(b >= a for a, b in zip(lrs[:warm], lrs[1 : warm + 1]))
    assert all(b <= a for a, b in zip(lrs[warm:], lrs[warm + 1 :]))
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [torch.nn.Parameter(torch.zeros(1))], "no_wd": True}])
    set_optimizer_hparams(opt, 1e-3, 0.3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0] and opt.param_groups[1]["lr"] == 1e-3
    assert math.isfinite(lr_at(5, 5, 5, 1, 2, 0))  # warm-up as long as the run


def test_config_files_load_and_typos_are_named(tmp_path):
    paper = load_config(REPO / "configs" / "usjepa_vitb16.yaml")
    assert paper.optim.lr_peak == 5e-5 and paper.optim.lr_start == 5e-6 and paper.optim.lr_final == 5e-7
    assert (paper.optim.wd_start, paper.optim.wd_final, paper.optim.epochs) == (0.04, 0.4, 100)
    assert paper.data.batch_size == 128 and paper.model.predictor["embed_dim"] == 384
    tiny = load_config(REPO / "configs" / "tiny_cpu.yaml", ["model.teacher=t.pt", "optim.epochs=2"])
    assert tiny.optim.epochs == 2 and tiny.model.teacher == "t.pt"
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: 1\noptim:\n  lr_peek: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.lr_peek"):
        load_config(bad)
    with pytest.raises(ConfigError, match="trian"):
        load_config(REPO / "configs" / "tiny_cpu.yaml", ["stage=1", "trian.log_every=2"])
    with pytest.raises(ConfigError, match=r"optim\.epochs: expected int"):
        load_config(REPO / "configs" / "tiny_cpu.yaml", ["stage=1", "optim.epochs=two"])
    with pytest.raises(ConfigError, match="needs model.teacher"):
        load_config(REPO / "configs" / "tiny_cpu.yaml")
    remote = load_config(REPO / "configs" / "tiny_cpu.yaml", ["stage=1", "data.root=s3://b/c", "data.cache_limit_gb=0.5"])
    assert (remote.data.root, remote.data.cache_limit_gb, remote.data.cache_dir) == ("s3://b/c", 0.5, None)
    with pytest.raises(ConfigError, match=r"data\.cache_limit_gb must be >= 0"):
        load_config(REPO / "configs" / "tiny_cpu.yaml", ["stage=1", "data.cache_limit_gb=-1"])
    with pytest.raises(ConfigError, match="cache_limt_gb"):
        load_config(REPO / "configs" / "tiny_cpu.yaml", ["stage=1", "data.cache_limt_gb=1"])
    for key in ("model.target_norm=batch", "optim.lr_scale=sqrt"):
        with pytest.raises(ConfigError, match=key.split("=")[0].replace(".", r"\.")):
            load_config(REPO / "configs" / "tiny_cpu.yaml", ["stage=1", key])


def test_stage1_starts_from_mae_optimiser_defaults(tmp_path):
    from usjepa.config import lr_multiplier

    cfg = tmp_path / "mae.yaml"
    cfg.write_text("stage: 1\noptim: {epochs: 10, warmup_epochs: 1, lr_peak: 3.0e-4}\n")
    mae = load_config(cfg)
    assert mae.optim.lr_peak == 3e-4  # given keys win
    assert (mae.optim.wd_start, mae.optim.wd_final, mae.optim.betas, mae.optim.lr_scale) == (0.05, 0.05, [0.9, 0.95], "linear")
    assert mae.model.decoder == {"embed_dim": 512, "depth": 8, "num_heads": 16, "mask_ratio": 0.75}
    assert lr_multiplier(mae, world_size=8) == 128 * 8 / 256  # the paper's 128 per GPU on 8 GPUs
    salt = load_config(REPO / "configs" / "usjepa_vitb16.yaml")
    assert salt.optim.lr_peak == 5e-5 and salt.optim.lr_scale == "none" and lr_multiplier(salt, 8) == 1.0
    vitb_mae = load_config(REPO / "configs" / "mae_vitb16.yaml")
    assert vitb_mae.stage == 1 and vitb_mae.optim.lr_peak == 1.5e-4 and vitb_mae.model.decoder["depth"] == 8


def test_checkpoints_and_exports_get_the_ordinary_file_mode(tmp_path):
    """safetensors' save_file creates its file 0600: exports were unreadable to the group while checkpoints
    were 0644. Both now get what open() gives under the umask (0644 under the usual 022)."""
    import os

    from usjepa.models import build_vit, export_encoder_safetensors

    umask = os.umask(0o022)
    try:
        export = export_encoder_safetensors(build_vit("vit_test_tiny"), tmp_path / "export" / "enc.safetensors")
        ckpt = save_checkpoint(fake_state(1), tmp_path, keep_last=2)
    finally:
        os.umask(umask)
    assert oct(export.stat().st_mode & 0o777) == oct(ckpt.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in export.parent.iterdir()) == ["enc.safetensors"]  # no tmp file left
