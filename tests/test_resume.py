"""usjepa.resume: every rank resumes from the same checkpoint when each node has its own --out.

Two real gloo processes, each with its own folder, small real checkpoint files; the full training path (two
torchrun agents, SIGTERM, ranks swapped) is in tests/test_faults.py."""

from __future__ import annotations

import multiprocessing as mp
import traceback
from pathlib import Path

import pytest
import torch

from usjepa.checkpoint import save_checkpoint


def fake_state(step: int) -> dict:
    return {"stage": 2, "step": step, "epoch": 0, "encoder": {"w": torch.full((3,), float(step))}, "head": {},
            "optimizer": {}, "sampler": {}, "rng": {}, "config": {"seed": 0}}


def rank_main(rank: int, store: str, folders: list[str], queue) -> None:
    import torch.distributed as dist

    from usjepa.resume import resume_point
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
        got = resume_point("auto", folders[rank], rank, 2)
        h = got.handover
        queue.put((rank, None, got.state["step"] if got.state else None, float(got.state["encoder"]["w"][0])
                   if got.state else None, [p.name for p in got.unreadable], got.source_rank,
                   None if h is None else (h.name, len(h.checkpoint), h.metrics, h.best is not None)))
        dist.destroy_process_group()
    except Exception:
        queue.put((rank, traceback.format_exc(), None, None, None, None, None))


def run_two(tmp_path: Path, folders: list[Path]) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, str(tmp_path / "store"), [str(f) for f in folders], queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, *rest = queue.get(timeout=120)
            results[rank] = rest
    finally:
        for p in procs:
            p.join(timeout=30)
            p.kill()
    return results


@pytest.mark.slow
def test_newest_copy_on_any_node_wins_and_rank_0_receives_it_with_the_history(tmp_path):
    """Rank 0's folder: step 2, and step 4 cut short (a disk filled mid-write). Rank 1's folder: a good step 4,
    its metrics and best.pt. Everyone resumes from rank 1's step 4; rank 0 gets the bytes, the metrics and
    best.pt to write, and sets its broken copy aside."""
    a, b = tmp_path / "node0", tmp_path / "node1"
    save_checkpoint(fake_state(2), a, keep_last=5)
    broken = save_checkpoint(fake_state(4), a, keep_last=5)
    broken.write_bytes(broken.read_bytes()[:300])
    save_checkpoint(fake_state(2), b, keep_last=5)
    save_checkpoint(fake_state(4), b, keep_last=5, is_best=True)
    (b / "metrics.jsonl").write_text('{"kind": "train", "step": 4}\n')

    res = run_two(tmp_path, [a, b])
    for rank in (0, 1):
        assert res[rank][0] is None, res[rank][0]
        assert res[rank][1:3] == [4, 4.0] and res[rank][4] == 1  # step 4 as read on rank 1, on both ranks
    assert res[0][3] == ["step_00000004.pt"] and res[1][3] == []  # rank 0 sets its broken copy aside
    name, size, metrics, best = res[0][5]
    assert name == "step_00000004.pt" and size == (b / "checkpoints" / name).stat().st_size
    assert metrics == b'{"kind": "train", "step": 4}\n' and best
    assert res[1][5] is None


@pytest.mark.slow
def test_no_readable_checkpoint_on_any_node_stops_both_and_none_at_all_starts_fresh(tmp_path):
    a, b = tmp_path / "node0", tmp_path / "node1"
    res = run_two(tmp_path / "fresh", [a, b])  # neither folder exists: a new run on both ranks
    assert all(res[r][0] is None and res[r][1] is None for r in (0, 1)), res

    for folder in (a, b):  # cut short on both nodes
        path = save_checkpoint(fake_state(4), folder, keep_last=5)
        path.write_bytes(path.read_bytes()[:300])
    res = run_two(tmp_path / "broken", [a, b])
    for rank in (0, 1):
        assert "no checkpoint in" in res[rank][0] and "reads back on any node (2 unreadable)" in res[rank][0]
