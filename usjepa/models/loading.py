"""Loading encoders from the checkpoint formats we meet, and exporting ours as timm-loadable safetensors.

Accepted by ``load_encoder(path, arch)``:

* URFM's released file: a dict with ``ema_state_dict`` (keys prefixed ``module.``, plus the MIM decoder
  ``decoder*`` and ``mask_token``, which are not part of the encoder and are dropped);
* a timm checkpoint: ``.safetensors`` or a torch file holding a plain state dict (or one under ``state_dict``
  / ``model``);
* our own training checkpoints (``usjepa.checkpoint``; the encoder is stored under ``encoder``) and our
  exports (``export_encoder_safetensors``).

Only ``torch.load(weights_only=True)`` is used: a checkpoint is data, never code. Any key that does not fit
is an error that lists the missing, unexpected and wrongly shaped keys — never a silent partial load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
from dataclasses import asdict
from pathlib import Path

import torch

from usjepa.files import atomic_path
from usjepa.models.vit import ViTConfig, VisionTransformer, build_vit

log = logging.getLogger(__name__)

# Prefixes added by wrappers (DDP, torch.compile) that never belong to the parameter names.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Keys of pretraining heads that are not part of the encoder (URFM / MAE decoders, MIM mask tokens).
_NON_ENCODER_PREFIXES = ("decoder", "mask_token")


class CheckpointFormatError(ValueError):
    """A weights file that cannot be read as an encoder (unknown layout, missing keys, wrong shapes)."""


def read_weights_file(path: str | os.PathLike) -> dict:
    """Read a ``.safetensors`` file or a torch file (``weights_only=True``) into a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointFormatError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's own text suggests weights_only=False: never repeat that
        raise CheckpointFormatError(f"{path}: not a readable torch checkpoint (refused: {refused_pickle_reason(e)})") from None
    except Exception as e:
        raise CheckpointFormatError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def refused_pickle_reason(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, without torch's advice to load it unsafely."""
    m = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f"it asks for {m.group(1)}" if m else "it holds an unsupported pickle instruction"
    return (f"{what}; it holds Python objects other than tensors, numbers, strings, lists and dicts, and loading "
            f"them would run code from the file")


def encoder_state_dict(obj: dict, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """Pick the encoder's state dict out of a loaded file; returns (state dict, layout name)."""
    if "ema_state_dict" in obj:
        sd, layout = obj["ema_state_dict"], "urfm"
    elif obj.get("format") == "usjepa-checkpoint" or ("encoder" in obj and isinstance(obj["encoder"], dict)):
        sd, layout = obj["encoder"], "usjepa"
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd, layout = obj["state_dict"], "state_dict"
    elif "model" in obj and isinstance(obj["model"], dict):
        sd, layout = obj["model"], "model"
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd, layout = obj, "plain"
    else:
        raise CheckpointFormatError(
            f"{source}: no encoder weights found (looked for 'ema_state_dict', 'encoder', 'state_dict', "
            f"'model' or a plain state dict); top-level keys: {sorted(obj)[:20]}"
        )
    if not isinstance(sd, dict):
        raise CheckpointFormatError(f"{source}: encoder weights ({layout}) are a {type(sd).__name__}, not a dict")
    return sd, layout


def normalise_encoder_keys(sd: dict[str, torch.Tensor], keep_head: bool) -> tuple[dict, list[str]]:
    """Strip wrapper prefixes, drop decoder / mask-token (and the classifier head unless kept)."""
    out, dropped = {}, []
    for k, v in sd.items():
        for p in _WRAPPER_PREFIXES:
            while k.startswith(p):
                k = k[len(p) :]
        if k.startswith(_NON_ENCODER_PREFIXES) or (not keep_head and k.startswith("head.")):
            dropped.append(k)
            continue
        out[k] = v
    return out, dropped


def load_encoder_state(model: VisionTransformer, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with an error that names every missing, unexpected and mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(sd) & set(own)
        if tuple(sd[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        raise CheckpointFormatError(
            f"{source} does not fit {model.cfg}:\n  missing keys: {missing}\n  unexpected keys: {unexpected}\n"
            f"  shape mismatches: {shapes}"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def load_encoder(
    path: str | os.PathLike, arch: str | dict | ViTConfig | None = None, **overrides
) -> VisionTransformer:
    """Build a ViT and load its weights from ``path`` (URFM, timm/safetensors, or our checkpoint/export).

    ``arch`` may be omitted for our own checkpoints and exports, which record their architecture.
    A classifier head in the file is dropped unless the architecture asks for one (``num_classes > 0``).
    """
    obj = read_weights_file(path)
    sd, layout = encoder_state_dict(obj, str(path))
    if arch is None:
        arch = _recorded_arch(path, obj)
        if arch is None:
            raise ValueError(f"{path}: the file does not record its architecture; pass arch=")
    model = build_vit(arch, **overrides)
    sd, dropped = normalise_encoder_keys(sd, keep_head=model.num_classes > 0)
    load_encoder_state(model, sd, f"{path} ({layout} layout)")
    if dropped:
        log.info("%s: dropped %d non-encoder keys (%s...)", path, len(dropped), ", ".join(dropped[:4]))
    return model


def _recorded_arch(path, obj: dict) -> dict | None:
    if isinstance(obj.get("encoder_arch"), dict):
        return obj["encoder_arch"]
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "usjepa_arch" in meta:
            return json.loads(meta["usjepa_arch"])
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes: the identity of a teacher, recorded in checkpoints and exports."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_encoder_safetensors(model: VisionTransformer, path: str | os.PathLike,
                               metadata: dict[str, str] | None = None) -> Path:
    """Write the encoder alone as a safetensors file that timm loads as-is (atomic: tmp file + rename).

    ``timm.create_model("vit_base_patch16_224", num_classes=0, pretrained=True,
    pretrained_cfg_overlay={"file": path})`` loads it; so does ``load_encoder(path)``.
    """
    from safetensors.torch import save_file

    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    path = Path(path)
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:  # save_file creates its file 0600; atomic_path gives it the usual mode
        save_file(sd, str(tmp), metadata={"format": "pt", "usjepa_arch": json.dumps(asdict(model.cfg)),
                                          **(metadata or {})})
    return path


__all__ = [
    "CheckpointFormatError",
    "read_weights_file",
    "encoder_state_dict",
    "normalise_encoder_keys",
    "load_encoder_state",
    "load_encoder",
    "export_encoder_safetensors",
]
