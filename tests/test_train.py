"""The training loop end to end on real shards, on CPU: stage 1 -> stage 2, exact resume after SIGKILL,
loud failures (corrupt / mismatched checkpoints, NaN), and a real 2-process torchrun (gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from usjepa.checkpoint import CheckpointError, latest_checkpoint, list_step_checkpoints, load_checkpoint
from usjepa.models import build_vit, export_encoder_safetensors, load_encoder
from usjepa.shards.synthetic_shards import write_synthetic_corpus
from usjepa.train import NonFiniteLossError, main, train

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # 64 train frames over two datasets -> 8 batches of 8 per epoch; 16 val frames -> 2 batches.
    return write_synthetic_corpus(tmp_path_factory.mktemp("shards"), {"toy_a": 32, "toy_b": 32}, size=(240, 300),
                                  per_shard=32, val={"toy_a": 8, "toy_b": 8})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    torch.manual_seed(123)
    return export_encoder_safetensors(build_vit("vit_test_tiny"), tmp_path_factory.mktemp("teacher") / "t.safetensors")


def args(shards: Path, out: Path, *extra: str, teacher: Path | None = None) -> list[str]:
    a = [CONFIG, "--out", str(out), "--set", f"data.root={shards}", "--set", "data.loader={num_workers: 1}",
         "--set", "train.log_every=1"]
    if teacher is not None:
        a += ["--set", f"model.teacher={teacher}"]
    for e in extra:
        a += ["--set", e]
    return a


def train_losses(out: Path, skip_lines: int = 0) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()[skip_lines:]
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


def test_stage1_teacher_feeds_stage2_and_loss_decreases(shards, tmp_path):
    s1 = tmp_path / "s1"
    assert train(args(shards, s1, "stage=1", "optim.epochs=1")) == 0
    best = s1 / "checkpoints" / "best.pt"
    assert best.is_file() and (s1 / "export" / "encoder_best.safetensors").is_file()
    teacher_before = load_encoder(best).state_dict()

    s2 = tmp_path / "s2"
    assert train(args(shards, s2, "optim.epochs=3", teacher=best)) == 0
    losses = train_losses(s2)
    assert len(losses) == 24
    first, last = sum(list(losses.values())[:4]) / 4, sum(list(losses.values())[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    records = [json.loads(x) for x in (s2 / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if r["kind"] == "val"]
    assert len(vals) == 3 and vals[-1] < vals[0]
    r = next(r for r in records if r["kind"] == "train")
    for key in ("lr", "wd", "images_per_s_per_device", "data_wait_frac", "mfu", "peak_mem_gb", "grad_norm"):
        assert r[key] is not None and r[key] >= 0, key
    # The teacher file is untouched; the student export loads as an encoder of the configured architecture.
    for k, v in load_encoder(best).state_dict().items():
        assert torch.equal(v, teacher_before[k])
    student = load_encoder(s2 / "export" / "encoder_best.safetensors")
    assert student.cfg.embed_dim == 64
    ck = load_checkpoint(s2 / "checkpoints" / "best.pt")
    assert ck["val_loss"] == min(vals) and ck["epoch_complete"]


def test_killed_run_resumes_with_identical_losses(shards, teacher, tmp_path):
    common = ("optim.epochs=2", "train.ckpt_every_steps=3", "train.keep_last=10")
    ref = tmp_path / "ref"
    assert train(args(shards, ref, *common, teacher=teacher)) == 0
    expected = train_losses(ref)
    assert len(expected) == 16

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "usjepa.train", *args(shards, run, *common, teacher=teacher)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    target = run / "checkpoints" / "step_00000009.pt"  # mid-epoch 1: crosses an epoch boundary before
    deadline = time.time() + 120
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, loader workers included (a lost node)
    proc.wait()
    assert target.exists(), proc.stderr.read().decode()[-2000:]

    assert train(args(shards, run, *common, teacher=teacher) + ["--resume", str(target)]) == 0
    assert metric_steps(run) == list(range(1, 17))  # steps the killed run logged after step 9 are not repeated
    resumed = {step: loss for step, loss in train_losses(run).items() if step > 9}
    assert sorted(resumed) == list(range(10, 17))
    for step, loss in resumed.items():
        assert loss == expected[step], (step, loss, expected[step])

    # Stopped right after an epoch's last batch, before its validation: the resume validates epoch 0 and
    # continues with epoch 1, exactly.
    cut = tmp_path / "cut"
    assert train(args(shards, cut, *common, "train.max_steps=8", teacher=teacher)) == 0
    n_lines = len((cut / "metrics.jsonl").read_text().splitlines())
    assert train(args(shards, cut, *common, teacher=teacher) + ["--resume", "auto"]) == 0
    after = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()[n_lines:]]
    assert [(r["kind"], r["step"]) for r in after][:2] == [("val", 8), ("train", 9)]
    assert {r["step"]: r["loss"] for r in after if r["kind"] == "train"} == {s: expected[s] for s in range(9, 17)}


def test_corrupt_mismatched_and_existing_checkpoints_are_clear_errors(shards, teacher, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(args(shards, out, "train.max_steps=2", teacher=teacher)) == 0
    # Starting again into a folder with checkpoints, without --resume, would silently restart: refused.
    assert main(args(shards, out, "train.max_steps=2", teacher=teacher)) == 2
    assert "--resume auto" in capsys.readouterr().err
    # A different architecture cannot continue this run.
    with pytest.raises(CheckpointError, match=r"model\.arch: checkpoint 'vit_test_tiny' vs config 'vit_test_small'"):
        train(args(shards, out, "train.max_steps=4", "model.arch=vit_test_small", teacher=teacher) + ["--resume", "auto"])
    # A truncated checkpoint asked for by name is an error naming it; with --resume auto and no older one to
    # fall back to (tests below), an error too: never a fresh start.
    latest = latest_checkpoint(out)
    latest.write_bytes(latest.read_bytes()[:1000])
    assert main(args(shards, out, "train.max_steps=4", teacher=teacher) + ["--resume", str(latest)]) == 2
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and latest.name in err
    assert main(args(shards, out, "train.max_steps=4", teacher=teacher) + ["--resume", "auto"]) == 2
    assert "no checkpoint in" in capsys.readouterr().err and latest.is_file()
    with pytest.raises(CheckpointError, match="not found"):
        train(args(shards, out, teacher=teacher) + ["--resume", str(out / "nope.pt")])



def metric_steps(out: Path, kind: str = "train") -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_resume_cuts_metrics_back_to_the_resumed_step(shards, teacher, tmp_path):
    """A run killed after logging steps 5-6 but before checkpointing them resumes from step 4 and logs 5-6
    again: metrics.jsonl lists each step once (and drops a last line the kill cut short)."""
    out = tmp_path / "run"
    common = ("train.ckpt_every_steps=4", "train.keep_last=5")
    assert train(args(shards, out, *common, "train.max_steps=6", teacher=teacher)) == 0
    latest_checkpoint(out).unlink()  # the kill landed before step 6's checkpoint
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 7, "lo')
    assert train(args(shards, out, *common, "train.max_steps=8", teacher=teacher) + ["--resume", "auto"]) == 0
    assert metric_steps(out) == list(range(1, 9))


def test_resume_auto_falls_back_from_a_truncated_latest_checkpoint(shards, teacher, tmp_path):
    """The newest checkpoint cut short (a full disk, a copy interrupted): --resume auto warns, continues
    exactly from the one before, and sets the broken one aside so that it is no longer 'the latest'."""
    common = ("train.ckpt_every_steps=2", "train.keep_last=5", "optim.epochs=1")
    ref = tmp_path / "ref"
    assert train(args(shards, ref, *common, teacher=teacher)) == 0
    out = tmp_path / "run"
    assert train(args(shards, out, *common, "train.max_steps=6", teacher=teacher)) == 0
    broken = latest_checkpoint(out)
    broken.write_bytes(broken.read_bytes()[:5000])
    assert main(args(shards, out, *common, teacher=teacher) + ["--resume", "auto"]) == 0
    log = (out / "train.log").read_text()
    assert "step_00000006.pt is corrupt or truncated" in log and "falls back to the one before it" in log
    assert f"resumed from {broken.parent / 'step_00000004.pt'} at step 4" in log
    assert (broken.parent / "step_00000006.pt.unreadable").is_file()
    assert load_checkpoint(latest_checkpoint(out))["step"] == 8
    assert train_losses(out) == train_losses(ref)  # steps 5-6 replayed exactly, each listed once


def test_the_log_says_when_and_why_the_run_stopped(shards, teacher, tmp_path):
    out = tmp_path / "run"
    assert train(args(shards, out, "train.max_steps=3", teacher=teacher)) == 0
    log = (out / "train.log").read_text()
    assert "24 steps in 3 epochs; train.max_steps stops the run at step 3" in log
    assert "stopped after step 3: train.max_steps = 3 reached" in log
    out = tmp_path / "full"
    assert train(args(shards, out, "optim.epochs=1", teacher=teacher)) == 0
    assert "stopped after step 8: all 1 epochs done" in (out / "train.log").read_text()


def test_cpu_mfu_is_never_above_100_percent(shards, teacher, tmp_path, monkeypatch):
    """A CPU peak measured while other processes held the cores reads low (22 GFLOP/s on cores doing 340 was
    seen), and the run then 'beats' it: such a window's MFU is n/a, not a number above 100 %."""
    monkeypatch.setattr("usjepa.train.measured_matmul_flops", lambda: 1e6)  # a peak the tiny model beats
    out = tmp_path / "run"
    assert train(args(shards, out, "train.max_steps=3", teacher=teacher)) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert [r["mfu"] for r in recs] == [None] * 3 and recs[0]["tflops_per_device"] * 1e12 > 1e6
    assert "mfu n/a" in (out / "train.log").read_text()
    monkeypatch.undo()
    from usjepa.train import measured_matmul_flops, mfu
    assert measured_matmul_flops() > 0 and mfu(2.0, 4.0, "config") == 0.5

def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(shards, tmp_path, monkeypatch):
    torch.manual_seed(0)
    teacher_path = export_encoder_safetensors(build_vit("vit_test_tiny"), tmp_path / "teacher.safetensors")
    out = tmp_path / "run"
    assert train(args(shards, out, "train.max_steps=4", "train.log_every=2", teacher=teacher_path)) == 0
    good = latest_checkpoint(out)
    assert good.name == "step_00000004.pt"
    # The teacher's weights go bad (NaN) under the same identity (a resume with another teacher file is
    # refused, see below): the targets, hence the loss, become NaN.
    sha = load_checkpoint(good)["teacher_sha256"]
    monkeypatch.setattr("usjepa.train.file_sha256", lambda path: sha)
    poisoned = build_vit("vit_test_tiny")
    with torch.no_grad():
        poisoned.norm.weight.fill_(float("nan"))
    export_encoder_safetensors(poisoned, teacher_path)
    with pytest.raises(NonFiniteLossError, match="step_00000004.pt"):
        train(args(shards, out, "train.max_steps=8", "train.log_every=2", teacher=teacher_path) + ["--resume", "auto"])
    assert [p.name for p in list_step_checkpoints(out)] == ["step_00000004.pt"]
    ck = load_checkpoint(good)
    assert all(torch.isfinite(v).all() for v in ck["encoder"].values())


def test_teacher_identity_is_recorded_and_another_teacher_is_refused(shards, tmp_path):
    from safetensors import safe_open

    from usjepa.models import file_sha256

    torch.manual_seed(0)
    teacher_path = export_encoder_safetensors(build_vit("vit_test_tiny"), tmp_path / "teacher.safetensors")
    out = tmp_path / "run"
    assert train(args(shards, out, "train.max_steps=2", "train.log_every=1", teacher=teacher_path)) == 0
    sha = file_sha256(teacher_path)
    assert load_checkpoint(latest_checkpoint(out))["teacher_sha256"] == sha
    with safe_open(str(out / "export" / "encoder_last.safetensors"), "pt") as f:
        assert f.metadata()["usjepa_teacher_sha256"] == sha
    # collapse statistics in every train record
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert all(r["std_student"] > 0 and r["std_pred"] > 0 and r["std_target"] > 0 for r in rec)
    other = export_encoder_safetensors(build_vit("vit_test_tiny"), tmp_path / "other.safetensors")
    assert main(args(shards, out, "train.max_steps=4", teacher=other) + ["--resume", "auto"]) == 2
    with pytest.raises(CheckpointError, match="teacher sha256"):
        train(args(shards, out, "train.max_steps=4", teacher=other) + ["--resume", "auto"])


@pytest.mark.slow
def test_torchrun_two_cpu_processes_agree(shards, teacher, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "usjepa.train", *args(shards, out, "train.max_steps=5", "train.ckpt_every_steps=2", teacher=teacher)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finished = [line for line in proc.stdout.splitlines() if "finished at step" in line]
    assert len(finished) == 2, proc.stdout
    digests = {line.split("digest ")[1] for line in finished}
    assert all("step 5," in line for line in finished) and len(digests) == 1, finished
    # 64 samples / (2 ranks x 8) = 4 steps per epoch: the fifth step is in epoch 1, after a validation.
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert [r["epoch"] for r in records if r["kind"] == "val"] == [0]
    assert load_checkpoint(latest_checkpoint(out))["world_size"] == 2


def test_no_weight_decay_on_biases_and_1d_parameters():
    from usjepa.models import Predictor, PredictorConfig, SALTModel
    from usjepa.step import adamw_param_groups

    model = SALTModel(build_vit("vit_test_tiny"), Predictor(PredictorConfig(32, 1, 2), 64, 64, 196))
    decay, no_decay = adamw_param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["no_wd"] and "no_wd" not in decay
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.ndim == 1}
    assert "student.blocks.0.attn.qkv.weight" in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_truncate_metrics_keeps_what_the_resumed_run_does_not_write_again(tmp_path):
    from usjepa.run_dir import truncate_metrics

    rows = [{"kind": "train", "step": s} for s in (1, 2, 3, 4)] + [{"kind": "val", "step": 4}]
    rows += [{"kind": "train", "step": 5}]
    path = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "train", "st'  # the kill cut the last line
    path.write_text(text)
    assert truncate_metrics(path, 4) == 2  # epoch checkpoint at 4: its validation is kept
    assert [(r["kind"], r["step"]) for r in map(json.loads, path.read_text().splitlines())][-2:] == [("train", 4),
                                                                                                     ("val", 4)]
    path.write_text(text)
    assert truncate_metrics(path, 4, validated=False) == 3  # saved before step 4's validation: done again
    assert [r["step"] for r in map(json.loads, path.read_text().splitlines())] == [1, 2, 3, 4]
    assert truncate_metrics(path, 4) == 0 and oct(path.stat().st_mode & 0o777) != "0o600"
