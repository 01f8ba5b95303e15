"""A tiny corpus of real shards, written straight through the shard format, for trainer tests and benchmarks.

The full path (raw files -> ``usjepa-ingest`` -> shards) is what ``make demo`` runs; the trainer's own tests
and benchmark only need shards, and writing ~100 small frames directly takes a fraction of a second. Frames
are ultrasound-like: a fan-shaped valid region (the USrc mask), speckle, and a few bright ellipses, so the
models have structure to learn and the block masks meet a realistic validity grid.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import cv2
import numpy as np

from usjepa.shards.format import FORMAT_VERSION, MANIFEST_NAME, SampleMeta, ShardWriter, sample_key, write_json_atomic


def toy_frame(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(gray uint8 [h, w], mask bool [h, w]): a sector scan with speckle and a few ellipses."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    apex_x, apex_y = w / 2, -0.1 * h
    angle = np.degrees(np.arctan2(xx - apex_x, yy - apex_y))
    radius = np.hypot(xx - apex_x, yy - apex_y)
    half = rng.uniform(30, 45)
    mask = (np.abs(angle) < half) & (radius > 0.2 * h) & (radius < 1.05 * h)
    img = np.full((h, w), 40, np.float32) + 25 * np.sin(radius / rng.uniform(6, 14))
    for _ in range(rng.integers(1, 4)):
        c = (int(rng.uniform(0.3, 0.7) * w), int(rng.uniform(0.35, 0.85) * h))
        axes = (int(rng.uniform(0.05, 0.15) * w), int(rng.uniform(0.05, 0.12) * h))
        cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(120, 230)), -1)
    img *= rng.gamma(4.0, 0.25, size=(h, w)).astype(np.float32)  # multiplicative speckle
    img = cv2.GaussianBlur(img, (3, 3), 0.8)
    img = np.where(mask, np.clip(img, 0, 255), 0).astype(np.uint8)
    return img, mask


def write_toy_shards(root: str | os.PathLike, n_train: int = 64, n_val: int = 16, size: tuple[int, int] = (240, 300),
                     seed: int = 0, datasets: tuple[str, ...] = ("toy_a", "toy_b"), per_shard: int = 32) -> Path:
    """Write ``n_train`` / ``n_val`` frames split over ``datasets`` as shards + manifest under ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, ds_info = [], {}
    for split, n in (("train", n_train), ("val", n_val)):
        for d_i, ds in enumerate(datasets):
            count = n // len(datasets) + (1 if d_i < n % len(datasets) else 0)
            info = ds_info.setdefault(ds, {"anatomy": "toy", "kind": "stills", "sources": 0,
                                           "frames": {"train": 0, "val": 0}, "skipped": 0})
            for number, start in enumerate(range(0, count, per_shard)):
                w = ShardWriter(root, ds, split, number)
                try:
                    for i in range(start, min(count, start + per_shard)):
                        img, mask = toy_frame(rng, *size)
                        src = f"{split}/{i:05d}.png"
                        meta = SampleMeta(dataset=ds, anatomy="toy", source=src, frame=0, group=src,
                                          orig_size=size, split=split, label=None)
                        jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
                        png = cv2.imencode(".png", mask.astype(np.uint8) * 255, [cv2.IMWRITE_PNG_BILEVEL, 1])[1].tobytes()
                        w.write(sample_key(ds, src, 0), jpg, png, meta)
                    shards.append(w.close().to_dict())
                except BaseException:
                    w.abort()
                    raise
            info["frames"][split] += count
            info["sources"] += count
    write_json_atomic(root / MANIFEST_NAME, {
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "preprocess": {"toy": True},
        "split": {"val_fraction": n_val / max(1, n_train + n_val), "rule": "toy"},
        "datasets": ds_info, "shards": shards, "skipped": [],
    })
    return root
