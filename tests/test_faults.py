"""Faults a real run meets (issue #13), each reproduced for real: a corpus without a validation split, loader
workers killed by PID (idle, mid-run, repeatedly), a SIGKILLed trainer, a resume on another world size under
real torchrun, hostile configs and checkpoints, a NaN stop, two ingests into one folder. Every multi-process
scenario runs under a timeout, so that a regression fails instead of hanging the suite."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from usjepa.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from usjepa.models import build_vit, export_encoder_safetensors
from usjepa.shards.synthetic_shards import write_synthetic_corpus
from usjepa.train import main, setup_logging, train

# 64 train frames (8 batches of 8 per epoch on one rank, 4 on two), 16 val frames; a tiny random teacher
from test_train import shards, teacher  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny_cpu.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def no_val_shards(tmp_path_factory) -> Path:
    return write_synthetic_corpus(tmp_path_factory.mktemp("noval"), {"toy_a": 24}, size=(240, 300), per_shard=24)


def args(shards: Path, out: Path, teacher: Path, *extra: str) -> list[str]:
    a = [CONFIG, "--out", str(out), "--set", f"data.root={shards}", "--set", "data.loader={num_workers: 1}",
         "--set", "train.log_every=1", "--set", f"model.teacher={teacher}"]
    for e in extra:
        a += ["--set", e]
    return a


def records(out: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def train_lines(out: Path) -> int:
    """Train records written so far by a running trainer (safe to call while it writes)."""
    path = out / "metrics.jsonl"
    return path.read_text().count('"kind": "train"') if path.is_file() else 0


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def run_script(code: str, timeout: float = 90) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------------------ 1. no validation split


def test_corpus_without_validation_split_trains_and_keeps_the_last_as_best(no_val_shards, teacher, tmp_path):
    out = tmp_path / "run"
    assert train(args(no_val_shards, out, teacher, "optim.epochs=2")) == 0
    assert len(records(out)) == 6 and records(out, "val") == []
    log = (out / "train.log").read_text()
    assert log.count("no validation split") == 1
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best["step"] == 6 and best["epoch_complete"]
    assert (out / "export" / "encoder_best.safetensors").is_file()


def test_val_from_train_holds_out_whole_groups_deterministically(no_val_shards, teacher, tmp_path):
    from usjepa.shards.readers import open_sample_table

    rest, val = (open_sample_table(no_val_shards, split, val_from_train=0.25) for split in ("train", "val"))
    assert (len(rest), len(val)) == (18, 6)  # 24 one-frame groups: ceil(0.25 x 24) held out
    assert set(np.asarray(rest.group)).isdisjoint(np.asarray(val.group))
    again = open_sample_table(no_val_shards, "val", val_from_train=0.25)
    assert list(np.asarray(again.keys)) == list(np.asarray(val.keys))
    assert len(open_sample_table(no_val_shards, "val", val_from_train=0.001)) == 1  # never empty

    out = tmp_path / "run"
    assert train(args(no_val_shards, out, teacher, "optim.epochs=2", "data.val_from_train=0.25")) == 0
    assert len(records(out)) == 4 and len(records(out, "val")) == 2  # 18 frames: 2 steps of 8 per epoch
    assert "no validation split" not in (out / "train.log").read_text()


# ------------------------------------------------------------------------------- 2. dead loader workers

LOADER_SETUP = """
    import logging, os, signal, sys, time
    import torch
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
    from usjepa.shards import loader as L
    from usjepa.shards.worker_guard import pipeline_workers
    ld = L.build_loader({root!r}, "val", 4, {{"num_workers": 1}}, None, 0, 1, "cpu", 0, "dali")
    def one_pass():
        ld.set_epoch(0)
        return [b.images for b in ld]
    def kill_workers():
        for p in pipeline_workers(ld._backend._pipe):
            os.kill(p.pid, signal.SIGKILL)
            p.join()
    ref = one_pass()
"""


def test_loader_worker_killed_while_idle_is_replaced_with_the_same_batches(shards):
    proc = run_script(LOADER_SETUP.format(root=str(shards)) + """
    kill_workers()  # between passes: the pipeline is idle (this hung DALI's next run() forever)
    t = time.perf_counter()
    again = one_pass()
    assert len(again) == len(ref) and all(torch.equal(a, b) for a, b in zip(again, ref))
    it = iter(ld); first = next(it); kill_workers()  # and mid-pass
    rest = [first] + list(it)
    assert all(torch.equal(a.images, b) for a, b in zip(rest, ref))
    print(f"recovered in {time.perf_counter() - t:.1f} s")
    ld.close()
    """)
    assert proc.stdout.count("was killed by SIGKILL; restarting the pipeline") == 2, proc.stdout


def test_loader_worker_that_keeps_dying_stops_with_a_clear_error(shards):
    proc = run_script(LOADER_SETUP.format(root=str(shards)) + """
    L.MAX_WORKER_RESTARTS = 0
    kill_workers()
    try:
        one_pass()
    except L.LoaderWorkerError as e:
        print("ERROR", e)
    """)
    assert "ERROR DALI worker pid" in proc.stdout and "killed by SIGKILL" in proc.stdout, proc.stdout


TORCH_LOADER_SETUP = """
    import logging, os, signal, sys, time
    import torch
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
    from usjepa.shards import loader as L
    ld = L.build_loader({root!r}, "train", 4, {{"num_workers": 2}}, None, 0, 1, "cpu", 0, "torch")
    def one_pass():
        ld.set_epoch(0)
        return [(b.keys, b.images) for b in ld]
    def kill_a_worker():
        pid = L.dataloader_workers(ld._backend._batches)[-1].pid
        os.kill(pid, signal.SIGKILL)
        time.sleep(1.0)  # the trainer's step: torch's SIGCHLD handler raised in here, outside the loader
        return pid
    ref = one_pass()
"""


def test_torch_loader_worker_killed_mid_pass_is_replaced_with_the_same_batches(shards):
    proc = run_script(TORCH_LOADER_SETUP.format(root=str(shards)) + """
    ld.set_epoch(0)
    it = iter(ld)
    got = [next(it) for _ in range(3)]
    kill_a_worker()
    state = ld.state_dict()
    got += list(it)
    assert [b.keys for b in got] == [k for k, _ in ref]
    assert all(torch.equal(b.images, im) for b, (_, im) in zip(got, ref))
    assert state["consumed"] == 3 * 4 and ld.state_dict()["epoch"] == 1  # the pass ran to its end
    ld.close()
    """)
    assert proc.stdout.count("was killed by SIGKILL; restarting the workers at batch 3 of the pass") == 1, proc.stdout


def test_torch_loader_worker_that_keeps_dying_stops_with_a_clear_error(shards):
    proc = run_script(TORCH_LOADER_SETUP.format(root=str(shards)) + """
    L.MAX_WORKER_RESTARTS = 0
    ld.set_epoch(0)
    it = iter(ld)
    next(it)
    kill_a_worker()
    try:
        list(it)
    except L.LoaderWorkerError as e:
        print("ERROR", e)
    """)
    assert "ERROR DataLoader worker pid" in proc.stdout and "gave up after 0 restarts" in proc.stdout, proc.stdout


def test_watchdog_interrupts_a_call_blocked_on_a_dead_worker():
    """A worker dying while the main thread is blocked in a pipeline call (DALI's semaphore wait): the
    watchdog sees the exit and breaks the wait within seconds."""
    proc = run_script("""
    import multiprocessing as mp, os, signal, threading, time, types
    from usjepa.shards.worker_guard import WorkerDied, run_watchdog
    worker = mp.get_context("fork").Process(target=time.sleep, args=(60,))
    worker.start()
    pipe = types.SimpleNamespace(_py_pool=types.SimpleNamespace(pool=types.SimpleNamespace(_processes=[worker])))
    blocked = mp.get_context("fork").Semaphore(0)
    threading.Timer(0.5, os.kill, (worker.pid, signal.SIGKILL)).start()  # dies while we wait on it
    t = time.perf_counter()
    try:
        with run_watchdog().guard(pipe):
            blocked.acquire()  # nobody releases it: only the watchdog can end this
    except WorkerDied as e:
        print(f"interrupted after {time.perf_counter() - t:.1f} s: {e}")
    """, timeout=30)
    assert "interrupted after" in proc.stdout and "killed by SIGKILL" in proc.stdout, proc.stdout


def test_watchdog_stops_the_process_when_the_blocked_call_cannot_be_interrupted():
    """Off the main thread no signal can break the wait: the process ends with a clear message, not a hang."""
    code = textwrap.dedent("""
    import logging, multiprocessing as mp, os, signal, sys, threading, time, types
    logging.basicConfig(stream=sys.stdout)
    from usjepa.shards.worker_guard import run_watchdog
    run_watchdog()
    worker = mp.get_context("fork").Process(target=time.sleep, args=(60,))
    worker.start()
    pipe = types.SimpleNamespace(_py_pool=types.SimpleNamespace(pool=types.SimpleNamespace(_processes=[worker])))
    blocked = mp.get_context("fork").Semaphore(0)
    def loader_thread():
        with run_watchdog().guard(pipe):
            blocked.acquire()
    threading.Thread(target=loader_thread).start()
    time.sleep(0.5)
    os.kill(worker.pid, signal.SIGKILL)
    time.sleep(60)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "killed by SIGKILL while the pipeline waited on it; stopping this process" in proc.stdout, proc.stdout


def kill_workers_and_finish(proc: subprocess.Popen, workers: list[int]) -> str:
    """SIGKILL the trainer's loader workers by PID; the run must recover and finish with status 0."""
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout[-3000:]
    assert "killed by SIGKILL; restarting the pipeline" in stdout
    return stdout


def test_training_survives_its_loader_workers_being_killed(shards, teacher, tmp_path):
    common = ("optim.epochs=2", "train.ckpt_every_steps=0")
    ref = tmp_path / "ref"
    assert train(args(shards, ref, teacher, *common)) == 0
    expected = {r["step"]: r["loss"] for r in records(ref)}

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "usjepa.train", *args(shards, out, teacher, *common)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        # Killed by PID after epoch 0's validation: the train worker mid-pass, the val worker idle.
        wait_for(lambda: train_lines(out) >= 10 or proc.poll() is not None, 120, "epoch 1 to start")
        victims = children(proc.pid)
        assert len(victims) == 2, victims
        kill_workers_and_finish(proc, victims)
    finally:
        kill_group(proc)
    assert {r["step"]: r["loss"] for r in records(out)} == expected  # the same batches: an exact run


# -------------------------------------------------------------------------- 3. orphans and plan folders


def test_sigkilled_trainer_leaves_no_workers_and_its_plan_folder_is_cleaned(shards, teacher, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "usjepa.train", *args(shards, out, teacher, "optim.epochs=5")],
                            env={**ENV, "TMPDIR": str(tmp)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for(lambda: train_lines(out) >= 2, 120, "training to start")
        workers = children(proc.pid)
        assert workers, "the trainer has no loader workers"
        plan_dirs = list(tmp.glob(f"usjepa-dali-{proc.pid}-*"))
        assert len(plan_dirs) == 2  # train and val loaders
        os.kill(proc.pid, signal.SIGKILL)  # the trainer alone, as the OOM killer would
        proc.wait(timeout=30)
        wait_for(lambda: not any(alive(p) for p in workers), 10, f"workers {workers} to die with their trainer")
    finally:
        kill_group(proc)
    assert all(p.is_dir() for p in plan_dirs)  # nothing can run at SIGKILL ...
    from usjepa.shards.worker_guard import make_plan_dir

    mine = make_plan_dir(tmp)  # ... so the next loader's start removes them
    assert not any(p.exists() for p in plan_dirs) and Path(mine).is_dir()


def start_torchrun(argv: list[str], env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "usjepa.train",
           *argv]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.slow
def test_torchrun_rank_loses_its_loader_workers_and_the_job_still_finishes(shards, teacher, tmp_path):
    out = tmp_path / "ddp"
    proc = start_torchrun(args(shards, out, teacher, "optim.epochs=2"), ENV)
    try:
        wait_for(lambda: train_lines(out) >= 5 or proc.poll() is not None, 120, "epoch 1 to start")
        ranks = children(proc.pid)
        victims = children(max(ranks))  # one rank's train (mid-pass) and val (idle) workers
        assert len(ranks) == 2 and len(victims) == 2, (ranks, victims)
        stdout = kill_workers_and_finish(proc, victims)
    finally:
        kill_group(proc)
    finished = [line for line in stdout.splitlines() if "finished at step 8" in line]
    assert len(finished) == 2 and len({line.split("digest ")[1] for line in finished}) == 1, stdout[-2000:]


@pytest.mark.slow
def test_sigkilled_torchrun_rank_stops_the_job_and_leaves_nothing_running(shards, teacher, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "ddp"
    proc = start_torchrun(args(shards, out, teacher, "optim.epochs=50"), {**ENV, "TMPDIR": str(tmp)})
    try:
        wait_for(lambda: train_lines(out) >= 3, 120, "training to start")
        ranks = children(proc.pid)
        everyone = ranks + [w for r in ranks for w in children(r)]
        assert len(everyone) == 6, everyone  # 2 ranks x (1 train + 1 val worker, both started with their loader)
        killed = max(ranks)
        os.kill(killed, signal.SIGKILL)
        proc.communicate(timeout=60)  # the other rank is stopped too, not left waiting in a collective
        wait_for(lambda: not any(alive(p) for p in everyone), 10, "every rank and worker to exit")
    finally:
        kill_group(proc)
    assert proc.returncode != 0
    left = sorted(p.name.split("-")[2] for p in tmp.glob("usjepa-dali-*"))
    assert left == [str(killed)] * 2  # the surviving rank removed its plan folders on the way out


@pytest.mark.slow
def test_sigkilled_torchrun_takes_its_ranks_with_it(shards, teacher, tmp_path):
    """torchrun starts each rank in a session of its own: after ``kill -9`` of torchrun they trained on and
    wrote later checkpoints. Each rank now has the kernel kill it with its launcher (PR_SET_PDEATHSIG)."""
    out = tmp_path / "ddp"
    proc = start_torchrun(args(shards, out, teacher, "optim.epochs=50"), ENV)
    try:
        wait_for(lambda: train_lines(out) >= 3, 120, "training to start")
        ranks = children(proc.pid)
        everyone = ranks + [w for r in ranks for w in children(r)]
        assert len(ranks) == 2 and len(everyone) == 6, everyone  # + each rank's train and val worker
        os.kill(proc.pid, signal.SIGKILL)  # torchrun alone, by PID: its ranks are not in its process group
        wait_for(lambda: not any(alive(p) for p in everyone), 15, "the ranks and their workers to exit")
        lines = train_lines(out)
        time.sleep(1)
        assert train_lines(out) == lines  # nothing trains on
    finally:
        kill_group(proc)
        for pid in everyone if "everyone" in locals() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_second_trainer_into_the_same_out_is_refused_and_sigterm_stops_the_first(shards, teacher, tmp_path, capsys):
    """Two trainers into one --out interleaved metrics.jsonl and raced for checkpoints: the second now stops
    with one line and writes nothing. SIGTERM stops the first cleanly, saying why, and frees the folder."""
    out = tmp_path / "run"
    common = ("optim.epochs=50", "train.ckpt_every_steps=2")
    proc = subprocess.Popen([sys.executable, "-m", "usjepa.train", *args(shards, out, teacher, *common)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: latest_checkpoint(out) is not None or proc.poll() is not None, 120, "a first checkpoint")
        err = _one_line_exit_2(capsys, args(shards, out, teacher, *common) + ["--resume", "auto"])
        assert err.startswith("usjepa-train: error: locked: another usjepa-train is writing"), err
        os.kill(proc.pid, signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        kill_group(proc)
    assert proc.returncode == 128 + signal.SIGTERM and "stopping on SIGTERM" in stdout, stdout[-2000:]
    steps = [r["step"] for r in records(out)]
    assert steps == list(range(1, len(steps) + 1))  # one writer: every step once, in order
    assert "locked" not in (out / "train.log").read_text() and not (out / "train.lock").exists()
    # the folder is free again: a resume takes it
    last = load_checkpoint(latest_checkpoint(out))["step"]
    assert main(args(shards, out, teacher, *common, f"train.max_steps={last + 1}") + ["--resume", "auto"]) == 0


@pytest.mark.slow
def test_a_hung_rank_stops_the_others_after_the_configured_collective_timeout(shards, teacher, tmp_path):
    out = tmp_path / "ddp"
    proc = start_torchrun(args(shards, out, teacher, "optim.epochs=50", "train.collective_timeout_s=3"), ENV)
    try:
        wait_for(lambda: train_lines(out) >= 3, 120, "training to start")
        ranks = sorted(children(proc.pid))
        os.kill(ranks[1], signal.SIGSTOP)  # hung, not dead: only a timeout can tell
        t = time.time()
        wait_for(lambda: not alive(ranks[0]), 30, "rank 0 to give up on the hung rank")
        waited = time.time() - t
        os.kill(ranks[1], signal.SIGCONT)  # let it take torchrun's SIGTERM now rather than after 30 s
        stdout, _ = proc.communicate(timeout=60)
    finally:
        kill_group(proc)
    assert 2 <= waited < 20, waited  # the configured 3 s, not NCCL's 10 minutes
    assert proc.returncode != 0
    assert "another rank did not answer within train.collective_timeout_s" in stdout, stdout[-3000:]


# ------------------------------------------------------------------ 4. elastic resume keeps the schedule


def torchrun(nproc: int, argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "usjepa.train", *argv]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_continues_the_same_lr_curve(shards, teacher, tmp_path, before, after):
    common = ("optim.epochs=2", "train.ckpt_every_steps=0", "train.val_every_epochs=5")
    ref = tmp_path / "ref"  # one process, uninterrupted: lr at every eighth of an epoch
    assert train(args(shards, ref, teacher, *common)) == 0
    curve = {r["epoch_progress"]: r["lr"] for r in records(ref)}
    assert len(curve) == 16

    out = tmp_path / "run"
    first = args(shards, out, teacher, *common, "train.max_steps=3")
    torchrun(before, first) if before > 1 else train(first)
    rest = args(shards, out, teacher, *common) + ["--resume", "auto"]
    torchrun(after, rest) if after > 1 else train(rest)
    got = records(out)
    assert [r["step"] for r in got] == list(range(1, len(got) + 1))
    for r in got:  # every step, before and after the resume, sits on the uninterrupted run's curve
        assert r["lr"] == curve[r["epoch_progress"]], r
    assert got[3]["epoch_progress"] == got[2]["epoch_progress"] + before * 8 / 64  # no jump at the resume
    # ... to the same end: the last step of an uninterrupted run on `after` ranks, on the annealed tail
    assert got[-1]["epoch_progress"] == 2 - after * 8 / 64 and got[-1]["lr"] < 0.2 * max(curve.values())


# ----------------------------------------------------------------------- 5. config errors are one line


def _one_line_exit_2(capsys, argv) -> str:
    setup_logging(None, True)  # log to this test's stdout, not to an earlier test's closed capture
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("usjepa-train: error: "), err
    return err


@pytest.mark.parametrize("override,words", [
    ("model.predictor.depthh=3", "did you mean 'depth'"),
    ("model.decoder.mask_ration=0.5", "did you mean 'mask_ratio'"),
    ("model.arch=vit_nope", "unknown architecture 'vit_nope'"),
    ("optim.lr_peak=-1", "optim.lr_peak must be > 0"),
    ("optim.clip_grad=-1", "optim.clip_grad must be > 0"),
    ("data.loader.crop_scale=[2,3]", "data.loader.crop_scale must be in (0, 1]"),
    ("data.loader.num_workers=-1", "data.loader.num_workers must be >= 0"),
    ("masks.n_targetz=2", "did you mean 'n_targets'"),
    ("data.batch_size=100", "more than the 64 training samples"),
])
def test_config_errors_are_one_line_and_exit_2(shards, teacher, tmp_path, capsys, override, words):
    err = _one_line_exit_2(capsys, args(shards, tmp_path / "run", teacher, override))
    assert words in err, err
    assert not (tmp_path / "run").exists()  # refused before any write: no train.log, no lock, no folder


def test_broken_yaml_and_broken_manifest_are_one_line_and_exit_2(shards, teacher, tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("optim: {epochs: 2\n")
    err = _one_line_exit_2(capsys, [str(bad_yaml), "--out", str(tmp_path / "a")])
    assert "not valid YAML" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text('{"format_version": ')
    err = _one_line_exit_2(capsys, args(broken, tmp_path / "b", teacher))
    assert "not valid JSON" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # as a user runs it: the line once on stderr (logging's last-resort handler printed it a second time)
    proc = subprocess.run([sys.executable, "-m", "usjepa.train", str(bad_yaml), "--out", str(tmp_path / "c")],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("not valid YAML") == 1 and "not valid YAML" not in proc.stdout
    assert len(proc.stderr.splitlines()) == 1 and not (tmp_path / "c").exists(), proc.stderr


# --------------------------------------------------------------------------------- 6. honest messages


def test_nan_message_gives_a_resume_command_that_works(shards, tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    good = build_vit("vit_test_tiny")
    teacher_path = export_encoder_safetensors(good, tmp_path / "teacher.safetensors")
    out = tmp_path / "run"
    assert train(args(shards, out, teacher_path, "train.max_steps=4", "train.log_every=2")) == 0
    # The teacher's weights go bad under the same identity (resuming with another teacher file is refused:
    # tests/test_train.py), so that the loss, not the identity check, stops the run.
    sha = load_checkpoint(latest_checkpoint(out))["teacher_sha256"]
    monkeypatch.setattr("usjepa.train.file_sha256", lambda path: sha)
    poisoned = build_vit("vit_test_tiny")
    with torch.no_grad():
        poisoned.norm.weight.fill_(float("nan"))
    export_encoder_safetensors(poisoned, teacher_path)
    err = _one_line_exit_2(capsys, args(shards, out, teacher_path, "train.max_steps=8", "train.log_every=2")
                           + ["--resume", "auto"])
    argv = shlex.split(err.split("half the peak learning rate: ", 1)[1])
    assert argv[0] == "usjepa-train" and "--allow-changed" in argv and "--resume" in argv
    export_encoder_safetensors(good, teacher_path)  # the data is fixed; the suggested command, as printed, runs
    assert main(argv[1:]) == 0
    resumed = load_checkpoint(latest_checkpoint(out))
    assert resumed["step"] == 8 and resumed["config"]["optim"]["lr_peak"] == 5e-4  # tiny_cpu's 1e-3, halved


def test_refused_pickle_never_suggests_weights_only_false(shards, teacher, tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "PWNED"),)

    evil = tmp_path / "evil.pt"
    torch.save({"format": "usjepa-checkpoint", "x": Payload()}, evil)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(evil)
    assert "system" in str(e.value) and "weights_only" not in str(e.value)
    err = _one_line_exit_2(capsys, args(shards, tmp_path / "run", teacher) + ["--resume", str(evil)])
    assert "refused" in err and "weights_only" not in err
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------------ 7. two ingests into one --out


def test_second_ingest_into_the_same_out_says_locked_or_complete(tmp_path, monkeypatch):
    """The second run starts just as the first finishes (while it removes its work folder): it must say
    "locked" (or find the output complete), never fail on the folder vanishing under it, nor break the first."""
    import shutil

    from usjepa.ingest import pipeline
    from usjepa.ingest.pipeline import IngestError, IngestOptions, run_ingest
    from usjepa.ingest.sources import datasets_from_args
    from usjepa.ingest.synthetic import make_synthetic_corpus

    specs = datasets_from_args([str(make_synthetic_corpus(tmp_path / "raw", preset="tiny", seed=0))])
    out = tmp_path / "out"
    opts = IngestOptions(out=out, workers=1, progress=False)
    real_rmtree, second = shutil.rmtree, []

    def rmtree(path, *a, **kw):
        if Path(path) == out / pipeline.WORK_DIR / "part-0-of-1" and not second:
            second.append("started")
            try:
                second[0] = run_ingest(specs, opts)["timing"]
            except IngestError as e:
                second[0] = str(e)
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(pipeline.shutil, "rmtree", rmtree)
    first = run_ingest(specs, opts)
    assert first["summary"]["frames"] > 0
    assert "locked" in str(second[0]) or second[0].get("already_complete"), second
    assert run_ingest(specs, opts)["timing"]["already_complete"]


def test_cli_exits_with_mains_status_and_skips_native_teardown():
    """A finished process leaves without the interpreter's teardown (where a native library once aborted a
    finished torchrun rank): the status is main()'s, its output is flushed, and no exit handler runs."""
    code = ("import atexit, usjepa.train as t\n"
            "atexit.register(lambda: print('TEARDOWN RAN'))\n"
            "t.main = lambda: (print('trained', end=''), 3)[1]\n"
            "t.cli()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 3 and proc.stdout == "trained", (proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.slow
def test_a_rank_that_cannot_read_rank_0s_checkpoint_stops_every_rank(shards, teacher, tmp_path):
    """Two ranks on two "nodes" (each its own working folder, --out relative, as on node-local disks); the
    latest checkpoint is fine on rank 0's copy and truncated on rank 1's. Ranks that chose for themselves
    resumed from different steps (rank 1 fell back to an older one) or left rank 0 waiting; now rank 0 picks,
    rank 1 cannot read that file, and both stop at once with the same line."""
    import socket

    common = ("train.ckpt_every_steps=2", "train.keep_last=5", "train.collective_timeout_s=60")
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir()
    assert train(args(shards, node0 / "run", teacher, *common, "train.max_steps=4")) == 0
    import shutil

    shutil.copytree(node0 / "run", node1 / "run")
    broken = node1 / "run" / "checkpoints" / "step_00000004.pt"
    broken.write_bytes(broken.read_bytes()[:5000])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    try:
        for rank, node in enumerate((node0, node1)):
            env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port)}
            cmd = [sys.executable, "-m", "usjepa.train", *args(shards, Path("run"), teacher, *common), "--resume", "auto"]
            procs.append(subprocess.Popen(cmd, cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, start_new_session=True))
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            kill_group(p)
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 2, out[-2000:] + err[-2000:]
        assert err.strip().count("\n") == 0 and err.startswith("usjepa-train: error: rank 1 cannot read the "
                                                               "checkpoint rank 0 resumes from"), err
        assert "run/checkpoints/step_00000004.pt is corrupt or truncated" in err
    assert not list((node1 / "run" / "checkpoints").glob("*.unreadable"))  # only rank 0 sets files aside


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(node: Path, node_rank: int, port: int, argv: list[str]) -> subprocess.Popen:
    """One torchrun agent as one node of two (static rendezvous on 127.0.0.1), working in its own folder."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node_rank}",
           "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "usjepa.train", *argv]
    return subprocess.Popen(cmd, cwd=node, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finished_digests(output: str) -> set[str]:
    return {line.split("finished at ")[1] for line in output.splitlines() if "finished at step" in line}


@pytest.mark.slow
def test_two_nodes_without_a_shared_folder_resume_exactly_with_the_ranks_swapped(shards, teacher, tmp_path):
    """Issue 21: two torchrun agents, one per "node", each with its own --out (node-local disks, no shared
    filesystem). Both are SIGTERMed mid-run and relaunched with the node ranks swapped, so rank 0 lands on the
    node that never wrote a checkpoint. Before, that rank 0 started afresh while rank 1 resumed (gloo aborted
    on a collective mismatch); now the ranks agree on the newest checkpoint any node holds, its bytes go to
    the node that lacks it, and the run ends with the uninterrupted run's parameters, step for step."""
    common = ("optim.epochs=3", "train.ckpt_every_steps=2", "train.collective_timeout_s=60")
    ref = torchrun(2, args(shards, tmp_path / "ref", teacher, *common))  # uninterrupted, 2 ranks
    want = finished_digests(ref.stdout)
    assert len(want) == 1 and "step 12," in next(iter(want)), ref.stdout[-2000:]

    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for n in nodes:
        n.mkdir()
    argv = args(shards, Path("run"), teacher, *common) + ["--resume", "auto"]
    port = free_port()
    procs = [start_node(n, i, port, argv) for i, n in enumerate(nodes)]
    try:
        wait_for(lambda: (nodes[0] / "run" / "checkpoints" / "step_00000006.pt").is_file(), 180,
                 "rank 0 to write its checkpoint at step 6")
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.communicate(timeout=60)
    finally:
        for p in procs:
            kill_group(p)
    held = sorted(p.name for p in (nodes[0] / "run" / "checkpoints").glob("step_*.pt"))
    assert held and not (nodes[1] / "run" / "checkpoints").exists()  # only rank 0's node wrote
    assert records(nodes[0] / "run")[-1]["step"] < 12  # stopped mid-run

    port = free_port()
    procs = [start_node(n, 1 - i, port, argv) for i, n in enumerate(nodes)]  # rank 0 now on node1
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            kill_group(p)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    assert finished_digests(outputs[0]) | finished_digests(outputs[1]) == want
    assert f"resuming from {held[-1]} as read on rank 1; sent to rank(s) 0" in outputs[1]
    got = records(nodes[1] / "run")  # node1's folder continues the run's history: the steps before are there
    assert [r["step"] for r in got] == list(range(1, 13))
    assert latest_checkpoint(nodes[1] / "run").name == "step_00000012.pt"
    print("uninterrupted", want, "swapped resume", finished_digests(outputs[0]) | finished_digests(outputs[1]))
    assert (nodes[1] / "run" / "export" / "encoder_best.safetensors").is_file()


def test_a_forked_worker_does_not_keep_its_dead_parents_out_lock(tmp_path):
    """Loader workers are forked while the trainer holds --out's lock; a worker that outlives a SIGKILLed
    trainer (even briefly) kept the folder 'locked' for the resume. Forked children drop their copy."""
    lock = tmp_path / "train.lock"
    code = f"""
        import multiprocessing as mp, os, sys, time
        from usjepa.files import exclusive_lock
        with exclusive_lock({str(lock)!r}, RuntimeError("locked")):
            child = mp.get_context("fork").Process(target=time.sleep, args=(60,))
            child.start()
            print(child.pid, flush=True)
            os._exit(0)  # the holder dies without releasing; its forked child lives on
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=ENV, stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())  # (the child keeps the pipe open: read the line, do not wait for EOF)
    try:
        proc.wait(timeout=60)
        assert alive(child)
        from usjepa.files import exclusive_lock

        def free() -> bool:  # the child drops its copy in an at-fork hook, which a loaded machine may run late
            try:
                with exclusive_lock(lock, RuntimeError("still locked by the orphaned child")):
                    return True
            except RuntimeError:
                return False

        wait_for(free, 10, "the orphaned child to drop its copy of the lock")
        assert alive(child)  # ... while it still runs
    finally:
        os.kill(child, signal.SIGKILL)
        proc.stdout.close()
