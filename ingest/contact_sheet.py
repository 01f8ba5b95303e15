"""``usjepa-ingest contact-sheet``: a PNG grid of random frames from a corpus, each with the outline of its
USrc mask in green, for looking at what ingest made of the data (the masks must follow the scan sector and
leave out text, rulers and borders)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from usjepa.shards.format import IMAGE_EXT, MASK_EXT, META_EXT, SampleMeta, load_manifest, read_index, read_member


def _tile(img: np.ndarray, mask: np.ndarray, cell: int, caption: str) -> np.ndarray:
    bgr = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(bgr, contours, -1, (0, 255, 0), max(1, round(max(img.shape) / cell)))
    h, w = bgr.shape[:2]
    s = cell / max(h, w)
    bgr = cv2.resize(bgr, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    tile = np.zeros((cell + 14, cell, 3), np.uint8)
    y0, x0 = (cell - bgr.shape[0]) // 2, (cell - bgr.shape[1]) // 2
    tile[y0 : y0 + bgr.shape[0], x0 : x0 + bgr.shape[1]] = bgr
    cv2.putText(tile, caption[: cell // 6], (2, cell + 11), cv2.FONT_HERSHEY_PLAIN, 0.8, (255, 255, 255), 1)
    return tile


def _read_sample(shard: dict, i: int, indexes: dict) -> tuple[np.ndarray, np.ndarray, SampleMeta]:
    if shard["abs_index"] not in indexes:
        indexes[shard["abs_index"]] = read_index(shard["abs_index"])
    index = indexes[shard["abs_index"]]
    fd = os.open(shard["abs_path"], os.O_RDONLY)
    try:
        raw = {e: read_member(fd, index.offsets[e][i], index.sizes[e][i]) for e in (IMAGE_EXT, MASK_EXT, META_EXT)}
    finally:
        os.close(fd)
    img = cv2.imdecode(np.frombuffer(raw[IMAGE_EXT], np.uint8), cv2.IMREAD_GRAYSCALE)
    mask = cv2.imdecode(np.frombuffer(raw[MASK_EXT], np.uint8), cv2.IMREAD_GRAYSCALE)
    return img, mask, SampleMeta.from_json(raw[META_EXT])


def make_contact_sheet(root: str | Path, out: str | Path, n: int = 24, cols: int = 6, cell: int = 160,
                       seed: int = 0) -> Path:
    """Write a grid of ``n`` random samples, spread evenly over the datasets (a small dataset is not drowned
    by a large one) and over distinct source files where there are enough. Returns the PNG path."""
    manifest = load_manifest(root)
    rng = np.random.default_rng(seed)
    by_dataset: dict[str, list[dict]] = {}
    for s in manifest["shards"]:
        if s["samples"]:
            by_dataset.setdefault(s["dataset"], []).append(s)
    if not by_dataset:
        raise ValueError(f"{root}: the corpus holds no samples")
    names = sorted(by_dataset)
    indexes: dict[str, object] = {}
    tiles = []
    for k, name in enumerate(names):
        want = n // len(names) + (1 if k < n % len(names) else 0)
        shards = by_dataset[name]
        bounds = np.cumsum([s["samples"] for s in shards])
        picked, sources_seen, repeats = [], set(), []
        # random frames, preferring distinct source files (three frames of one clip say little)
        for g in rng.permutation(int(bounds[-1]))[: 50 * want]:
            if len(picked) >= want:
                break
            j = int(np.searchsorted(bounds, g, side="right"))
            i = int(g - (bounds[j - 1] if j else 0))
            sample = _read_sample(shards[j], i, indexes)
            if sample[2].source in sources_seen:
                if len(repeats) < want:
                    repeats.append(sample)
                continue
            sources_seen.add(sample[2].source)
            picked.append(sample)
        picked += repeats[: max(0, want - len(picked))]
        for img, mask, meta in picked:
            tiles.append(_tile(img, mask, cell, f"{meta.dataset}:{Path(meta.source).name}#{meta.frame}"))
    rows = []
    blank = np.zeros_like(tiles[0])
    for r in range(0, len(tiles), cols):
        row = tiles[r : r + cols]
        rows.append(np.hstack(row + [blank] * (cols - len(row))))
    sheet = np.vstack(rows)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), sheet, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise OSError(f"cannot write {out}")
    return out
