"""Stage 2: SALT (static-teacher asymmetric latent training), paper §3.2 and Eq. 5.

The student encodes only the context patches; the predictor (I-JEPA style, narrower) reads the context
tokens plus one learned mask token per target position (mask token + that position's embedding) and
predicts the frozen teacher's patch tokens there. The loss is Smooth L1 averaged over the T target blocks.

Masks keep each image's own lengths: index tensors are padded with -1 (``usjepa.kernels`` PAD). Padding
never attends or is attended to (a key-padding mask in every attention), and the loss averages over real
target tokens only, so a padded batch gives each image what it would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from usjepa.models.vit import (
    Block,
    ViTConfig,
    VisionTransformer,
    gather_tokens,
    init_pos_embed,
    init_transformer_weights,
    key_padding_mask,
    transformer_flops,
    vit_forward_flops,
)

TARGET_NORMS = ("none", "layernorm")
LOSSES = ("smooth_l1", "l1")  # Eq. 5's Smooth L1; L1 as I-JEPA / V-JEPA


@dataclass(frozen=True)
class PredictorConfig:
    embed_dim: int = 384  # paper Table 5: predictor embedding dim 384, depth 12
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    pos_embed: str = "learned"  # or "sincos" (I-JEPA's predictor: fixed 2-D sin-cos)


class Predictor(nn.Module):
    """Context tokens (encoder width) + target positions -> predicted target tokens (encoder width).

    ``predictor_embed`` projects the context to the predictor width; ``mask_token`` plus ``pos_embed`` (one
    learned vector per patch position, no CLS) marks each target position; ``predictor_proj`` is the
    384 -> 768 adapter onto the teacher's feature space.
    """

    def __init__(self, cfg: PredictorConfig, encoder_dim: int, target_dim: int, num_patches: int):
        super().__init__()
        self.cfg = cfg
        self.num_patches = num_patches
        self.predictor_embed = nn.Linear(encoder_dim, cfg.embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, cfg.embed_dim))
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.predictor_proj = nn.Linear(cfg.embed_dim, target_dim)
        init_pos_embed(self.pos_embed, cfg.pos_embed, int(round(num_patches ** 0.5)), cls_token=False)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.apply(init_transformer_weights)

    def forward(self, ctx: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor) -> torch.Tensor:
        """``ctx [B, Kc, De]``, ``ctx_idx [B, Kc]``, ``tgt_idx [T, B, Kt]`` -> predictions ``[T, B, Kt, Dt]``.

        Each target block is predicted in its own sequence (context + that block's mask tokens), so the
        batch is repeated T times, as in I-JEPA. Indices < 0 are padding (never attended; their
        predictions are meaningless and ``salt_loss`` leaves them out).
        """
        T, B, Kt = tgt_idx.shape
        pos = self.pos_embed.expand(B, -1, -1)
        x = self.predictor_embed(ctx) + gather_tokens(pos, ctx_idx)  # [B, Kc, Dp]
        x = x.repeat(T, 1, 1)  # [T*B, Kc, Dp], block-major: rows t*B .. t*B+B-1 are block t
        tgt = tgt_idx.reshape(T * B, Kt)
        m = self.mask_token + gather_tokens(pos.repeat(T, 1, 1), tgt)  # [T*B, Kt, Dp]
        x = torch.cat([x, m], dim=1)
        mask = key_padding_mask(torch.cat([(ctx_idx >= 0).repeat(T, 1), tgt >= 0], dim=1))
        for blk in self.blocks:
            x = blk(x, mask)
        x = self.predictor_proj(self.norm(x[:, -Kt:]))
        return x.reshape(T, B, Kt, -1)

    def forward_flops(self, n_ctx: int, n_tgt: int, n_blocks: int, encoder_dim: int, target_dim: int) -> float:
        """Forward FLOPs for one image: T sequences of Kc + Kt tokens, plus the in/out projections."""
        d = self.cfg.embed_dim
        seq = n_ctx + n_tgt
        return (
            2 * n_ctx * encoder_dim * d
            + n_blocks * transformer_flops(seq, d, self.cfg.depth, self.cfg.mlp_ratio)
            + n_blocks * 2 * n_tgt * d * target_dim
        )


def salt_loss(pred: torch.Tensor, target: torch.Tensor, real: torch.Tensor | None = None,
              kind: str = "smooth_l1") -> torch.Tensor:
    """Eq. 5: (1/T) Σ_i SmoothL1(pred_i, y_i); term i is the mean over block i's *real* tokens (all images
    of the batch) and channels.

    ``pred`` and ``target`` are ``[T, B, Kt, D]``; ``real`` bool ``[T, B, Kt]`` (``tgt_idx >= 0``) marks
    the real target tokens, None = all real. Padding contributes nothing, whatever its values.
    Computed in float32 whatever the autocast dtype of the predictions. ``kind="l1"``: L1 instead.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
    loss_fn = F.smooth_l1_loss if kind == "smooth_l1" else F.l1_loss
    err = loss_fn(pred.float(), target.float(), reduction="none").mean(dim=-1)  # [T, B, Kt]
    if real is None:
        return err.mean()
    w = real.to(err.dtype)
    per_block = (err * w).sum(dim=(1, 2)) / w.sum(dim=(1, 2)).clamp_min(1.0)
    return per_block.mean()


@torch.no_grad()
def teacher_targets(teacher: VisionTransformer, images: torch.Tensor, tgt_idx: torch.Tensor,
                    norm: str = "none") -> torch.Tensor:
    """The frozen teacher's patch tokens, gathered at the targets: ``[T, B, Kt, D]``.

    ``norm="none"``: the teacher's final-norm output as is (its LayerNorm's affine included);
    ``"layernorm"``: that output layer-normalised again without affine, as I-JEPA and V-JEPA do with their
    targets, so every target token has zero mean and unit variance over channels whatever the teacher's
    final affine. Padding indices (< 0) gather token 0; the loss masks them out."""
    if norm not in TARGET_NORMS:
        raise ValueError(f"target norm must be one of {TARGET_NORMS}, got {norm!r}")
    tokens = teacher.patch_tokens(images)  # [B, N, D]
    if norm == "layernorm":
        tokens = F.layer_norm(tokens, tokens.shape[-1:])
    T, B, Kt = tgt_idx.shape
    return gather_tokens(tokens.repeat(T, 1, 1), tgt_idx.reshape(T * B, Kt)).reshape(T, B, Kt, -1)


def token_std(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Collapse statistic: the std over all real tokens (batch and positions) of each channel, averaged
    over channels. ``x [..., K, D]``, ``real`` bool ``[..., K]``. A collapsed encoder maps every token to
    the same vector and this goes to 0, even when each token is layer-normed."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    w = real.reshape(-1, 1).to(x.dtype)  # weights, not boolean indexing: no data-dependent shape, no sync
    n = w.sum().clamp_min(1.0)
    mean = (x * w).sum(0) / n
    return (((x - mean) ** 2 * w).sum(0) / n).sqrt().mean()


@torch.no_grad()
def oracle_diagnostics(pred: torch.Tensor, targets: torch.Tensor, tgt_idx: torch.Tensor, num_patches: int,
                       kind: str = "smooth_l1") -> torch.Tensor:
    """What the student's loss means, from the batch's own targets (``[T, B, Kt, D]``, padding < 0):

    * the loss of an oracle predicting every target as its image's mean target token (``image mean``);
    * of one predicting the batch's mean target at that position (``position mean``);
    * of one predicting position mean + (image mean - batch mean): what a student that learned only the
      image's average and the position gets;
    * the spread of the predictions across one image's targets (per-channel std over its target tokens,
      mean over channels and images), and the same spread of the targets.

    A student whose loss sits at the third oracle with a prediction spread far under the targets' has
    learned the image mean, not the content of the masked blocks (issue 22: 0.322 vs 0.321, spread 0.20 vs
    0.85). Returns ``[5]`` in that order."""
    t = targets.float()
    real = (tgt_idx >= 0).to(t.dtype).unsqueeze(-1)  # [T, B, Kt, 1]
    per_image = real.sum(dim=(0, 2)).clamp_min(1.0)  # [B, 1]
    image_mean = (t * real).sum(dim=(0, 2)) / per_image  # [B, D]
    batch_mean = (t * real).sum(dim=(0, 1, 2)) / real.sum().clamp_min(1.0)  # [D]
    pos = tgt_idx.clamp_min(0).reshape(-1)
    w = real.reshape(-1, 1)
    pos_sum = torch.zeros(num_patches, t.shape[-1], device=t.device).index_add_(0, pos, t.reshape(-1, t.shape[-1]) * w)
    pos_n = torch.zeros(num_patches, 1, device=t.device).index_add_(0, pos, w)
    pos_mean = (pos_sum / pos_n.clamp_min(1.0))[tgt_idx.clamp_min(0)]  # [T, B, Kt, D]
    img = image_mean[None, :, None, :].expand_as(t)
    mask = tgt_idx >= 0
    losses = [salt_loss(o, t, mask, kind) for o in (img, pos_mean, pos_mean + img - batch_mean)]

    def spread(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        mean = (x * real).sum(dim=(0, 2), keepdim=True) / per_image[None, :, None, :]
        var = ((x - mean) ** 2 * real).sum(dim=(0, 2)) / per_image  # [B, D]
        return var.sqrt().mean()

    return torch.stack(losses + [spread(pred.detach()), spread(t)])


def salt_forward(net: nn.Module, teacher: VisionTransformer, images: torch.Tensor, ctx_idx: torch.Tensor,
                 tgt_idx: torch.Tensor, target_norm: str = "none", loss: str = "smooth_l1"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One stage-2 forward (``net`` is a ``SALTModel``, maybe DDP-wrapped or compiled): the Eq. 5 loss and
    the statistics ``usjepa.monitor`` logs: the collapse stds ``[student tokens, predictions, targets]``
    (``token_std``), then ``oracle_diagnostics``."""
    ctx, pred = net(images, ctx_idx, tgt_idx)
    targets = teacher_targets(teacher, images, tgt_idx, target_norm)
    real = tgt_idx >= 0
    stds = torch.stack([token_std(ctx, ctx_idx >= 0), token_std(pred, real), token_std(targets, real)])
    num_patches = getattr(teacher, "_orig_mod", teacher).cfg.num_patches  # torch.compile wraps the teacher
    diag = oracle_diagnostics(pred, targets, tgt_idx, num_patches, loss)
    return salt_loss(pred, targets, real, loss), torch.cat([stds, diag])


class SALTModel(nn.Module):
    """The trainable part of stage 2 (student + predictor), one module so that DDP wraps it once."""

    def __init__(self, student: VisionTransformer, predictor: Predictor):
        super().__init__()
        self.student = student
        self.predictor = predictor

    def forward(self, images: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (student context tokens ``[B, Kc, De]``, predictions ``[T, B, Kt, Dt]``)."""
        ctx = self.student.patch_tokens(images, ctx_idx)
        return ctx, self.predictor(ctx, ctx_idx, tgt_idx)


def salt_step_flops(student: ViTConfig, teacher: ViTConfig, predictor: Predictor, batch: int, n_ctx: int,
                    n_blocks: int, n_tgt: int) -> float:
    """Model FLOPs of one SALT training step: forward + backward (3x forward) of student and predictor,
    forward only of the teacher over the whole image. Matmuls and attention; norms and softmax left out."""
    student_f = vit_forward_flops(student, n_ctx)
    pred_f = predictor.forward_flops(n_ctx, n_tgt, n_blocks, student.embed_dim, predictor.predictor_proj.out_features)
    return batch * (3 * (student_f + pred_f) + vit_forward_flops(teacher))


def freeze(model: nn.Module) -> nn.Module:
    """Inference mode for the teacher: eval(), no parameter takes a gradient."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
