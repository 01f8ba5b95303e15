"""Ingest under the faults of issue 20, on real files made here: a disk that fills up while ingest writes
(spills or shards), symlinked and unreadable source folders, a PNG past Pillow's bomb limit, mask folders,
a video shorter than its header says, and native decoder messages on stderr."""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from usjepa.ingest import pipeline
from usjepa.ingest.cli import EXIT_FAILED, EXIT_OK, main
from usjepa.shards import format as shard_format
from usjepa.shards.format import iter_tar_samples, load_manifest


def _scan(h: int, w: int, seed: int) -> np.ndarray:
    """A frame with a textured scan area inside a black border (what the USrc mask expects)."""
    rng = np.random.default_rng(seed)
    f = np.zeros((h, w), np.uint8)
    f[h // 10 : h - h // 10, w // 8 : w - w // 8] = rng.integers(30, 255, (h - 2 * (h // 10), w - 2 * (w // 8)))
    return f


def _make_corpus(root: Path) -> Path:
    for i in range(6):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(d / f"still_{i}.png"), _scan(120, 160, i))
    vw = cv2.VideoWriter(str(root / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (160, 120))
    for k in range(8):
        vw.write(cv2.cvtColor(_scan(120, 160, 100 + k), cv2.COLOR_GRAY2BGR))
    vw.release()
    return root


def _corpus_content(out: Path) -> tuple[list[str], dict[str, str]]:
    """Sorted sample keys and {shard: sha256} of a finished corpus."""
    m = load_manifest(out)
    keys = sorted(k for s in m["shards"] for k, _ in iter_tar_samples(Path(s["abs_path"])))
    return keys, {s["path"]: s["sha256"] for s in m["shards"]}


class _DiskFull:
    """Every file that ingest (pipeline.py) or ShardWriter (format.py) opens for writing shares ``budget``
    bytes; the write that crosses it writes what fits and fails with ENOSPC, as a full disk does."""

    def __init__(self, budget: int):
        self.left = budget

    def open(self, file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)
        return _FillingFile(f, self) if any(c in mode for c in "wax+") else f


class _FillingFile:
    def __init__(self, f, disk: _DiskFull):
        self._f, self._disk = f, disk

    def write(self, b):
        n = len(memoryview(b).cast("B")) if not isinstance(b, str) else len(b.encode())
        if n > self._disk.left:
            self._f.write(b[: self._disk.left])
            self._disk.left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.left -= n
        return self._f.write(b)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("phase", ["spills", "shards"])
def test_disk_full_stops_with_one_line_and_the_resume_ends_with_every_frame(tmp_path, monkeypatch, capsys, phase):
    src = _make_corpus(tmp_path / "src")
    args = ["--workers", "1", "--quiet", "--shard-size", "40KB"]
    clean = tmp_path / "clean"
    assert main(["run", str(src), "--out", str(clean), *args]) == EXIT_OK
    keys, shards = _corpus_content(clean)
    payload = sum(s["bytes"] for s in load_manifest(clean)["shards"])
    capsys.readouterr()

    # phase 1 writes about `payload` bytes of spills, phase 2 as much again in shards
    disk = _DiskFull(payload // 3 if phase == "spills" else payload * 4 // 3)
    monkeypatch.setattr(pipeline, "open", disk.open, raising=False)
    monkeypatch.setattr(shard_format, "open", disk.open, raising=False)
    out = tmp_path / "out"
    assert main(["run", str(src), "--out", str(out), *args]) == EXIT_FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "No space left on device (ENOSPC)" in err[0], err
    assert not (out / "manifest.json").exists()
    tasks = out / ".ingest-work" / "part-0-of-1" / "tasks"
    done = [p for p in tasks.iterdir() if ".tmp." not in p.name]
    assert len(done) == (2 if phase == "shards" else 0)  # 2 tasks: the stills, the clip

    monkeypatch.undo()  # space freed: the same command resumes
    assert main(["run", str(src), "--out", str(out), *args]) == EXIT_OK
    m = load_manifest(out)
    assert m["skipped"] == [] and m["summary"]["frames"] == len(keys)
    assert _corpus_content(out) == (keys, shards)  # exactly the frames (and bytes) of the uninterrupted run
