"""Collapse monitoring for stage 2: the spread of student features, predictions and targets per log window.

JEPA-style training can collapse: the student maps every image to one vector and the predictor learns a
constant, a loss that looks fine on a curve. ``usjepa.models.salt.token_std`` measures, per step, the std
over batch and tokens of each channel (mean over channels) of the student's context tokens, the
predictions and the teacher's targets; ``CollapseMonitor`` averages them over a log window on the device
(no sync per step), hands them to the metrics record (JSONL and TensorBoard: ``std_student``,
``std_pred``, ``std_target``) and logs a warning when the student's falls below ``threshold``.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("usjepa.train")

# At initialisation the student's final-norm tokens have a per-channel std of about 0.5-1 on ultrasound;
# a healthy run stays there. 0.01 is two orders of magnitude lower: every token is nearly the same vector.
COLLAPSE_STD = 0.01
# ... then usjepa.models.salt.oracle_diagnostics: the losses of the image-mean, position-mean and
# position + image mean oracles beside the student's, and the spread of predictions / targets within an image.
NAMES = ("std_student", "std_pred", "std_target", "loss_oracle_image_mean", "loss_oracle_position_mean",
         "loss_oracle_position_plus_image_mean", "spread_pred_in_image", "spread_target_in_image")


class CollapseMonitor:
    def __init__(self, device: torch.device, threshold: float = COLLAPSE_STD):
        self.device, self.threshold = device, threshold
        self.reset()

    def reset(self) -> None:
        self.total = None  # sized by the first observation: the leading NAMES it carries
        self.n = 0

    def observe(self, stds: torch.Tensor | None) -> None:
        if stds is not None:
            stds = stds.detach().float()
            self.total = stds.clone() if self.total is None else self.total + stds
            self.n += 1

    def record(self, step: int) -> dict:
        """The window's means as metrics (empty for stage 1), with a warning on a collapsing student; resets."""
        if self.n == 0:
            return {}
        out = dict(zip(NAMES, (self.total / self.n).tolist()))
        self.reset()
        if out["std_student"] < self.threshold:
            log.warning("step %d: student feature std %.4g < %.3g: the student may be collapsing (predictions "
                        "%.4g, targets %.4g)", step, out["std_student"], self.threshold, out["std_pred"],
                        out["std_target"])
        return out


def salt_flops(student_cfg, teacher_cfg, predictor, batch) -> tuple[float, float]:
    """Model FLOPs of one SALT step on ``batch``: (over each image's real tokens — what MFU counts —, and as
    if every mask were padded to the batch's widths Kc, Kt — what the padded step ran and reported before
    packing, which counted 18-30 % padding as useful work)."""
    from usjepa.models.salt import salt_step_flops, salt_step_flops_real

    T, B, Kt = batch.tgt_idx.shape
    padded = salt_step_flops(student_cfg, teacher_cfg, predictor, B, batch.ctx_idx.shape[1], T, Kt)
    if batch.lengths is None:
        return padded, padded
    return salt_step_flops_real(student_cfg, teacher_cfg, predictor, *batch.lengths), padded
