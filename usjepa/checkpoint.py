"""Training checkpoints: atomic writes, last-K retention plus ``best.pt``, and loads that fail loudly.

A checkpoint is one torch file (read back with ``weights_only=True``: tensors, numbers, strings, lists and
dicts only) holding everything an exact resume needs::

    {"format": "usjepa-checkpoint", "version": 1, "stage", "step", "epoch", "world_size",
     "encoder": student / stage-1 encoder state dict (timm keys; ``usjepa.models.load_encoder`` reads it),
     "encoder_arch": ViTConfig as a dict,
     "head": predictor (stage 2) or decoder (stage 1) state dict,
     "optimizer", "sampler": the loader's state, "rng": every generator, "best_val", "val_loss", "config"}

Files live in ``<out_dir>/checkpoints/``: ``step_00001234.pt`` (every N steps and at every epoch end, the last
K kept) and ``best.pt`` (a hard link to the step file with the lowest validation loss, so it costs no
second write). Writes go to a temporary file that is fsynced and renamed, so a crash mid-write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from usjepa.files import atomic_path, fsync_dir
from usjepa.models.loading import refused_pickle_reason

FORMAT = "usjepa-checkpoint"
VERSION = 1
log = logging.getLogger(__name__)
_STEP_RE = re.compile(r"^step_(\d{8})\.pt$")

# Config sections that must match for a resume to continue the same run (train.* may change freely).
RESUME_MUST_MATCH = ("stage", "seed", "model", "optim", "masks", "data.batch_size", "data.val_from_train")
# ...except file locations, which move between machines (a changed teacher *path* is logged, not refused).
RESUME_MAY_MOVE = ("model.teacher",)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or from a different run than the one being resumed."""


class CheckpointUnreadable(CheckpointError):
    """A checkpoint whose bytes cannot be read back (truncated, corrupt, I/O error): not a refusal of its
    contents, so ``--resume auto`` may fall back to an older one."""

    def __init__(self, path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"checkpoint {path} is corrupt or truncated ({reason}); resume from an older one "
                         f"explicitly with --resume PATH")


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def step_path(out_dir, step: int) -> Path:
    return checkpoint_dir(out_dir) / f"step_{step:08d}.pt"


def list_step_checkpoints(out_dir) -> list[Path]:
    d = checkpoint_dir(out_dir)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if _STEP_RE.match(p.name)), key=lambda p: p.name)


def latest_checkpoint(out_dir) -> Path | None:
    found = list_step_checkpoints(out_dir)
    return found[-1] if found else None


def save_atomic(state: dict, path: str | os.PathLike) -> Path:
    """torch.save to ``<path>.tmp``, fsync, rename over ``path`` (``usjepa.files.atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
    return Path(path)


def save_checkpoint(state: dict, out_dir, keep_last: int, is_best: bool = False) -> Path:
    """Write ``step_<step>.pt`` atomically, refresh ``best.pt`` if asked, then drop all but the last K."""
    state = {"format": FORMAT, "version": VERSION, **state}
    path = save_atomic(state, step_path(out_dir, int(state["step"])))
    if is_best:
        best = checkpoint_dir(out_dir) / "best.pt"
        tmp = best.with_name("best.pt.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:  # file systems without hard links
            save_atomic(state, tmp)
        os.replace(tmp, best)
        fsync_dir(best.parent)
    for old in list_step_checkpoints(out_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, data: bytes | None = None) -> dict:
    """Read and validate a checkpoint; anything wrong is a ``CheckpointError`` that says what and where.
    ``data``: the file's bytes, received from another node (``usjepa.resume``); ``path`` then only names it."""
    path = Path(path)
    if data is None and not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (refusing to start from scratch instead)")
    try:
        state = torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own text goes on to suggest weights_only=False, i.e. running the file's code: never say that
        raise CheckpointError(
            f"checkpoint {path} was refused: {refused_pickle_reason(e)}; usjepa never writes such files, so it is "
            f"not one of ours or has been tampered with"
        ) from None
    except Exception as e:
        raise CheckpointUnreadable(path, f"{type(e).__name__}: {str(e)[:200]}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a usjepa training checkpoint (no format={FORMAT!r} field)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}, this code reads {VERSION}")
    missing = [k for k in ("stage", "step", "epoch", "encoder", "head", "optimizer", "sampler", "rng", "config")
               if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}")
    return state


def load_latest_readable(out_dir) -> tuple[Path | None, dict | None, list[Path]]:
    """``--resume auto``: (path, state) of the newest step checkpoint in ``out_dir`` that reads back, and the
    newer ones that did not (truncated by a full disk, a lost node mid-copy, ...), each with a warning. A
    checkpoint refused for its *contents* (foreign, tampered, other version) stops the search: falling back
    past it would hide a problem that is not an accident. (None, None, []) when there is no checkpoint."""
    unreadable = []
    for path in reversed(list_step_checkpoints(out_dir)):
        try:
            state = load_checkpoint(path)
        except CheckpointUnreadable as e:
            log.warning("checkpoint %s is corrupt or truncated (%s); --resume auto falls back to the one "
                        "before it", path, e.reason)
            unreadable.append(path)
            continue
        return path, state, unreadable
    if unreadable:
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(out_dir)} reads back ({len(unreadable)} "
                              f"unreadable: {', '.join(p.name for p in unreadable)}); start a new run in another "
                              f"--out, or move them away to start afresh in this one")
    return None, None, []


def pick_resume_checkpoint(resume: str | None, out_dir) -> tuple[Path | None, dict | None, list[Path]]:
    """(path, state, unreadable newer checkpoints) for ``--resume`` ``resume`` (None, 'auto' or a path)."""
    if resume == "auto":
        path, state, unreadable = load_latest_readable(out_dir)
        if path is None:
            log.info("--resume auto: no checkpoint in %s, starting a new run", out_dir)
        return path, state, unreadable
    if resume:
        return Path(resume), load_checkpoint(resume), []
    if latest_checkpoint(out_dir) is not None:
        raise CheckpointError(f"{out_dir} already holds checkpoints; pass --resume auto to continue that run "
                              f"or choose another --out")
    return None, None, []


def set_aside_unreadable(paths: list[Path]) -> None:
    """Rename unreadable checkpoints to ``<name>.unreadable``: kept for a look, but no longer the "latest"
    (which the finished run, retention and the next ``--resume auto`` would otherwise trip over)."""
    for path in paths:
        if path.exists():
            path.rename(path.with_name(path.name + ".unreadable"))
            log.warning("set aside unreadable checkpoint %s as %s.unreadable", path, path.name)
    if paths:
        fsync_dir(paths[0].parent)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def check_resume_compatible(saved_cfg: dict, cfg: dict, path, allow_changed=()) -> None:
    """The run being resumed must be the same run: same model, optimiser schedule, masks, seed, batch. Keys
    named in ``allow_changed`` (or under one, e.g. ``optim``) may differ: asked for explicitly, then logged."""
    a, b = _flatten(saved_cfg), _flatten(cfg)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_MAY_MOVE or any(key == k or key.startswith(k + ".") for k in allow_changed):
            if a.get(key) != b.get(key):
                log.warning("resuming with %s = %r (the checkpoint used %r)", key, b.get(key), a.get(key))
            continue
        if any(key == m or key.startswith(m + ".") for m in RESUME_MUST_MATCH):
            if _norm(a.get(key, "<absent>")) != _norm(b.get(key, "<absent>")):
                diffs.append(f"{key}: checkpoint {a.get(key, '<absent>')!r} vs config {b.get(key, '<absent>')!r}")
    if diffs:
        raise CheckpointError(f"checkpoint {path} was written by a different configuration:\n  " + "\n  ".join(diffs)
                              + "\n  (to continue it with these changes anyway, pass --allow-changed KEY for each)")


# ----------------------------------------------------------------------------------------------- RNG


def capture_rng() -> dict:
    np_state = np.random.get_state()
    rng = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def restore_rng(rng: dict) -> None:
    random.setstate(_tuplify(rng["python"]))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x
