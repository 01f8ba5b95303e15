"""Stage 1: masked pixel reconstruction (MAE-style) to make a teacher when no pretrained one is at hand.

The encoder (the future teacher, same ViT as any other) sees a random 25 % of the patches
(``masking: random``, MAE) or the context of the loader's I-JEPA multi-block masks (``masking: multiblock``,
SALT's stage 1, V-JEPA-style pixel reconstruction: the same masks stage 2 predicts under); a small decoder
puts mask tokens at the other positions and regresses their pixels (per-patch normalised, as MAE's
``norm_pix_loss``) — every hidden patch for ``random``, the target blocks for ``multiblock``. Only masked
patches inside the ultrasound region count: background is constant and
would teach nothing. The decoder's parameters are named ``decoder*`` so that loading the encoder drops
them, exactly as for URFM's released file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from usjepa.models.vit import (Block, ViTConfig, VisionTransformer, init_pos_embed, init_transformer_weights,
                               transformer_flops, vit_forward_flops)


@dataclass(frozen=True)
class DecoderConfig:
    embed_dim: int = 256
    depth: int = 2
    num_heads: int = 8
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.75  # masking "random" only
    masking: str = "random"  # or "multiblock": the loader's context / target blocks (SALT's stage 1)
    pos_embed: str = "learned"  # or "sincos" (MAE's decoder: fixed 2-D sin-cos)

    def __post_init__(self):
        if self.masking not in MASKINGS:
            raise ValueError(f"masking must be one of {MASKINGS}, got {self.masking!r}")


MASKINGS = ("random", "multiblock")


class MAEDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, encoder_dim: int, num_patches: int, patch_pixels: int):
        super().__init__()
        self.cfg = cfg
        self.decoder_embed = nn.Linear(encoder_dim, cfg.embed_dim)
        self.decoder_mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches, cfg.embed_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.decoder_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(cfg.embed_dim, patch_pixels)
        init_pos_embed(self.decoder_pos_embed, cfg.pos_embed, int(round(num_patches ** 0.5)), cls_token=False)
        nn.init.normal_(self.decoder_mask_token, std=0.02)
        self.apply(init_transformer_weights)

    def forward(self, visible: torch.Tensor, keep_idx: torch.Tensor, num_patches: int) -> torch.Tensor:
        """``visible [B, K, De]`` at ``keep_idx [B, K]`` -> pixel predictions for every patch ``[B, N, p*p]``.
        Padding indices (< 0, multi-block contexts of different lengths) are written to a spare slot that is
        dropped."""
        B, K = keep_idx.shape
        x = self.decoder_mask_token.expand(B, num_patches + 1, -1).to(visible.dtype)
        v = self.decoder_embed(visible)
        slot = torch.where(keep_idx < 0, num_patches, keep_idx)
        x = x.scatter(1, slot.unsqueeze(-1).expand(-1, -1, v.shape[-1]), v.to(x.dtype))[:, :num_patches]
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward_flops(self, n_visible: int, n_patches: int, encoder_dim: int, patch_pixels: int) -> float:
        d = self.cfg.embed_dim
        return (
            2 * n_visible * encoder_dim * d
            + transformer_flops(n_patches, d, self.cfg.depth, self.cfg.mlp_ratio)
            + 2 * n_patches * d * patch_pixels
        )


def mae_step_flops(encoder: ViTConfig, decoder: MAEDecoder, batch: int) -> float:
    """Model FLOPs of one stage-1 step: forward + backward (3x forward) of encoder (visible patches) and decoder."""
    keep = max(1, round(encoder.num_patches * (1 - decoder.cfg.mask_ratio)))
    dec = decoder.forward_flops(keep, encoder.num_patches, encoder.embed_dim, encoder.patch_size**2)
    return batch * 3 * (vit_forward_flops(encoder, keep) + dec)


class MAEModel(nn.Module):
    """Encoder + decoder, one module for DDP."""

    def __init__(self, encoder: VisionTransformer, decoder: MAEDecoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, images: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        visible = self.encoder.patch_tokens(images, keep_idx)
        return self.decoder(visible, keep_idx, self.encoder.cfg.num_patches)


def random_keep_indices(
    batch: int, num_patches: int, mask_ratio: float, generator: torch.Generator
) -> torch.Tensor:
    """Per image, a uniformly random subset of ``round(N * (1 - mask_ratio))`` patches to keep, sorted."""
    keep = max(1, int(round(num_patches * (1.0 - mask_ratio))))
    noise = torch.rand(batch, num_patches, generator=generator)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, 1, H, W]`` -> ``[B, N, p*p]`` in raster patch order (the ViT's token order)."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def stage1_masks(cfg: DecoderConfig, batch, num_patches: int, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(patches the encoder sees ``[B, K]``, patches to reconstruct ``[T, B, Kt]`` or None = all hidden ones):
    MAE's random subset (made on the host from ``generator``), or the batch's multi-block context and
    target blocks (already on the device, padded with -1)."""
    if cfg.masking == "multiblock":
        return batch.ctx_idx, batch.tgt_idx
    return random_keep_indices(batch.images.shape[0], num_patches, cfg.mask_ratio, generator), None


def mae_loss(
    pred: torch.Tensor, images: torch.Tensor, keep_idx: torch.Tensor, valid: torch.Tensor, patch_size: int,
    target_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error of per-patch-normalised pixels over the reconstructed patches inside the USrc
    region: every patch not in ``keep_idx``, or the positions of ``target_idx`` (``[T, B, Kt]``, -1 padding)."""
    target = patchify(images.float(), patch_size)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # [B, N]
    weight = valid.reshape(valid.shape[0], -1).float()
    if target_idx is None:
        weight = weight.scatter(1, keep_idx, 0.0)  # visible patches are not reconstructed
    else:  # the union of the target blocks (a spare column takes the padding, then goes)
        T, B, Kt = target_idx.shape
        slots = torch.where(target_idx < 0, weight.shape[1], target_idx).permute(1, 0, 2).reshape(B, T * Kt)
        hit = torch.zeros(B, weight.shape[1] + 1, device=weight.device).scatter(1, slots, 1.0)[:, :-1]
        weight = weight * hit
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)
