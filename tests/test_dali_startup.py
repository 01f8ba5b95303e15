"""DALI loader start-up (issue 19): workers forked when the loader is built, before CUDA, and kept across passes;
a spawned worker (a dead one replaced once CUDA is up) gets a payload of a path and a few numbers and imports
no torch."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from usjepa.shards.loader import build_loader, dali_available
from usjepa.shards.synthetic_shards import write_synthetic_corpus
from usjepa.shards.worker_guard import pipeline_workers

pytestmark = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
REPO = Path(__file__).resolve().parents[1]
PIPE_BUFFER = 64 * 1024  # a larger spawn payload blocks Process.start() until the child has imported everything


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    # 1500 frames: the sample table alone (~52 B a frame) would be a 78 KB payload
    return write_synthetic_corpus(tmp_path_factory.mktemp("startup"), {"a": 1000, "b": 500}, size=(48, 64),
                                  per_shard=250, seed=3, val={"a": 40})


def test_spawn_payload_is_a_path_and_a_few_numbers(corpus):
    for split, holdout in (("train", 0.0), ("val", 0.0), ("val", 0.1)):
        loader = build_loader(corpus, split, 8, {"num_workers": 1}, None, 0, 1, "cpu", 0, "dali", holdout)
        source = loader._backend.source
        payload = pickle.dumps(source)
        assert len(payload) < PIPE_BUFFER // 8, (split, holdout, len(payload))
        reopened = pickle.loads(payload)  # what a spawned worker does: the same samples, from the path
        assert reopened._reader is None
        for i in (0, len(loader.table) - 1):
            assert reopened.reader.read(i) == source.reader.read(i)
        loader.close()


def test_workers_start_when_built_and_serve_every_pass(corpus):
    loader = build_loader(corpus, "val", 8, {"num_workers": 2, "cap": None}, None, 0, 1, "cpu", 0, "dali")
    workers = pipeline_workers(loader._backend._pipe)
    pids = [p.pid for p in workers]
    assert len(pids) == 2 and all(p.is_alive() for p in workers)  # started before the first batch
    for pid in pids:  # forked from this process (a spawned child would also be ours: check it maps torch)
        assert "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    loader.set_epoch(0)
    ref = [b.sample_ids.tolist() for b in loader]
    loader.set_epoch(0)
    it = iter(loader)
    first = next(it)  # a loop that breaks off after one batch ...
    del it
    rest = [b.sample_ids.tolist() for b in loader]  # ... the next iteration continues where it stopped
    assert len(ref) == 5 and [first.sample_ids.tolist()] + rest == ref
    loader.set_epoch(0)
    again = [b.images for b in loader]
    assert len(again) == len(ref)
    assert [p.pid for p in pipeline_workers(loader._backend._pipe)] == pids  # the same workers throughout
    loader.close()


SPAWNED = """
    import torch  # a trainer's main module imports torch: spawn must not re-import it into the workers
    import os, signal, sys

    def main():
        from usjepa.shards import dali_pipeline
        from usjepa.shards.loader import build_loader
        from usjepa.shards.worker_guard import pipeline_workers

        def maps():
            return [open(f"/proc/{{p.pid}}/maps").read() for p in pipeline_workers(loader._backend._pipe)]

        assert dali_pipeline.worker_start_method() == "fork"  # no CUDA here
        loader = build_loader({root!r}, "val", 8, {{"num_workers": 2, "cap": None}}, None, 0, 1, "cpu", 0, "dali")
        ref = [b.images for b in loader]
        print("forked workers mapping libtorch:", sum("libtorch" in m for m in maps()))
        dali_pipeline.worker_start_method = lambda: "spawn"  # what DALI's check answers once CUDA is up
        for p in pipeline_workers(loader._backend._pipe):  # both at once, as the OOM killer might
            os.kill(p.pid, signal.SIGKILL)
        for p in pipeline_workers(loader._backend._pipe):
            p.join()
        loader.set_epoch(0)
        again = [b.images for b in loader]  # the dead workers' replacements render the pass
        print("spawned workers mapping libtorch:", sum("libtorch" in m for m in maps()), "of", len(maps()))
        print("same batches:", len(again) == len(ref) and all(torch.equal(a, b) for a, b in zip(again, ref)))
        loader.close()

    if __name__ == "__main__":
        main()
"""


def test_replacement_workers_are_spawned_without_torch_and_render_the_same_batches(corpus, tmp_path):
    """The dead-worker replacement once CUDA is up (spawn), through the loader's real path: the new workers
    rebuild the source from the payload, do not re-run the trainer's main module, never load torch (read from
    /proc/PID/maps; the forked workers, which inherit this process's torch, are the control), and render the
    same batches."""
    script = tmp_path / "trainer.py"
    script.write_text(textwrap.dedent(SPAWNED.format(root=str(corpus))))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "forked workers mapping libtorch: 2" in proc.stdout, proc.stdout
    assert "spawned workers mapping libtorch: 0 of 2" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "same batches: True" in proc.stdout, proc.stdout


def test_dali_worker_modules_do_not_import_torch():
    code = ("import sys; import usjepa.shards.dali_pipeline, usjepa.shards.holdout, usjepa.kernels.block_masks; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]
