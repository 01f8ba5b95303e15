"""Small synthetic corpora in the real shard format, for tests and benchmarks (loader, trainer, probe).

Each frame is a fan-shaped "scan sector" of speckle-textured tissue with a few bright lesions, on black,
with its exact USrc mask (the sector), written with ``ShardWriter`` and a manifest like ``usjepa-ingest``
writes. The lesions and the smooth tissue field give the models structure to learn; the sector gives the
block masks a realistic validity grid. Writing ~100 small frames directly takes a fraction of a second,
where the full path (raw files -> ``usjepa-ingest`` -> shards) is what ``make demo`` runs.

With ``flat=True`` the valid region is a uniform white (255) rectangle on black: it is then recoverable
from the augmented pixels by a threshold, which is how the loader tests check the mask co-transform.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Mapping

import cv2
import numpy as np

from usjepa.shards.corruptions import masked_median
from usjepa.shards.format import FORMAT_VERSION, MANIFEST_NAME, SampleMeta, ShardWriter, sample_key, write_json_atomic
from usjepa.shards.readers import build_corpus_table


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
    """(gray uint8 [h, w], mask bool [h, w])."""
    if flat:  # an axis-aligned white rectangle: its edges survive any crop, flip and resize unambiguously
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        y1, x1 = int(rng.integers(y0 + h // 8, h + 1)), int(rng.integers(x0 + w // 8, w + 1))
        mask = np.zeros((h, w), bool)
        mask[y0:y1, x0:x1] = True
        return np.where(mask, 255, 0).astype(np.uint8), mask
    mask = sector_mask(h, w, rng)
    tissue = cv2.resize(rng.uniform(60, 200, (h // 16 + 1, w // 16 + 1)).astype(np.float32), (w, h))
    for _ in range(rng.integers(1, 4)):  # bright lesions, within the tissue's range so clipping stays rare
        c = (int(rng.uniform(0.3, 0.7) * w), int(rng.uniform(0.35, 0.85) * h))
        axes = (int(rng.uniform(0.05, 0.15) * w), int(rng.uniform(0.05, 0.12) * h))
        cv2.ellipse(tissue, c, axes, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(150, 200)), -1)
    speckle = rng.rayleigh(0.5, (h, w)).astype(np.float32)
    img = np.clip(tissue * speckle, 0, 255).astype(np.uint8)
    img[~mask] = 0
    return img, mask


def encode_frame(img: np.ndarray, mask: np.ndarray, quality: int = 90) -> tuple[bytes, bytes]:
    ok1, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    ok2, png = cv2.imencode(".png", mask.astype(np.uint8), [cv2.IMWRITE_PNG_BILEVEL, 1])
    if not (ok1 and ok2):
        raise RuntimeError("OpenCV could not encode a synthetic frame")
    return jpg.tobytes(), png.tobytes()


def _write_split(root: Path, name: str, split: str, n: int, size: tuple[int, int], per_shard: int,
                 rng: np.random.Generator, flat: bool, masks_per_video: int) -> list[dict]:
    """``n`` frames of dataset ``name`` in ``split`` as shards; returns their manifest entries."""
    h, w = size
    shards, number, i, writer, mask = [], 0, 0, None, None
    while i < n:
        if writer is None:
            writer = ShardWriter(root, name, split, number)
        try:
            if flat or i % masks_per_video == 0 or mask is None:
                img, mask = synthetic_frame(h, w, rng, flat)
            else:  # a later frame of the same "video": new content, the video's sector
                img, _ = synthetic_frame(h, w, rng, flat)
                img[~mask] = 0
            jpg, png = encode_frame(img, mask)
            source = f"{split}/{name}/{i // masks_per_video}.mp4"
            meta = SampleMeta(dataset=name, anatomy="synthetic", source=source, frame=i,
                              group=f"{name}-{split}-{i // masks_per_video}", orig_size=(h, w), split=split,
                              median=masked_median(img, mask))
            writer.write(sample_key(name, source, i), jpg, png, meta)
            i += 1
            if writer.samples == per_shard or i == n:
                shards.append(writer.close().to_dict())
                writer, number = None, number + 1
        except BaseException:
            writer.abort()
            raise
    return shards


def write_synthetic_corpus(
    root: str | Path,
    datasets: Mapping[str, int],
    split: str = "train",
    size: tuple[int, int] = (240, 320),
    per_shard: int = 64,
    seed: int = 0,
    flat: bool = False,
    masks_per_video: int = 1,
    val: Mapping[str, int] | None = None,
) -> Path:
    """Write ``datasets`` ({name: n_frames}) as shards of ``split`` plus ``manifest.json`` under ``root``.

    ``val`` ({name: n_frames}) adds a val split to the same manifest (with ``split="train"``).
    ``masks_per_video`` > 1 makes runs of consecutive frames share one sector (like a video's frames)."""
    if val is not None and split != "train":
        raise ValueError(f"val frames go with split='train', not split={split!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {split: dict(datasets), **({"val": dict(val)} if val is not None else {})}
    shards, ds_info = [], {}
    for sp, counts in splits.items():
        for name, n in counts.items():
            shards += _write_split(root, name, sp, n, size, per_shard, rng, flat, masks_per_video)
            info = ds_info.setdefault(name, {"anatomy": "synthetic", "kind": "video", "sources": 0,
                                             "frames": {"train": 0, "val": 0}, "skipped": 0})
            info["frames"][sp] = info["frames"].get(sp, 0) + n
            info["sources"] += -(-n // masks_per_video)
    n_val = sum(info["frames"]["val"] for info in ds_info.values())
    n_all = sum(sum(info["frames"].values()) for info in ds_info.values())
    write_json_atomic(root / MANIFEST_NAME, {
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "preprocess": {"synthetic": True, "size": list(size)},
        "split": {"val_fraction": n_val / max(1, n_all), "rule": "synthetic"},
        "datasets": ds_info,
        "shards": shards,
        "skipped": [],
    })
    build_corpus_table(root)  # as usjepa-ingest does
    return root
