"""Small synthetic corpora in the real shard format, for the loader tests and the loader benchmark.

Each frame is a fan-shaped "scan sector" of speckle-textured tissue on black, with its exact USrc mask
(the sector), written with ``ShardWriter`` and a manifest like ``usjepa-ingest`` writes. With
``flat=True`` the valid region is a uniform white (255) rectangle on black: it is then recoverable from
the augmented pixels by a threshold, which is how the tests check the mask co-transform.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Mapping

import cv2
import numpy as np

from usjepa.shards.format import FORMAT_VERSION, MANIFEST_NAME, SampleMeta, ShardWriter, write_json_atomic


def sector_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A random fan-shaped region (apex above the top edge), as a bool [h, w] mask."""
    cy = -rng.uniform(0.05, 0.3) * h
    cx = w * rng.uniform(0.4, 0.6)
    half = np.deg2rad(rng.uniform(25, 45))
    r0, r1 = -cy + rng.uniform(0.02, 0.1) * h, -cy + h * rng.uniform(0.75, 1.0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = np.arctan2(xx - cx, yy - cy)
    rad = np.hypot(xx - cx, yy - cy)
    return (np.abs(ang) < half) & (rad > r0) & (rad < r1)


def synthetic_frame(h: int, w: int, rng: np.random.Generator, flat: bool = False) -> tuple[np.ndarray, np.ndarray]:
    if flat:  # an axis-aligned white rectangle: its edges survive any crop, flip and resize unambiguously
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        y1, x1 = int(rng.integers(y0 + h // 8, h + 1)), int(rng.integers(x0 + w // 8, w + 1))
        mask = np.zeros((h, w), bool)
        mask[y0:y1, x0:x1] = True
        return np.where(mask, 255, 0).astype(np.uint8), mask
    mask = sector_mask(h, w, rng)
    low = cv2.resize(rng.uniform(60, 200, (h // 16 + 1, w // 16 + 1)).astype(np.float32), (w, h))
    speckle = rng.rayleigh(0.5, (h, w)).astype(np.float32)
    img = np.clip(low * speckle, 0, 255).astype(np.uint8)
    img[~mask] = 0
    return img, mask


def encode_frame(img: np.ndarray, mask: np.ndarray, quality: int = 90) -> tuple[bytes, bytes]:
    ok1, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    ok2, png = cv2.imencode(".png", mask.astype(np.uint8), [cv2.IMWRITE_PNG_BILEVEL, 1])
    if not (ok1 and ok2):
        raise RuntimeError("OpenCV could not encode a synthetic frame")
    return jpg.tobytes(), png.tobytes()


def write_synthetic_corpus(
    root: str | Path,
    datasets: Mapping[str, int],
    split: str = "train",
    size: tuple[int, int] = (240, 320),
    per_shard: int = 64,
    seed: int = 0,
    flat: bool = False,
    masks_per_video: int = 1,
) -> Path:
    """Write ``datasets`` ({name: n_frames}) as shards of ``split`` plus ``manifest.json`` under ``root``.

    ``masks_per_video`` > 1 makes runs of consecutive frames share one sector (like a video's frames)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, ds_info = [], {}
    h, w = size
    for name, n in datasets.items():
        number, i, writer = 0, 0, None
        mask = None
        while i < n:
            if writer is None:
                writer = ShardWriter(root, name, split, number)
            if flat or i % masks_per_video == 0 or mask is None:
                img, mask = synthetic_frame(h, w, rng, flat)
            else:
                img, _ = synthetic_frame(h, w, rng, flat)
                img[~mask] = 0
            jpg, png = encode_frame(img, mask)
            meta = SampleMeta(dataset=name, anatomy="synthetic", source=f"{name}/{i // masks_per_video}.mp4",
                              frame=i, group=f"{name}-{i // masks_per_video}", orig_size=(h, w), split=split)
            writer.write(f"{name}_{i:08d}", jpg, png, meta)
            i += 1
            if writer.samples == per_shard or i == n:
                shards.append(writer.close().to_dict())
                writer, number = None, number + 1
        ds_info[name] = {"anatomy": "synthetic", "kind": "video", "sources": -(-n // masks_per_video),
                         "frames": {split: n, "val" if split == "train" else "train": 0}, "skipped": 0}
    write_json_atomic(root / MANIFEST_NAME, {
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "preprocess": {"synthetic": True, "size": list(size)},
        "split": {"val_fraction": 0.0, "rule": "synthetic"},
        "datasets": ds_info,
        "shards": shards,
        "skipped": [],
    })
    return root
