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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from usjepa.models.packing import (
    PACK_MULTIPLE,
    PackedAttention,
    _to_device,
    attention_layout,
    mark_packed_dynamic,
    round_up,
)
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

    def forward_packed(self, ctx: torch.Tensor, p: SaltPacking) -> torch.Tensor:
        """The same on packed rows: ``ctx [Ls, De]`` (the student's row) -> predictions ``[Lt, Dt]`` at
        ``p.tgt_slot``. Each (target block, image) is one sequence, its context then its mask tokens."""
        z = torch.cat([self.predictor_embed(ctx), self.mask_token[0]])  # row Ls: the mask token
        x = z[p.pred_src] + self.pos_embed[0][p.pred_pos]  # [Lp, Dp]
        for blk in self.blocks:
            x = blk(x, p.pred_attn)
        return self.predictor_proj(self.norm(x[p.tgt_slot]))

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
def oracle_diagnostics(pred: torch.Tensor, targets: torch.Tensor, image: torch.Tensor, position: torch.Tensor,
                       weight: torch.Tensor, n_images: int, num_patches: int, kind: str = "smooth_l1") -> torch.Tensor:
    """What the student's loss means, from the batch's own targets, one row per target token: ``pred`` and
    ``targets`` ``[L, D]``, the token's ``image`` and ``position`` (long ``[L]``) and its ``weight`` in Eq. 5
    (``[L]``, 1 / (T x its block's real tokens); 0 on padding), so the padded and the packed step share it:

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
    real = (weight > 0).to(t.dtype).unsqueeze(-1)  # [L, 1]
    D = t.shape[-1]

    def segment_mean(x: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:  # [n, D]: no data-dependent shape
        total = torch.zeros(n, D, device=t.device).index_add_(0, seg, x * real)
        count = torch.zeros(n, 1, device=t.device).index_add_(0, seg, real)
        return total / count.clamp_min(1.0)

    image_mean = segment_mean(t, image, n_images)
    batch_mean = (t * real).sum(0) / real.sum().clamp_min(1.0)
    pos_mean = segment_mean(t, position, num_patches)[position]
    img = image_mean[image]
    loss_fn = F.smooth_l1_loss if kind == "smooth_l1" else F.l1_loss
    losses = [(loss_fn(o, t, reduction="none").mean(-1) * weight).sum() for o in (img, pos_mean, pos_mean + img - batch_mean)]

    def spread(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        var = segment_mean((x - segment_mean(x, image, n_images)[image]) ** 2, image, n_images)  # [B, D]
        return var.sqrt().mean()

    return torch.stack(losses + [spread(pred.detach()), spread(t)])


def padded_target_rows(tgt_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image, position, Eq. 5 weight) of each slot of ``tgt_idx`` ``[T, B, Kt]`` (padding < 0: weight 0),
    flattened in the order of ``[T, B, Kt, D]`` tensors reshaped to ``[-1, D]``."""
    T, B, Kt = tgt_idx.shape
    real = (tgt_idx >= 0).float()
    weight = real / (T * real.sum(dim=(1, 2), keepdim=True).clamp_min(1.0))
    image = torch.arange(B, device=tgt_idx.device).view(1, B, 1).expand(T, B, Kt)
    return image.reshape(-1), tgt_idx.clamp_min(0).reshape(-1), weight.reshape(-1)


def salt_forward(net: nn.Module, teacher: VisionTransformer, images: torch.Tensor, ctx_idx: torch.Tensor,
                 tgt_idx: torch.Tensor, target_norm: str = "none", loss: str = "smooth_l1",
                 packing: SaltPacking | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One stage-2 forward (``net`` is a ``SALTModel``, maybe DDP-wrapped or compiled): the Eq. 5 loss and
    the statistics ``usjepa.monitor`` logs: the collapse stds ``[student tokens, predictions, targets]``
    (``token_std``), then ``oracle_diagnostics``. With ``packing`` (``plan_salt_packing``) the packed step,
    which gives the same loss, gradients and statistics."""
    if target_norm not in TARGET_NORMS:
        raise ValueError(f"target norm must be one of {TARGET_NORMS}, got {target_norm!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    num_patches = getattr(teacher, "_orig_mod", teacher).cfg.num_patches  # torch.compile wraps the teacher
    if packing is not None:
        ctx, pred = net(images, packing=packing)
        with torch.inference_mode():  # the frozen teacher: no autograd bookkeeping at all
            tokens = teacher.patch_tokens(images)
            if target_norm == "layernorm":
                tokens = F.layer_norm(tokens, tokens.shape[-1:])
            targets = tokens.reshape(-1, tokens.shape[-1])[packing.tgt_src]  # [Lt, Dt]
        targets = targets.clone()  # an ordinary tensor again, which the loss's backward may save
        loss_fn = F.smooth_l1_loss if loss == "smooth_l1" else F.l1_loss
        err = loss_fn(pred.float(), targets.float(), reduction="none").mean(dim=-1)
        real = packing.tgt_weight > 0
        stds = torch.stack([token_std(ctx, packing.student_patch), token_std(pred, real), token_std(targets, real)])
        diag = oracle_diagnostics(pred, targets, packing.tgt_src // num_patches, packing.tgt_src % num_patches,
                                  packing.tgt_weight, images.shape[0], num_patches, loss)
        # Eq. 5: the weights are 1 / (T x block's real tokens)
        return (err * packing.tgt_weight).sum(), torch.cat([stds, diag])
    ctx, pred = net(images, ctx_idx, tgt_idx)
    targets = teacher_targets(teacher, images, tgt_idx, target_norm)
    real = tgt_idx >= 0
    stds = torch.stack([token_std(ctx, ctx_idx >= 0), token_std(pred, real), token_std(targets, real)])
    image, position, weight = padded_target_rows(tgt_idx)
    diag = oracle_diagnostics(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1, targets.shape[-1]), image,
                              position, weight, images.shape[0], num_patches, loss)
    return salt_loss(pred, targets, real, loss), torch.cat([stds, diag])


class SALTModel(nn.Module):
    """The trainable part of stage 2 (student + predictor), one module so that DDP wraps it once."""

    def __init__(self, student: VisionTransformer, predictor: Predictor):
        super().__init__()
        self.student = student
        self.predictor = predictor

    def forward(self, images: torch.Tensor, ctx_idx: torch.Tensor | None = None, tgt_idx: torch.Tensor | None = None,
                packing: SaltPacking | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (student context tokens ``[B, Kc, De]``, predictions ``[T, B, Kt, Dt]``); packed: (the student's
        row ``[Ls, De]``, CLS and tail included, predictions ``[Lt, Dt]``). The packed step takes no
        per-batch shape but the packed lengths (``packing``), so torch.compile traces it once."""
        if packing is not None:
            x = self.student._embed(images)
            x = x.reshape(-1, x.shape[-1])[packing.student_src]
            for blk in self.student.blocks:
                x = blk(x, packing.student_attn)
            ctx = self.student.norm(x)
            return ctx, self.predictor.forward_packed(ctx, packing)
        ctx = self.student.patch_tokens(images, ctx_idx)
        return ctx, self.predictor(ctx, ctx_idx, tgt_idx)


def salt_step_flops(student: ViTConfig, teacher: ViTConfig, predictor: Predictor, batch: int, n_ctx: int,
                    n_blocks: int, n_tgt: int) -> float:
    """Model FLOPs of one SALT training step: forward + backward (3x forward) of student and predictor,
    forward only of the teacher over the whole image. Matmuls and attention; norms and softmax left out."""
    student_f = vit_forward_flops(student, n_ctx)
    pred_f = predictor.forward_flops(n_ctx, n_tgt, n_blocks, student.embed_dim, predictor.predictor_proj.out_features)
    return batch * (3 * (student_f + pred_f) + vit_forward_flops(teacher))


def salt_step_flops_real(student: ViTConfig, teacher: ViTConfig, predictor: Predictor, ctx_len: np.ndarray,
                         tgt_len: np.ndarray) -> float:
    """``salt_step_flops`` over each image's real tokens only (``ctx_len [B]``, ``tgt_len [T, B]``): the
    FLOPs that count for MFU, whatever padding or packing tail the step also computes."""
    ctx_len, tgt_len = np.asarray(ctx_len, np.int64), np.asarray(tgt_len, np.int64)
    d, de = predictor.cfg.embed_dim, student.embed_dim
    dt, cfg = predictor.predictor_proj.out_features, predictor.cfg
    student_f = sum(vit_forward_flops(student, int(k)) for k in ctx_len)
    pred_f = 2 * int(ctx_len.sum()) * de * d + 2 * int(tgt_len.sum()) * d * dt + sum(
        transformer_flops(int(c + t), d, cfg.depth, cfg.mlp_ratio) for row in tgt_len for c, t in zip(ctx_len, row))
    return 3 * (student_f + pred_f) + len(ctx_len) * vit_forward_flops(teacher)


@dataclass
class SaltPacking:
    """Where each packed slot of the student's and the predictor's rows reads from (``plan_salt_packing``).
    Student row: per image its CLS, then its context tokens. Predictor row: per (target block, image) that
    image's context, then the block's mask tokens. Each row ends with a tail up to a multiple of
    PACK_MULTIPLE that no real token attends to and no loss term reads."""

    student_src: torch.Tensor  # [Ls] rows of the student's embedded tokens [B * (1 + N), D]
    student_patch: torch.Tensor  # bool [Ls]: a real context token (not CLS, not tail)
    student_attn: PackedAttention
    pred_src: torch.Tensor  # [Lp] student slot read by each predictor slot; Ls = the mask token
    pred_pos: torch.Tensor  # [Lp] patch position of each predictor slot (its position embedding)
    pred_attn: PackedAttention
    tgt_slot: torch.Tensor  # [Lt] predictor slot of each target token
    tgt_src: torch.Tensor  # [Lt] rows of the teacher's patch tokens [B * N, D]
    tgt_weight: torch.Tensor  # float [Lt]: 1 / (T x real tokens of its block); 0 on the tail
    tokens: dict  # host counts: real and packed (computed) tokens of each row, for the metrics


def plan_salt_packing(ctx_idx: torch.Tensor, tgt_idx: torch.Tensor, ctx_len: np.ndarray, tgt_len: np.ndarray,
                      num_patches: int, flex: bool | None = None) -> SaltPacking:
    """The packed layout of one batch: ``ctx_idx [B, Kc]``, ``tgt_idx [T, B, Kt]`` (device, PAD = -1, each
    row's real indices first) and their real lengths counted on the host (``ctx_len [B]``, ``tgt_len
    [T, B]``, ``Batch.lengths``). Offsets come from the host lengths, indices from device gathers: no
    device-to-host sync. ``flex``: FlexAttention's block mask (default on CUDA) or the CPU path."""
    device = ctx_idx.device
    flex = device.type == "cuda" if flex is None else flex
    ctx_len, tgt_len = np.asarray(ctx_len, np.int64), np.asarray(tgt_len, np.int64)
    (B, Kc), (T, _, Kt) = ctx_idx.shape, tgt_idx.shape
    # student row: image i holds slots s_off[i] (CLS) .. s_off[i] + ctx_len[i]
    s_len = 1 + ctx_len
    s_off = np.concatenate([[0], np.cumsum(s_len)])[:-1]
    S = int(s_len.sum())
    Ls = round_up(S, PACK_MULTIPLE)
    s_img = np.repeat(np.arange(B), s_len)
    s_col = np.arange(S) - s_off[s_img]  # 0 = CLS, j + 1 = context index j
    s_src = np.zeros(Ls, np.int64)
    s_src[:S] = s_img * (1 + Kc) + s_col  # into [B, 1 + Kc]: CLS, then the padded context row
    s_patch = np.zeros(Ls, bool)
    s_patch[:S] = s_col > 0
    # predictor row: sequence q = t * B + i holds image i's context, then block t's targets of image i
    q_len = (ctx_len[None, :] + tgt_len).reshape(-1)
    q_off = np.concatenate([[0], np.cumsum(q_len)])[:-1]
    P = int(q_len.sum())
    Lp = round_up(P, PACK_MULTIPLE)
    q_seq = np.repeat(np.arange(T * B), q_len)
    q_img, q_col = q_seq % B, np.arange(P) - q_off[q_seq]
    is_ctx = q_col < ctx_len[q_img]
    p_src = np.full(Lp, Ls, np.int64)  # the tail reads the mask token
    p_src[:P] = np.where(is_ctx, s_off[q_img] + 1 + q_col, Ls)
    p_pos = np.zeros(Lp, np.int64)  # into cat(ctx_idx.flat, tgt_idx.flat); index 0 for the tail
    p_pos[:P] = np.where(is_ctx, q_img * Kc + q_col, B * Kc + q_seq * Kt + (q_col - ctx_len[q_img]))
    tgt_slots = np.flatnonzero(~is_ctx)
    Q = len(tgt_slots)
    Lt = round_up(Q, PACK_MULTIPLE)
    t_slot, t_pos, t_img = (np.zeros(Lt, np.int64) for _ in range(3))
    t_slot[:Q], t_pos[:Q], t_img[:Q] = tgt_slots, p_pos[tgt_slots], q_img[tgt_slots]
    per_block = tgt_len.sum(1)  # real target tokens of each block (all images)
    weight = np.zeros(Lt, np.float32)
    weight[:Q] = 1.0 / (T * per_block[q_seq[tgt_slots] // B])
    s_src, s_patch, p_src, p_pos, t_slot, t_pos, t_img, weight = _to_device(
        [s_src, s_patch, p_src, p_pos, t_slot, t_pos, t_img, weight], device)
    # the only gathers that need the masks' values, on the device
    cls_and_ctx = torch.arange(B, device=device)[:, None] * (1 + num_patches) + F.pad(ctx_idx + 1, (1, 0))
    positions = torch.cat([ctx_idx.reshape(-1), tgt_idx.reshape(-1)]).clamp_min(0)
    pred_pos = positions[p_pos]
    tgt_src = t_img * num_patches + positions[t_pos]
    packing = SaltPacking(
        student_src=cls_and_ctx.reshape(-1)[s_src], student_patch=s_patch,
        student_attn=attention_layout(s_len, Ls, device, flex),
        pred_src=p_src, pred_pos=pred_pos, pred_attn=attention_layout(q_len[q_len > 0], Lp, device, flex),
        tgt_slot=t_slot, tgt_src=tgt_src, tgt_weight=weight,
        tokens={"student": (S, Ls), "predictor": (P, Lp), "targets": (Q, Lt)})
    mark_packed_dynamic(*((t, 0) for t in (packing.student_src, packing.student_patch, packing.pred_src,
                                            packing.pred_pos, packing.tgt_slot, packing.tgt_src, packing.tgt_weight)))
    return packing


def freeze(model: nn.Module) -> nn.Module:
    """Inference mode for the teacher: eval(), no parameter takes a gradient."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
