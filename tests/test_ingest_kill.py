"""Kill test: SIGKILL a real ``usjepa-ingest run`` process in each phase, restart it, and prove the final
shards hold every frame exactly once — same count and content hashes as an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from usjepa.ingest.verify import verify_corpus
from usjepa.shards.format import iter_tar_samples, load_manifest

N_VIDEOS, N_FRAMES = 14, 16


def _make_videos(root: Path) -> None:
    rng = np.random.default_rng(0)
    h, w = 240, 320
    for i in range(N_VIDEOS):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        vw = cv2.VideoWriter(str(d / f"clip_{i:02d}.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (w, h))
        for _ in range(N_FRAMES):
            f = np.zeros((h, w), np.uint8)
            f[20:220, 40:280] = rng.integers(30, 255, (200, 240), dtype=np.uint8)  # scan area, black border
            vw.write(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR))
        vw.release()


def _cmd(src: Path, out: Path, workers: int = 1) -> list[str]:
    return [sys.executable, "-m", "usjepa.ingest.cli", "run", str(src), "--out", str(out), "--workers", str(workers),
            "--shard-size", "60KB", "--quiet"]


def _done_tasks(out: Path) -> int:
    tasks = out / ".ingest-work" / "part-0-of-1" / "tasks"
    return sum(1 for p in tasks.iterdir() if ".tmp." not in p.name) if tasks.is_dir() else 0


def _journalled_shards(out: Path) -> int:
    work = out / ".ingest-work" / "part-0-of-1"
    return sum(len(p.read_text().splitlines()) for p in work.glob("shards-*.jsonl")) if work.is_dir() else 0


def _kill_when(cmd: list[str], ready, timeout: float = 60.0) -> bool:
    """Start cmd, SIGKILL it as soon as ready() holds; True if it was killed midway (not finished)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    t0 = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            if ready():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return proc.returncode == -signal.SIGKILL
            time.sleep(0.002)
        assert proc.poll() is not None, "ingest did not finish in time"
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _content(root: Path) -> list[tuple[str, str, str]]:
    out = []
    for s in load_manifest(root)["shards"]:
        for key, m in iter_tar_samples(s["abs_path"]):
            out.append((key, hashlib.sha256(m["jpg"]).hexdigest(), hashlib.sha256(m["mask.png"]).hexdigest()))
    return out


@pytest.mark.slow
def test_sigkill_and_resume_loses_and_duplicates_nothing(tmp_path):
    src = tmp_path / "raw"
    _make_videos(src)
    ref, out = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_cmd(src, ref), check=True, stdout=subprocess.DEVNULL)

    # 1: killed while workers spill frames (some tasks done, not all)
    assert _kill_when(_cmd(src, out), lambda: _done_tasks(out) >= 3)
    assert 3 <= _done_tasks(out) < N_VIDEOS and not (out / "manifest.json").exists()
    # 2: restarted, killed again while shards are being written
    assert _kill_when(_cmd(src, out), lambda: _journalled_shards(out) >= 2)
    assert not (out / "manifest.json").exists()
    # 3: restarted with two workers, runs to the end: resuming does not depend on the worker count
    done = subprocess.run(_cmd(src, out, workers=2), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not (out / ".ingest-work").exists()  # spills and journals cleaned up
    assert not list(out.glob("*.tmp"))

    want, got = _content(ref), _content(out)
    assert len(got) == len(set(k for k, _, _ in got)) == N_VIDEOS * N_FRAMES  # every frame exactly once
    assert sorted(got) == sorted(want)  # same frames, same bytes
    # and, since the shuffle depends on the keys alone, byte-identical shards
    assert [(s["path"], s["sha256"]) for s in load_manifest(out)["shards"]] == \
           [(s["path"], s["sha256"]) for s in load_manifest(ref)["shards"]]
    assert verify_corpus(out) == []
