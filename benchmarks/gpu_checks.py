"""The steady-state training step under ``torch.cuda.set_sync_debug_mode("error")``: no host↔device sync.

Used by ``benchmarks.gpu_suite`` (section ``sync``) and tests/test_gpu_sync.py (skipped without CUDA). The
step is the training loop's own sequence — ``DataWaitTimer`` marks, the loader's next batch (pinned copies,
device speckle, normalisation), the packed layout planned from the loader's host-side lengths (FlexAttention
block tables), teacher targets, the SALT loss, backward, gradient clipping, the on-device
non-finite flag, fused AdamW with schedule values set from the host — so a call that makes the host wait
for the GPU (``.item()``, a pageable copy, a boolean mask with a data-dependent size) raises inside it.
"""

from __future__ import annotations

import contextlib
import math

import torch

from usjepa.data_wait import DataWaitTimer
from usjepa.models import Predictor, PredictorConfig, SALTModel, build_vit, freeze, salt_forward
from usjepa.schedules import lr_at, set_optimizer_hparams, wd_at
from usjepa.step import salt_packing


def salt_steps_without_sync(loader, device: torch.device, arch: str, predictor: PredictorConfig, bf16: bool,
                            warmup: int = 2, checked: int = 3) -> dict:
    """Run ``warmup`` steps normally, then ``checked`` steps with sync debugging set to "error".

    Returns {"ok": bool, "steps_checked": n, "error": message or None}. Needs CUDA."""
    torch.manual_seed(0)
    teacher = freeze(build_vit(arch)).to(device)
    student = build_vit(arch)
    model = SALTModel(student, Predictor(predictor, student.embed_dim, teacher.embed_dim,
                                         student.cfg.num_patches)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    nonfinite = torch.zeros((), device=device)
    window_loss = torch.zeros((), device=device)
    timer = DataWaitTimer(device)
    total = warmup + checked
    it = iter(loader)

    def step(k: int) -> None:
        nonlocal window_loss
        timer.step_done()
        batch = next(it)
        timer.batch_ready()
        set_optimizer_hparams(opt, lr_at(k, total, 1, 1e-6, 1e-5, 1e-7), wd_at(k, total, 0.04, 0.4))
        with autocast:
            loss, _ = salt_forward(model, teacher, batch.images, batch.ctx_idx, batch.tgt_idx,
                                   packing=salt_packing(batch, student.cfg.num_patches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
        nonfinite.copy_(torch.maximum(nonfinite, (~torch.isfinite(loss.detach()) | ~torch.isfinite(gnorm)).float()))
        opt.step()
        window_loss = window_loss + loss.detach()

    for k in range(warmup):
        step(k)
    torch.cuda.synchronize(device)
    error = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(warmup, total):
            step(k)
    except RuntimeError as e:  # what sync debug mode raises, with the offending call in the message
        error = str(e).splitlines()[0][:500]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return {"ok": error is None, "steps_checked": checked, "error": error, "loss_finite": nonfinite.item() == 0,
            "data_wait_s": timer.take()}
