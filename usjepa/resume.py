"""Which checkpoint every rank resumes from, when the nodes do not share a filesystem.

The storage contract (docs/training.md, "Many nodes"): ``--out`` is a folder on each node. On a shared
filesystem every node sees the same folder; without one, each node has its own, and only the node that held
rank 0 wrote checkpoints into it. After a restart the launcher may put rank 0 on another node — one whose
folder holds an older checkpoint, or none. Each rank deciding alone then resumed from different steps (or
one started afresh), and the job aborted on a collective mismatch or, with other timing, diverged silently.

``resume_point`` makes every rank resume from the same file:

1. every rank lists the step checkpoints in its own ``--out`` (``--resume auto``) and the lists are gathered;
2. the newest name that any node holds is tried first, read on the first rank of a node that lists it (one
   read per folder, not per rank); an unreadable copy (truncated, corrupt) moves on to the next folder with that
   name and then to older names, a copy refused for its contents stops every rank;
3. every other rank reads its own copy of that file; a rank whose node lacks it (or whose copy was found
   unreadable in step 2) receives its bytes from the rank that read it, point to point over the process
   group; a rank whose copy is present but does not read back stops every rank with one line naming it;
4. when rank 0 received the file, it also receives that node's ``metrics.jsonl`` and ``best.pt``, and writes
   all three into its ``--out`` once the run is accepted (``usjepa.run_dir.take_out_dir``), so its folder
   continues the run's history: the next checkpoints, the exports and the metrics go on from there.

With a shared filesystem nothing is sent: every rank finds the file rank 0 reads. ``--resume PATH`` is read by
rank 0; ranks on nodes without that path receive it the same way.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch

from usjepa.checkpoint import (
    CheckpointError,
    CheckpointUnreadable,
    checkpoint_dir,
    list_step_checkpoints,
    load_checkpoint,
    pick_resume_checkpoint,
)

log = logging.getLogger(__name__)


@dataclass
class Handover:
    """Files rank 0 received because its node lacked the checkpoint: written into its ``--out`` by
    ``take_out_dir`` (``checkpoint`` under its own name; ``metrics``/``best`` only when the sender had them)."""

    name: str
    checkpoint: bytes
    metrics: bytes | None = None
    best: bytes | None = None


@dataclass
class ResumePoint:
    path: Path | None = None                     # the file resumed from, as named on the rank that read it
    state: dict | None = None                    # its contents (on every rank)
    unreadable: list[Path] = field(default_factory=list)  # this node's copies found unreadable (rank 0 sets them aside)
    handover: Handover | None = None             # rank 0 only, when its node lacked the file
    source_rank: int = 0                         # the rank whose node's copy every rank resumes from


def resume_point(resume: str | None, out_dir, rank: int, world: int, group=None) -> ResumePoint:
    """The checkpoint to resume from, the same on every rank (module docstring). ``group``: the process group
    to talk over (a gloo one on GPUs, before CUDA starts; None = the default). Every rank raises the same
    ``CheckpointError`` when any rank cannot go on."""
    if world == 1:
        path, state, unreadable = pick_resume_checkpoint(resume, out_dir)
        return ResumePoint(path, state, unreadable)
    import torch.distributed as dist

    out_dir = Path(out_dir)
    if resume == "auto":
        listed = [p.name for p in list_step_checkpoints(out_dir)]
        holdings: list = [None] * world  # (folder, names): ranks of one node and --out share a folder
        dist.all_gather_object(holdings, (f"{socket.gethostname()}:{out_dir.resolve()}", listed), group=group)
        if rank == 0 and not any(names for _, names in holdings):
            log.info("--resume auto: no checkpoint in %s on any node, starting a new run", out_dir)
        name, source, state, unreadable = _newest_readable(holdings, out_dir, rank, group)
        if name is None:
            return ResumePoint(unreadable=unreadable)
        mine = checkpoint_dir(out_dir) / name
        have = name in holdings[rank][1] and mine not in unreadable
    else:
        state, error = None, None
        if rank == 0:
            try:
                path, state, _ = pick_resume_checkpoint(resume, out_dir)
                resume = None if path is None else str(path)
            except CheckpointError as e:
                error = f"rank 0: {e}"
        choice = [resume, error]
        dist.broadcast_object_list(choice, src=0, group=group)
        if choice[1] is not None:
            raise CheckpointError(choice[1])
        if choice[0] is None:  # no --resume and nothing to resume in rank 0's --out
            return ResumePoint()
        mine, source, unreadable = Path(choice[0]), 0, []
        name, have = mine.name, mine.is_file()

    # every other rank: its own copy, or the bytes from `source`
    error = None
    if rank != source and have:
        try:
            state = load_checkpoint(mine)
        except CheckpointError as e:
            error = (f"rank {rank} cannot read the checkpoint rank {source} resumes from ({e}); "
                     f"stopping every rank")
    status: list = [None] * world
    dist.all_gather_object(status, (error, rank != source and not have), group=group)
    failed = [e for e, _ in status if e]
    if failed:
        raise CheckpointError(failed[0])
    receivers = [r for r, (_, needs) in enumerate(status) if needs]
    handover = _send_checkpoint(mine, name, source, receivers, rank, group)
    if handover is not None:
        state = load_checkpoint(f"{name} from rank {source}", data=handover.checkpoint)
        if rank != 0:
            handover = None
    if rank == 0 and receivers:
        log.info("resuming from %s as read on rank %d; sent to rank(s) %s, whose node lacked it or held a broken "
                 "copy", name, source, ", ".join(map(str, receivers)))
    return ResumePoint(mine if rank == source or have else Path(f"{name} (from rank {source})"), state, unreadable,
                       handover, source)


def _newest_readable(holdings: list, out_dir: Path, rank: int, group):
    """(name, source rank, state on the source, this node's unreadable copies) of the newest step checkpoint
    that reads back on some node; (None, 0, None, unreadable) when there is none."""
    import torch.distributed as dist

    mine = checkpoint_dir(out_dir)
    unreadable: list[Path] = []
    bad_copies = 0
    names = sorted({n for _, listed in holdings for n in listed}, reverse=True)
    for name in names:
        tried = set()
        for source, (folder, listed) in enumerate(holdings):
            if name not in listed or folder in tried:
                continue
            tried.add(folder)
            state, outcome = None, ["ok", ""]
            if rank == source:
                try:
                    state = load_checkpoint(mine / name)
                except CheckpointUnreadable as e:
                    log.warning("checkpoint %s is corrupt or truncated (%s); --resume auto falls back to another "
                                "copy or an older one", mine / name, e.reason)
                    outcome = ["unreadable", e.reason]
                except CheckpointError as e:
                    outcome = ["refused", f"rank {rank}: {e}"]
            dist.broadcast_object_list(outcome, src=source, group=group)
            if outcome[0] == "refused":
                raise CheckpointError(outcome[1])
            if outcome[0] == "ok":
                return name, source, state, unreadable
            bad_copies += 1
            if folder == holdings[rank][0]:
                unreadable.append(mine / name)
    if bad_copies:
        raise CheckpointError(f"no checkpoint in {mine} reads back on any node ({bad_copies} unreadable); start a new "
                              f"run in another --out, or move them away to start afresh in this one")
    return None, 0, None, unreadable


def _send_checkpoint(path: Path, name: str, source: int, receivers: list[int], rank: int, group
                     ) -> Handover | None:
    """Point to point from ``source`` to each receiver: the checkpoint's bytes, and to rank 0 also its node's
    ``metrics.jsonl`` and ``best.pt`` (an empty message when absent). The receivers get a ``Handover``."""
    if rank == source:
        checkpoint = path.read_bytes()
        for dst in receivers:
            _send_bytes(checkpoint, dst, group)
            if dst == 0:
                _send_bytes(_read_or_none(path.parents[1] / "metrics.jsonl"), dst, group)
                _send_bytes(_read_or_none(path.parent / "best.pt"), dst, group)
        return None
    if rank not in receivers:
        return None
    checkpoint = _recv_bytes(source, group)
    if rank != 0:
        return Handover(name, checkpoint)
    return Handover(name, checkpoint, _recv_bytes(source, group), _recv_bytes(source, group))


def _read_or_none(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _send_bytes(blob: bytes | None, dst: int, group) -> None:
    import torch.distributed as dist

    size = -1 if blob is None else len(blob)
    dist.send(torch.tensor([size], dtype=torch.int64), dst, group=group)
    if size > 0:
        dist.send(torch.frombuffer(bytearray(blob), dtype=torch.uint8), dst, group=group)


def _recv_bytes(src: int, group) -> bytes | None:
    import torch.distributed as dist

    size = torch.zeros(1, dtype=torch.int64)
    dist.recv(size, src, group=group)
    if size.item() < 0:
        return None
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    if data.numel():
        dist.recv(data, src, group=group)
    return data.numpy().tobytes()
