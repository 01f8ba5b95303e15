"""Learning-rate and weight-decay schedules (paper Table 5), as pure functions of the global step.

Being functions of the step, they need no state of their own: a resumed run recomputes them in O(1) from
the step it restored, and the value at step s is the same whether or not the run was interrupted.
"""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, warmup_steps: int, start: float, peak: float, final: float) -> float:
    """Linear warm-up ``start -> peak`` over ``warmup_steps``, then cosine ``peak -> final`` at ``total_steps``."""
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wd_at(step: int, total_steps: int, start: float, final: float) -> float:
    """Cosine ``start -> final`` over the whole run (I-JEPA's weight-decay schedule: it grows)."""
    progress = min(1.0, step / max(1, total_steps))
    return final + (start - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_optimizer_hparams(optimizer, lr: float, wd: float) -> None:
    """Apply the step's values; groups flagged ``no_wd`` (biases, norms, tokens) keep weight decay 0."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = 0.0 if group.get("no_wd") else wd
