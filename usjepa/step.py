"""The training step's parts, kept out of ``usjepa/train.py``'s loop: which networks are compiled, the packed
layout of a SALT batch (``usjepa.models.packing``), and the update after the forward. The benchmarks' compute-only
step is built from the same parts, so the ceiling they measure is the trainer's own step."""

from __future__ import annotations

import contextlib
import logging
import math

import numpy as np
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
    return torch.compile(step_model), torch.compile(model), compile_teacher(teacher) if teacher is not None else None


def compile_teacher(teacher, **compile_kwargs):
    """The teacher is called through ``patch_tokens`` (``salt_forward``), which ``torch.compile(teacher)`` would
    leave eager (it compiles ``forward``): compile that method, on the module itself."""
    teacher.patch_tokens = torch.compile(teacher.patch_tokens, **compile_kwargs)
    return teacher


def adamw_param_groups(model) -> list[dict]:
    """Weight decay on weight matrices (and tokens / position embeddings, as I-JEPA); none on biases and
    1-D parameters (norm scales). The ``no_wd`` flag is read by ``set_optimizer_hparams``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "no_wd": True}]


def build_optimizer(model, optim, cuda: bool) -> torch.optim.AdamW:
    """AdamW over ``adamw_param_groups`` with the ``optim`` section's betas and eps (fused on CUDA); lr and wd
    are set every step from the schedules (``set_optimizer_hparams``)."""
    return torch.optim.AdamW(adamw_param_groups(model), lr=optim.lr_start, betas=tuple(optim.betas), eps=optim.eps,
                             fused=cuda)


def backward_and_update(loss: torch.Tensor, model, optimizer, clip_grad: float | None,
                        nonfinite: torch.Tensor) -> torch.Tensor:
    """Backward, the global gradient-norm clip, AdamW. A non-finite loss or gradient norm raises the device
    flag ``nonfinite`` (read only at log and checkpoint time: no host sync per step). -> the norm before
    clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad or math.inf)
    nonfinite.copy_(torch.maximum(nonfinite, (~torch.isfinite(loss.detach()) | ~torch.isfinite(gnorm)).float()))
    optimizer.step()
    return gnorm


def salt_packing(batch, num_patches: int) -> SaltPacking:
    """The packed layout of a loader batch, from the lengths the loader counted on the host."""
    if batch.lengths is None:  # a batch made elsewhere: count them (a device sync on CUDA)
        lengths = ((batch.ctx_idx >= 0).sum(-1).cpu().numpy(), (batch.tgt_idx >= 0).sum(-1).cpu().numpy())
    else:
        lengths = batch.lengths
    return plan_salt_packing(batch.ctx_idx, batch.tgt_idx, *lengths, num_patches)


def fit_batch_size(probes: tuple[int, int], peaks: tuple[float, float], fixed_extra: float, budget: float,
                   multiple: int = 8) -> int:
    """Peak memory measured at two batch sizes -> the largest multiple of ``multiple`` whose peak, extrapolated
    linearly (fixed part + per image) plus ``fixed_extra``, stays within ``budget`` bytes (at least
    ``multiple``)."""
    (b0, b1), (p0, p1) = probes, peaks
    per_image = max((p1 - p0) / (b1 - b0), 1.0)
    fixed = p0 - per_image * b0 + fixed_extra
    return max(multiple, int((budget - fixed) // per_image) // multiple * multiple)


def batch_size_from_memory(cfg, device: torch.device, probes: tuple[int, int] = (8, 16)) -> int:
    """``train.batch_from_memory``: two eager SALT steps (forward + backward) at ``probes`` images with
    worst-case masks (every patch in the context, a quarter of the grid per target block: more tokens than
    the mask sampler draws), the peak allocated memory of each, plus AdamW's two moments, extrapolated to
    ``train.batch_from_memory`` of the GPU's memory (eager peaks exceed compiled ones: a margin)."""
    from usjepa.models import Predictor, PredictorConfig, SALTModel, build_vit, freeze, load_encoder
    from usjepa.models.salt import salt_forward

    if device.type != "cuda":
        log.warning("train.batch_from_memory needs a CUDA device; keeping data.batch_size %d", cfg.data.batch_size)
        return cfg.data.batch_size
    teacher = freeze(load_encoder(cfg.model.teacher, cfg.model.teacher_arch)).to(device)
    student = build_vit(cfg.model.arch)
    model = SALTModel(student, Predictor(PredictorConfig(**cfg.model.predictor), student.embed_dim,
                                         teacher.embed_dim, student.cfg.num_patches)).to(device)
    n, T = student.cfg.num_patches, 4
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.train.bf16 else contextlib.nullcontext()
    peaks = []
    for b in probes:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        images = torch.randn(b, 1, student.cfg.img_size, student.cfg.img_size, device=device)
        ctx = torch.arange(n, device=device).expand(b, n)
        tgt = torch.arange(n // 4, device=device).expand(T, b, n // 4)
        packing = plan_salt_packing(ctx, tgt, np.full(b, n), np.full((T, b), n // 4), n)
        with autocast:
            loss, _ = salt_forward(model, teacher, images, ctx, tgt, cfg.model.target_norm, packing=packing)
        loss.backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device))
    adam = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    total = torch.cuda.get_device_properties(device).total_memory
    batch = fit_batch_size(probes, tuple(peaks), adam, cfg.train.batch_from_memory * total)
    del teacher, model
    torch.cuda.empty_cache()
    log.info("train.batch_from_memory %.2f: %.2f GiB at batch %d, %.2f GiB at %d, of %.1f GiB -> data.batch_size %d",
             cfg.train.batch_from_memory, peaks[0] / 2**30, probes[0], peaks[1] / 2**30, probes[1], total / 2**30,
             batch)
    return batch
