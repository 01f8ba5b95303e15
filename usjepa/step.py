"""The training step's set-up, kept out of ``usjepa/train.py``'s loop: which networks are compiled, and the
packed layout of a SALT batch (``usjepa.models.packing``)."""

from __future__ import annotations

import logging

import torch

from usjepa.models.salt import SaltPacking, plan_salt_packing

log = logging.getLogger("usjepa.train")


def compile_models(step_model, model, teacher, setting: bool | None, cuda: bool):
    """``train.compile`` (null = on CUDA, off on CPU) -> (step model, eval model, teacher), compiled or as
    given. The student + predictor compile once: the packed step has no per-batch shape (its packed lengths
    are symbolic). The teacher's forward runs under ``inference_mode`` (``salt_forward``)."""
    on = cuda if setting is None else setting
    if not on:
        return step_model, model, teacher
    log.info("torch.compile: student + predictor%s (first steps compile, then one graph)",
             " and teacher" if teacher is not None else "")
    return torch.compile(step_model), torch.compile(model), torch.compile(teacher) if teacher is not None else None


def salt_packing(batch, num_patches: int) -> SaltPacking:
    """The packed layout of a loader batch, from the lengths the loader counted on the host."""
    if batch.lengths is None:  # a batch made elsewhere: count them (a device sync on CUDA)
        lengths = ((batch.ctx_idx >= 0).sum(-1).cpu().numpy(), (batch.tgt_idx >= 0).sum(-1).cpu().numpy())
    else:
        lengths = batch.lengths
    return plan_salt_packing(batch.ctx_idx, batch.tgt_idx, *lengths, num_patches)
