"""Learning-rate and weight-decay schedules (paper Table 5), as pure functions of training progress in epochs.

Progress is ``epoch + samples of this epoch already seen / samples per epoch`` (``epoch_progress``), not the
step count: steps per epoch depend on the world size, progress does not. A run resumed on another number of
ranks therefore continues the same curve to the same end (the value at a given point of the data is the same
whatever the world size, and whether or not the run was interrupted), and a resume needs no schedule state.
"""

from __future__ import annotations

import math


def epoch_progress(epoch: int, samples_seen: int, samples_per_epoch: int) -> float:
    """Training progress in epochs before the next step: ``epoch`` plus the fraction of it already seen."""
    return epoch + samples_seen / max(1, samples_per_epoch)


def lr_at(progress: float, epochs: float, warmup_epochs: float, start: float, peak: float, final: float) -> float:
    """Linear warm-up ``start -> peak`` over ``warmup_epochs``, then cosine ``peak -> final`` at ``epochs``."""
    if progress < warmup_epochs:
        return start + (peak - start) * progress / warmup_epochs
    span = epochs - warmup_epochs
    t = min(1.0, (progress - warmup_epochs) / span) if span > 0 else 1.0
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def wd_at(progress: float, epochs: float, start: float, final: float) -> float:
    """Cosine ``start -> final`` over the whole run (I-JEPA's weight-decay schedule: it grows)."""
    t = min(1.0, progress / epochs) if epochs > 0 else 1.0
    return final + (start - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_optimizer_hparams(optimizer, lr: float, wd: float) -> None:
    """Apply the step's values; groups flagged ``no_wd`` (biases, norms, tokens) keep weight decay 0."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = 0.0 if group.get("no_wd") else wd
