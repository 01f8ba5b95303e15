"""Labelled images -> encoder input -> pooled features, extracted once and cached on disk.

An image goes through the ingest preprocessing (``usjepa.ingest.preprocess.preprocess_frame``: grayscale,
annotation inpainting, USrc mask, percentile rescale inside the mask, longer side ≤ ``max_side``), then is
resized to the encoder's square input (``img_size``², area interpolation; the mask nearest-neighbour), as the
deterministic validation path of training does. For robustness, the corruption (``usjepa.shards.corruptions``,
the same functions the augmentations use) is applied to that encoder-sized image with its mask, with noise
seeded from the image's path, so a corrupted test set is the same on every run.

Cache: one safetensors file per (encoder, data, preprocessing, pooling, corruption), named by the sha256 of
all of them (``feature_cache_key``); the key is also stored in the file's metadata and checked on load.
No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from usjepa.probe.data import LabelledImage, LabelledSet
from usjepa.probe.encoders import ProbeEncoder

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


class ImageReadError(ValueError):
    """A labelled image that cannot be decoded."""


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to uint8 ``[H, W]`` or BGR ``[H, W, 3]`` (16-bit scaled, alpha dropped)."""
    raw = np.fromfile(path, dtype=np.uint8)
    img = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if img is None:
        raise ImageReadError(f"cannot decode image {path}")
    if img.dtype == np.uint16:
        img = (img / 257.0).round().astype(np.uint8)
    elif img.dtype != np.uint8:
        lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
        img = ((img - lo) / (hi - lo + 1e-12) * 255).round().astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    return np.ascontiguousarray(img)


def prepare_image(item: LabelledImage, preprocess_cfg, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One labelled image -> (uint8 ``[size, size]``, bool mask ``[size, size]``) as the encoder sees it."""
    from usjepa.ingest.preprocess import preprocess_frame

    frame = read_image(item.path)
    usrc = None
    if item.scan_mask is not None:
        m = read_image(item.scan_mask)
        m = m if m.ndim == 2 else m.max(axis=2)
        usrc = cv2.resize((m > 0).astype(np.uint8), (frame.shape[1], frame.shape[0]),
                          interpolation=cv2.INTER_NEAREST).astype(bool)
    try:
        gray, mask = preprocess_frame(frame, preprocess_cfg, usrc_mask=usrc)
    except Exception as e:  # name the file: a bare preprocessing error deep in a loader worker helps no one
        raise ImageReadError(f"cannot preprocess {item.path}: {type(e).__name__}: {e}") from e
    gray = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)
    return gray, mask


def corrupted(img: np.ndarray, mask: np.ndarray, kind: str, eps: float, seed_text: str) -> np.ndarray:
    """The test-time corruption (shared with the augmentations), as uint8, with per-image seeded noise."""
    from usjepa.shards.corruptions import corrupt

    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little"))
    out = np.asarray(corrupt(img, kind, eps, mask=mask, rng=rng))
    if out.dtype != np.uint8:
        out = np.clip(np.rint(out.astype(np.float64)), 0, 255).astype(np.uint8)
    return out


def preprocess_dict(preprocess_cfg) -> dict:
    if dataclasses.is_dataclass(preprocess_cfg):
        return dataclasses.asdict(preprocess_cfg)
    return dict(vars(preprocess_cfg))


def feature_cache_key(encoder: ProbeEncoder, data: LabelledSet, indices: np.ndarray, preprocess_cfg,
                      pooling: str, corruption: tuple[str, float] | None) -> str:
    parts = {
        "format": CACHE_FORMAT,
        "encoder": encoder.identity,
        "input": [encoder.img_size, encoder.in_chans, list(encoder.mean), list(encoder.std)],
        "data": data.digest(),
        "indices": hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest(),
        "preprocess": preprocess_dict(preprocess_cfg),
        "pooling": pooling,
        "corruption": list(corruption) if corruption else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class EncoderInputs(torch.utils.data.Dataset):
    """``data.items[indices]`` as encoder-sized uint8 images (decoded and preprocessed in loader workers)."""

    def __init__(self, data: LabelledSet, indices: np.ndarray, preprocess_cfg, size: int,
                 corruption: tuple[str, float] | None):
        self.data, self.indices, self.cfg, self.size, self.corruption = data, indices, preprocess_cfg, size, corruption

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> np.ndarray:
        item = self.data.items[int(self.indices[k])]
        img, mask = prepare_image(item, self.cfg, self.size)
        if self.corruption is not None:
            kind, eps = self.corruption
            rel = item.path.relative_to(self.data.root).as_posix()
            img = corrupted(img, mask, kind, eps, f"{kind}\0{eps}\0{rel}")
        return img


def default_workers() -> int:
    """Preprocessing is the CPU-side cost: use spare cores, none on a small machine."""
    n = os.cpu_count() or 1
    return 0 if n <= 2 else min(8, n // 2)


@dataclass
class FeatureTable:
    features: np.ndarray  # float32 [n, D], rows in the order of ``indices``
    key: str
    path: Path | None
    from_cache: bool


def _load_cached(path: Path, key: str, n: int) -> np.ndarray | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            feats = f.get_tensor("features").numpy()
    except Exception as e:  # a truncated or foreign file: re-extract, never trust it
        log.warning("ignoring unreadable feature cache %s (%s)", path, e)
        return None
    return feats if feats.ndim == 2 and feats.shape[0] == n else None


def extract_features(encoder: ProbeEncoder, data: LabelledSet, indices: np.ndarray, preprocess_cfg, *,
                     pooling: str = "mean", corruption: tuple[str, float] | None = None,
                     cache_dir: str | os.PathLike | None = None, batch_size: int = 32,
                     workers: int | None = None, progress: bool = False) -> FeatureTable:
    """Pooled features of ``data.items[indices]`` (optionally corrupted), from the cache when the key matches."""
    indices = np.asarray(indices, dtype=np.int64)
    key = feature_cache_key(encoder, data, indices, preprocess_cfg, pooling, corruption)
    path = Path(cache_dir) / f"{key[:32]}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        feats = _load_cached(path, key, len(indices))
        if feats is not None:
            return FeatureTable(feats, key, path, from_cache=True)

    images = EncoderInputs(data, indices, preprocess_cfg, encoder.img_size, corruption)
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False,
                                         num_workers=default_workers() if workers is None else workers)
    if progress:
        from tqdm import tqdm

        what = f"{corruption[0]} eps={corruption[1]:g}" if corruption else "clean"
        loader = tqdm(loader, desc=f"features {data.name} {what}", unit="batch", leave=False)
    chunks = [encoder.pooled_features(x, pooling).cpu().numpy().astype(np.float32) for x in loader]
    feats = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    if not np.isfinite(feats).all():
        raise FloatingPointError(f"encoder {encoder.spec!r} produced non-finite features on {data.name}")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two runs sharing a cache never collide
        save_file({"features": torch.from_numpy(feats)}, str(tmp),
                  metadata={"key": key, "encoder": encoder.spec, "dataset": data.name, "pooling": pooling,
                            "corruption": json.dumps(list(corruption) if corruption else None)})
        os.replace(tmp, path)
    return FeatureTable(feats, key, path, from_cache=False)
