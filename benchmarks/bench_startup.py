"""Time from ``build_loader`` to the first batch: the DALI loader with as many workers as a GPU node has cores.

    python -m benchmarks.bench_startup --out benchmarks/results            # 16 workers, 2 rounds (~2 min on 2 cores)
    python benchmarks/bench_startup.py --out DIR                           # from another checkout's root: its code

Every figure comes from a fresh interpreter (a trainer starting), on the DALI CPU backend, batch 64, 320²
synthetic frames, in three cases:

* ``fork``: workers forked, as the trainer starts them on a GPU node (before CUDA) and on a CPU;
* ``fork, empty Numba cache``: the same with ``NUMBA_CACHE_DIR`` pointing at an empty folder (a fresh
  install's first run: the block-mask kernel compiles);
* ``spawn``: workers spawned, what DALI must do once CUDA is up in the process (a replacement for a dead
  worker, or a loader built after CUDA).

The interpreter's own ``usjepa`` is measured, so the same file run from an older checkout's root with that
checkout's environment measures the older code (``build_pipeline``'s start method is forced the same way in
both): that is how the before/after in docs/data.md was taken. Its ratio is spawn against fork in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = (("fork", "fork", False), ("fork_cold_numba", "fork", True), ("spawn", "spawn", False))


def first_batch_child(method: str, root: str, workers: int, batch: int) -> None:
    """In a fresh interpreter: build the loader with ``method`` forced, take one batch, print the times."""
    from usjepa.shards import dali_pipeline

    build_pipeline = dali_pipeline.build_pipeline

    def forced(source, batch_size, cfg, device_id, start_method="fork"):
        return build_pipeline(source, batch_size, cfg, device_id, method)

    dali_pipeline.build_pipeline = forced
    from usjepa.shards.loader import build_loader

    t0 = time.perf_counter()
    loader = build_loader(root, "train", batch, {"num_workers": workers, "cap": None}, None, 0, 1, "cpu", 0, "dali")
    t1 = time.perf_counter()
    loader.set_epoch(0)
    next(iter(loader))
    t2 = time.perf_counter()
    loader.close()
    print(json.dumps({"build_s": t1 - t0, "first_batch_s": t2 - t0}))


def measure(method: str, cold: bool, root: Path, workers: int, batch: int, tmp: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if cold:
        env["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="numba_", dir=tmp)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, str(root), str(workers), str(batch)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{method}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        method, root, workers, batch = sys.argv[2:6]
        first_batch_child(method, root, int(workers), int(batch))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--frames", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args(argv)
    sys.path.insert(0, str(Path.cwd()))  # run as a file from a checkout's root: that checkout's benchmarks/usjepa
    from benchmarks.common import hardware, save_result, utc_now
    from usjepa.shards.synthetic_shards import write_synthetic_corpus

    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        tmp = Path(tmp)
        root = tmp / "shards"
        write_synthetic_corpus(root, {"a": a.frames // 2, "b": a.frames - a.frames // 2}, size=(320, 320),
                               per_shard=64)
        measure("fork", False, root, a.workers, a.batch_size, tmp)  # the corpus table and Numba cache, once
        rounds = []
        for r in range(a.rounds):  # interleaved, so that the machine's drift falls on every case
            rounds.append({name: measure(method, cold, root, a.workers, a.batch_size, tmp)
                           for name, method, cold in CASES})
            print(f"round {r}: " + ", ".join(f"{k} {v['first_batch_s']:.1f} s" for k, v in rounds[-1].items()),
                  flush=True)
    res = {"benchmark": "startup", "hardware": hardware(), "time": utc_now(), "workers": a.workers,
           "batch_size": a.batch_size, "frames": a.frames, "rounds": rounds,
           "median_first_batch_s": {name: statistics.median(r[name]["first_batch_s"] for r in rounds)
                                    for name, _, _ in CASES}}
    med = res["median_first_batch_s"]
    res["ratio_spawn_vs_fork"] = med["spawn"] / med["fork"]
    hw = res["hardware"]
    md = ("| hardware | workers | fork | fork, empty Numba cache | spawn | spawn / fork |\n|---|---|---|---|---|---|\n"
          f"| {hw['cpu']}, {hw['cores']} cores | {a.workers} | {med['fork']:.1f} s | {med['fork_cold_numba']:.1f} s | "
          f"{med['spawn']:.1f} s | {res['ratio_spawn_vs_fork']:.1f}× |")
    save_result(a.out, "bench_startup", res, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
