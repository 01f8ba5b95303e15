"""Frozen encoders for the probe, named by a spec string, and their pooled features.

Specs:

* ``PATH`` — one of our checkpoints or exports, a URFM release file, or a timm ViT state dict /
  safetensors file (our ViT has timm's exact keys, so these load without timm). ``PATH#KEY`` picks the
  state dict stored under ``KEY`` in a checkpoint that holds several (e.g. ``#teacher``). The architecture
  is the one recorded in the file, else ``arch=`` / ``--arch``, else the paper's ``vit_base_patch16_224``.
* ``random:ARCH`` — a randomly initialised ViT with a fixed seed: the floor every encoder must beat.
* ``timm:MODEL:PATH`` — any timm model with a local weights file (needs timm, which needs torchvision).

Input normalisation: our ViTs see one channel normalised as in training, ``(x/255 - 0.449) / 0.226``
(``usjepa.shards.loader``'s default); timm models see the grayscale image replicated to three channels and
normalised with the model's own ``pretrained_cfg`` mean and std.

``identity`` is what the feature cache keys on: the sha256 of the weights file (plus the ``#KEY``), or of the
random weights themselves, so a changed file or a changed initialiser never reuses stale features.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from usjepa.models.loading import (
    encoder_state_dict,
    load_encoder,
    load_encoder_state,
    normalise_encoder_keys,
    read_weights_file,
)
from usjepa.models.vit import VisionTransformer, build_vit
from usjepa.shards.augment import DataConfig

log = logging.getLogger(__name__)

DEFAULT_ARCH = "vit_base_patch16_224"  # the paper's backbone; used when a file records no architecture
RANDOM_INIT_SEED = 0
GRAY_MEAN, GRAY_STD = DataConfig.mean, DataConfig.std  # exactly what the training loader normalises with
POOLINGS = ("mean", "cls")


class EncoderSpecError(ValueError):
    """An encoder spec that cannot be loaded (unknown form, missing file, timm unavailable)."""


@dataclass
class ProbeEncoder:
    spec: str
    model: nn.Module
    identity: str  # cache identity: hash of the weights (file or random init)
    description: str  # architecture / source, for the report
    img_size: int
    in_chans: int  # channels the encoder is fed (1: our ViT replicates itself; 3: timm)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_prefix_tokens: int = 1

    def to(self, device: torch.device | str) -> "ProbeEncoder":
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @torch.inference_mode()
    def pooled_features(self, images_u8: torch.Tensor, pooling: str = "mean", precision: str = "fp32") -> torch.Tensor:
        """uint8 ``[B, H, W]`` (already ``img_size``²) -> float32 ``[B, D]`` pooled after the final norm.

        ``precision="bf16"`` runs the encoder under bf16 autocast (matmuls in bf16, norms and the pooling
        in fp32); ``"fp32"`` is exact."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        x = images_u8.to(self.device, torch.float32).div_(255.0).unsqueeze(1)
        if self.in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = self.model.forward_features(x)
        if out.ndim == 4:  # a convolutional timm model: [B, C, H, W]
            if pooling == "cls":
                raise EncoderSpecError(f"{self.spec}: a convolutional model has no CLS token; use pooling 'mean'")
            return out.float().mean(dim=(2, 3))
        if pooling == "cls":
            if self.num_prefix_tokens < 1:
                raise EncoderSpecError(f"{self.spec}: the model has no CLS token; use pooling 'mean'")
            return out[:, 0].float()
        return out[:, self.num_prefix_tokens:].float().mean(dim=1)


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, memoised per (path, size, mtime) within the process (weights files are large)."""
    st = os.stat(path)
    memo_key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if memo_key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA_MEMO[memo_key] = h.hexdigest()
    return _SHA_MEMO[memo_key]


def state_dict_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _ours(model: VisionTransformer, spec: str, identity: str, description: str) -> ProbeEncoder:
    return ProbeEncoder(spec=spec, model=model.eval(), identity=identity, description=description,
                        img_size=model.cfg.img_size, in_chans=1, mean=(GRAY_MEAN,), std=(GRAY_STD,))


def _arch_name(model: VisionTransformer) -> str:
    c = model.cfg
    return f"ViT d{c.embed_dim} L{c.depth} H{c.num_heads} p{c.patch_size} {c.img_size}px"


def random_encoder(arch: str, spec: str | None = None, seed: int = RANDOM_INIT_SEED) -> ProbeEncoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_vit(arch)
    return _ours(model, spec or f"random:{arch}", "random:" + state_dict_sha256(model),
                 f"random init (seed {seed}), {_arch_name(model)}")


def _load_keyed(path: Path, key: str, arch) -> VisionTransformer:
    obj = read_weights_file(path)
    if key not in obj or not isinstance(obj[key], dict):
        raise EncoderSpecError(f"{path}: no state dict under {key!r}; keys: {sorted(obj)[:20]}")
    arch = arch or obj.get(f"{key}_arch") or obj.get("encoder_arch") or DEFAULT_ARCH
    sd, _ = encoder_state_dict(obj[key], f"{path}#{key}")
    model = build_vit(arch)
    sd, _ = normalise_encoder_keys(sd, keep_head=False)
    load_encoder_state(model, sd, f"{path}#{key}")
    return model


def _load_file(path: Path, key: str, arch: str | None) -> VisionTransformer:
    if key:
        return _load_keyed(path, key, arch)
    try:
        return load_encoder(path, arch)
    except ValueError as e:
        if arch is not None or "record" not in str(e):
            raise
        log.info("%s records no architecture; assuming %s (pass --arch to override)", path, DEFAULT_ARCH)
        return load_encoder(path, DEFAULT_ARCH)


def file_encoder(spec: str, arch: str | None = None) -> ProbeEncoder:
    path_s, _, key = spec.partition("#")
    path = Path(path_s).expanduser()
    if not path.is_file():
        raise EncoderSpecError(f"encoder weights file not found: {path} (spec {spec!r}); "
                               f"other forms: 'random:ARCH', 'timm:MODEL:PATH'")
    try:
        model = _load_file(path, key, arch)
    except EncoderSpecError:
        raise
    except (ValueError, KeyError, RuntimeError, OSError) as e:  # wrong shapes, foreign file, unreadable
        text = " ".join(part.strip() for part in str(e).splitlines()) or type(e).__name__
        text = text if len(text) <= 300 else text[:297] + "..."  # one readable line, not 200 key names
        raise EncoderSpecError(f"cannot load encoder {spec!r}: {text}") from e
    identity = f"file:{file_sha256(path)}" + (f"#{key}" if key else "")
    return _ours(model, spec, identity, f"{path.name}{'#' + key if key else ''}, {_arch_name(model)}")


def timm_encoder(spec: str) -> ProbeEncoder:
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise EncoderSpecError(f"timm spec must be 'timm:MODEL:PATH', got {spec!r}")
    name, path = parts[1], Path(parts[2]).expanduser()
    if not path.is_file():
        raise EncoderSpecError(f"timm weights file not found: {path}")
    try:
        import timm
    except Exception as e:  # ImportError, or timm failing on a missing torchvision
        raise EncoderSpecError(
            f"{spec}: timm is not importable here ({type(e).__name__}: {e}). Install timm and torchvision "
            f"(pip install 'usjepa[timm]'), or, for a ViT with timm's keys, pass the file path alone "
            f"(with --arch) to load it into our ViT without timm") from e
    model = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)})
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    mean = tuple(float(m) for m in cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(s) for s in cfg.get("std", (0.229, 0.224, 0.225)))
    return ProbeEncoder(spec=spec, model=model.eval(), identity=f"timm:{name}:{file_sha256(path)}",
                        description=f"timm {name} ({path.name})", img_size=size, in_chans=3, mean=mean, std=std,
                        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)))


def load_probe_encoder(spec: str, arch: str | None = None, device: str | torch.device | None = None) -> ProbeEncoder:
    """Load an encoder from its spec (see the module docstring), frozen, in eval mode, on ``device``."""
    if spec.startswith("random:"):
        try:
            enc = random_encoder(spec.split(":", 1)[1] or arch or DEFAULT_ARCH, spec)
        except (ValueError, KeyError) as e:
            raise EncoderSpecError(f"{spec}: {e}") from e
    elif spec.startswith("timm:"):
        enc = timm_encoder(spec)
    else:
        enc = file_encoder(spec, arch)
    for p in enc.model.parameters():
        p.requires_grad_(False)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return enc.to(device)
