"""What a training run owns in its ``--out``, and when it starts writing there.

Nothing is written into ``--out`` until every check that can refuse the run has passed (config, data, models,
the checkpoint to resume): a refused run leaves the folder as it found it. Then rank 0 ``take_out_dir``:

* takes ``<out>/train.lock`` (``usjepa.files.exclusive_lock``, the lock ``usjepa-ingest`` takes on its
  output) and holds it to the end of the run, so a second trainer into the same folder stops with one line
  instead of interleaving ``metrics.jsonl`` and racing for checkpoints. When the folder exists already, rank 0
  takes the lock at the start instead (``lock_out_dir``), before it reads the checkpoints another writer could
  be pruning; a refused run removes the lock file again, so the folder is left as it was;
* opens ``train.log`` and writes into it what was logged before (kept in memory until then);
* sets aside the checkpoints that ``--resume auto`` found unreadable (``usjepa.checkpoint``);
* cuts ``metrics.jsonl`` back to the step it resumes from, so the steps it replays are not listed twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import sys
from pathlib import Path

from usjepa.checkpoint import checkpoint_dir, set_aside_unreadable
from usjepa.files import atomic_path, exclusive_lock
from usjepa.resume import Handover

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"
METRICS_NAME = "metrics.jsonl"
LOG_NAME = "train.log"
# ``log.error(..., extra=FILE_ONLY)``: for train.log only; the console already has it as one line on stderr.
FILE_ONLY = {"file_only": True}

# Until setup_logging runs, records of usjepa.* go nowhere rather than to logging's last-resort stderr handler
# (which printed a broken-YAML error a second time beside the one-line message).
logging.getLogger("usjepa").addHandler(logging.NullHandler())


class OutDirLocked(RuntimeError):
    """Another trainer is writing this ``--out`` now."""


def lock_out_dir(out_dir: Path, held: contextlib.ExitStack) -> bool:
    """Lock ``out_dir`` for as long as ``held`` is open, or raise ``OutDirLocked``; returns True."""
    held.enter_context(exclusive_lock(out_dir / LOCK_NAME, OutDirLocked(
        f"locked: another usjepa-train is writing {out_dir} now ({out_dir / LOCK_NAME}); wait for it to end, "
        f"or choose another --out")))
    return True


def take_out_dir(out_dir: Path, held: contextlib.ExitStack, locked: bool, resumed_step: int, mid_epoch: bool,
                 unreadable: list[Path], handover: Handover | None = None) -> None:
    """Rank 0, once the run is accepted: lock ``out_dir`` unless ``locked`` already, open ``train.log``, set
    aside ``unreadable`` checkpoints, write the ``handover`` from another node (``usjepa.resume``) and cut
    ``metrics.jsonl`` back to ``resumed_step`` (``mid_epoch``: the checkpoint was written before that step's
    end-of-epoch validation, which the run does again)."""
    if not locked:
        lock_out_dir(out_dir, held)
    attach_log_file(out_dir)
    set_aside_unreadable(unreadable)
    if handover is not None:
        write_handover(out_dir, handover)
    truncate_metrics(out_dir / METRICS_NAME, resumed_step, validated=not mid_epoch)


def write_handover(out_dir: Path, handover: Handover) -> None:
    """The checkpoint this node lacked, and the sending node's ``metrics.jsonl`` and ``best.pt``, which
    supersede this folder's older ones (its own checkpoints stay, older than the one resumed from)."""
    ckpt_dir = checkpoint_dir(out_dir)
    files = [(ckpt_dir / handover.name, handover.checkpoint), (ckpt_dir / "best.pt", handover.best),
             (out_dir / METRICS_NAME, handover.metrics)]
    for path, data in files:
        if data is not None:
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
            log.info("wrote %s (%d bytes) as received from the node that held the checkpoint", path, len(data))


def truncate_metrics(path: Path, step: int, validated: bool = True) -> int:
    """Keep the records of ``path`` up to ``step`` (the checkpoint the run resumes from; 0 for a fresh start)
    and drop the later ones, which the resumed run writes again, and a last line cut short by a kill. A
    ``val`` record at ``step`` itself goes too unless ``validated`` (a checkpoint saved at an epoch's last
    step before its validation: the resumed run validates that epoch again). Atomic; returns how many lines
    were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            at = int(record["step"])
            keep = at < step or (at == step and (validated or record.get("kind") != "val"))
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill, or not ours
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))
        log.info("%s: dropped %d line(s) after step %d, which this run writes again", path, dropped, step)
    return dropped


def setup_logging(out_dir: Path | None, master: bool) -> None:
    """Console logging (INFO on rank 0, warnings elsewhere). ``train.log`` in ``out_dir`` at once, or, with
    ``out_dir`` None on rank 0, later (``attach_log_file``): what is logged until then is kept in memory."""
    root = logging.getLogger("usjepa")
    root.setLevel(logging.INFO if master else logging.WARNING)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    console.addFilter(lambda record: not getattr(record, "file_only", False))
    root.addHandler(console)
    if out_dir is not None:
        attach_log_file(out_dir)
    elif master:
        root.addHandler(logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1))
    root.propagate = False


def attach_log_file(out_dir: Path) -> None:
    """Append the log to ``out_dir/train.log`` from now on, starting with what was kept in memory."""
    root = logging.getLogger("usjepa")
    out_dir.mkdir(parents=True, exist_ok=True)
    file = logging.FileHandler(out_dir / LOG_NAME)
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    for h in list(root.handlers):
        if isinstance(h, logging.handlers.MemoryHandler):
            h.setTarget(file)
            h.flush()
            root.removeHandler(h)
            h.close()
    root.addHandler(file)
