"""Our Vision Transformer, written so that its state dict is exactly timm's ``VisionTransformer``.

timm cannot be imported on our CPU machines (it hard-imports torchvision), yet the teacher (URFM), the
exported student and the probe's baselines are all timm ``vit_base_patch16_224`` checkpoints. So this
module re-implements the same network with the same parameter names and the same maths (pre-norm blocks,
LayerNorm eps 1e-6, exact GELU, qkv bias, a CLS token, a learned position embedding that covers the CLS
token, final norm, token pooling for the head). When timm is installed, tests/test_models.py loads our
weights into ``timm.create_model("vit_base_patch16_224")`` strictly and compares outputs.

Ultrasound is grayscale: models take ``[B, 1, H, W]`` and replicate the channel three times, so that a
3-channel teacher sees what it was trained on and our exports stay loadable by timm unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from usjepa.models.packing import PackedAttention, packed_attention


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 0  # 0: no classifier head (an encoder); timm's default for vit_base is 1000
    pos_embed: str = "learned"  # or "sincos": fixed 2-D sin-cos (I-JEPA, MAE), same key, not trained

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


# Named architectures. The timm names mean exactly timm's shapes; ``vit_test_*`` are tiny CPU models.
ARCHS: dict[str, ViTConfig] = {
    "vit_base_patch16_224": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vit_small_patch16_224": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vit_tiny_patch16_224": ViTConfig(embed_dim=192, depth=12, num_heads=3),
    "vit_large_patch16_224": ViTConfig(embed_dim=1024, depth=24, num_heads=16),
    "vit_test_tiny": ViTConfig(embed_dim=64, depth=2, num_heads=2),
    "vit_test_small": ViTConfig(embed_dim=96, depth=4, num_heads=3),
    "vit_tiny6_patch16_224": ViTConfig(embed_dim=192, depth=6, num_heads=3),  # ViT-Ti, half the blocks: CPU runs
}


def vit_config(arch: str | dict | ViTConfig, **overrides) -> ViTConfig:
    """Resolve an architecture name, a dict of ``ViTConfig`` fields (optionally with ``name``) or a config."""
    if isinstance(arch, ViTConfig):
        base = arch
    elif isinstance(arch, str):
        if arch not in ARCHS:
            raise ValueError(f"unknown ViT architecture {arch!r}; known: {sorted(ARCHS)}")
        base = ARCHS[arch]
    elif isinstance(arch, dict):
        d = dict(arch)
        name = d.pop("name", None)
        base = vit_config(name) if name is not None else ViTConfig()
        overrides = {**d, **overrides}
    else:
        raise TypeError(f"arch must be a name, a dict or a ViTConfig, got {type(arch).__name__}")
    known = {f.name for f in fields(ViTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown ViT config keys {unknown}; known: {sorted(known)}")
    cfg = ViTConfig(**{**asdict(base), **overrides})
    if cfg.img_size % cfg.patch_size:
        raise ValueError(f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
    if cfg.embed_dim % cfg.num_heads:
        raise ValueError(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
    if cfg.pos_embed not in POS_EMBEDS:
        raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {cfg.pos_embed!r}")
    return cfg


# --------------------------------------------------------------------------------------------- blocks


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D], raster order


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | PackedAttention | None = None) -> torch.Tensor:
        """``x [B, N, C]`` with ``attn_mask`` bool ``[B, 1, 1, N]``, True = a real token (``key_padding_mask``),
        or one packed row ``x [L, C]`` with its ``PackedAttention`` (usjepa.models.packing)."""
        if isinstance(attn_mask, PackedAttention):
            L, C = x.shape
            q, k, v = self.qkv(x).reshape(L, 3, self.num_heads, C // self.num_heads).unbind(1)
            return self.proj(packed_attention(q, k, v, attn_mask).reshape(L, C))
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """timm's pre-norm transformer block (no layer scale, no drop path)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | PackedAttention | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


def key_padding_mask(real: torch.Tensor) -> torch.Tensor:
    """bool ``[B, N]`` (True = a real token) -> the attention mask ``[B, 1, 1, N]`` under which no token
    attends to padding. Padding slots still compute (their outputs are never read); every sequence keeps
    real keys (CLS, >= min_keep context patches). Always applied, even to an unpadded batch: checking on
    the host would cost a device sync and a torch.compile graph break per step."""
    return real[:, None, None, :]


POS_EMBEDS = ("learned", "sincos")


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding ``[grid * grid, dim]`` in raster order (MAE's / I-JEPA's
    ``get_2d_sincos_pos_embed``): half the channels encode the row, half the column, each as sin and cos of
    the position at frequencies 1 / 10000^(k / (dim/4))."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def encode(p: torch.Tensor) -> torch.Tensor:
        out = p.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def init_pos_embed(param: nn.Parameter, kind: str, grid: int, cls_token: bool) -> None:
    """``learned``: truncated normal std 0.02 (timm); ``sincos``: the fixed table (zeros for a CLS slot),
    frozen. The parameter keeps its name and shape either way, so checkpoints and exports load alike."""
    if kind == "learned":
        nn.init.trunc_normal_(param, std=0.02)
    elif kind == "sincos":
        with torch.no_grad():
            table = sincos_2d(param.shape[-1], grid)
            param.copy_(torch.cat([torch.zeros(1, table.shape[1]), table]) if cls_token else table)
        param.requires_grad_(False)
    else:
        raise ValueError(f"position embedding must be one of {POS_EMBEDS}, got {kind!r}")


def init_transformer_weights(module: nn.Module) -> None:
    """timm's default init for linear layers: truncated normal std 0.02, zero bias; LayerNorm 1, 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------- model


class VisionTransformer(nn.Module):
    """ViT with timm's parameter names. Input ``[B, 1, H, W]`` (grayscale, replicated) or ``[B, 3, H, W]``."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.embed_dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.embed_dim))
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        init_pos_embed(self.pos_embed, cfg.pos_embed, cfg.grid, cls_token=True)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_transformer_weights)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels -> tokens ``[B, 1 + N, D]`` with the position embedding added (CLS first)."""
        if x.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] == 1 and self.cfg.in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != self.cfg.in_chans or x.shape[-2:] != (self.cfg.img_size, self.cfg.img_size):
            raise ValueError(
                f"expected images [B, 1 or {self.cfg.in_chans}, {self.cfg.img_size}, {self.cfg.img_size}], "
                f"got {tuple(x.shape)}"
            )
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm semantics: all tokens (CLS first) after the final norm, ``[B, 1 + N, D]``."""
        x = self._embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]  # timm's global_pool="token"
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def patch_tokens(self, x: torch.Tensor, patch_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens after the final norm, CLS excluded: ``[B, N, D]``, or ``[B, K, D]`` for ``patch_idx``.

        ``patch_idx`` (int64 ``[B, K]``, raster positions ``row * grid + col``) selects the patches the
        network sees at all — the student encodes only its context — gathered after the position
        embedding is added, so every token keeps its place; the CLS token always takes part. Entries < 0
        (the masks' PAD) are padding: no token attends to them, and their outputs are meaningless, so a
        padded row gives its real tokens exactly what the image alone would get.
        """
        x = self._embed(x)
        mask = None
        if patch_idx is not None:
            patches = gather_tokens(x[:, 1:], patch_idx)
            x = torch.cat([x[:, :1], patches], dim=1)
            mask = key_padding_mask(F.pad(patch_idx >= 0, (1, 0), value=True))
        for blk in self.blocks:
            x = blk(x, mask)
        return self.norm(x)[:, 1:]


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x [B, N, D]``, ``idx int64 [B, K]`` -> ``[B, K, D]``; a padding index (< 0) reads token 0."""
    if idx.ndim != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"indices must be [B={x.shape[0]}, K], got {tuple(idx.shape)}")
    return torch.gather(x, 1, idx.clamp_min(0).unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def build_vit(arch: str | dict | ViTConfig, **overrides) -> VisionTransformer:
    """``build_vit("vit_base_patch16_224")``, ``build_vit({"name": "vit_test_tiny", "depth": 3})``, ..."""
    return VisionTransformer(vit_config(arch, **overrides))


# --------------------------------------------------------------------------------------------- FLOPs


def transformer_flops(n_tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs (multiply-add = 2) of ``depth`` pre-norm blocks on one sequence of ``n_tokens``."""
    linear = 2 * n_tokens * dim * (3 * dim + dim + 2 * mlp_ratio * dim)
    attention = 2 * 2 * n_tokens * n_tokens * dim  # QK^T and AV
    return depth * (linear + attention)


def vit_forward_flops(cfg: ViTConfig, n_patches_seen: int | None = None) -> float:
    """Forward FLOPs of one image: patch embedding over all patches, blocks over CLS + the patches seen."""
    n = cfg.num_patches if n_patches_seen is None else n_patches_seen
    embed = 2 * cfg.num_patches * cfg.in_chans * cfg.patch_size**2 * cfg.embed_dim
    return embed + transformer_flops(n + 1, cfg.embed_dim, cfg.depth, cfg.mlp_ratio)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

