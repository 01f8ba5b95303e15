"""``usjepa-ingest contact-sheet``: a PNG grid of frames from a corpus, each with the outline of its USrc
mask in green, for looking at what ingest made of the data (the masks must follow the scan sector and leave
out text, rulers and borders).

* default: random frames, spread evenly over the datasets and over distinct source files;
* ``sort="coverage"``: the frames whose mask covers the smallest share of the frame first — an under-covering
  mask (dark tissue cut off) is the usual failure, and a sheet of the worst is where to look; one frame per
  source file, over at most ``SCAN_LIMIT`` frames;
* ``diff=OLD_ROOT``: frames present in both corpora (same key), the old mask's outline in red and the new
  one in green, largest disagreement (1 − IoU) first — for reviewing a change of the mask algorithm.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from usjepa.ingest.progress import with_progress
from usjepa.shards.format import (IMAGE_EXT, MASK_EXT, META_EXT, SampleMeta, load_manifest, read_index, read_member,
                                  sample_key)


SCAN_LIMIT = 5000  # frames read to rank by coverage or disagreement (one per source is kept)


def _tile(img: np.ndarray, mask: np.ndarray, cell: int, caption: str, old_mask: np.ndarray | None = None) -> np.ndarray:
    bgr = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    width = max(1, round(max(img.shape) / cell))
    for m, colour in ((old_mask, (0, 0, 255)), (mask, (0, 255, 0))):
        if m is not None:
            contours, _ = cv2.findContours((m > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(bgr, contours, -1, colour, width)
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


def _samples_by_dataset(manifest: dict) -> dict[str, list[dict]]:
    by_dataset: dict[str, list[dict]] = {}
    for s in manifest["shards"]:
        if s["samples"]:
            by_dataset.setdefault(s["dataset"], []).append(s)
    return by_dataset


def _random_picks(by_dataset: dict, n: int, rng, indexes: dict) -> list[tuple]:
    """n random samples, spread evenly over the datasets and over distinct source files where possible."""
    names = sorted(by_dataset)
    out = []
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
        out += picked + repeats[: max(0, want - len(picked))]
    return out


def _scan(by_dataset: dict, rng, indexes: dict, progress: bool = False):
    """Up to SCAN_LIMIT samples in random order (all of them for a small corpus)."""
    flat = [(s, i) for shards in by_dataset.values() for s in shards for i in range(s["samples"])]
    picks = rng.permutation(len(flat))[:SCAN_LIMIT]
    if progress:
        picks = with_progress(picks, len(picks), "contact-sheet", "frames read")
    for k in picks:
        yield _read_sample(*flat[int(k)], indexes)


def _old_masks(old_root: str | Path) -> tuple[dict, dict]:
    """key -> (shard, position) over an older corpus, to look its masks up by key."""
    manifest = load_manifest(old_root)
    where = {}
    for s in manifest["shards"]:
        for i, key in enumerate(read_index(s["abs_index"]).keys):
            where[key] = (s, i)
    return where, {}


def make_contact_sheet(root: str | Path, out: str | Path, n: int = 24, cols: int = 6, cell: int = 160,
                       seed: int = 0, sort: str = "random", diff: str | Path | None = None,
                       progress: bool = False) -> Path:
    """Write a grid of ``n`` samples (module doc: random, ``sort="coverage"``, or ``diff=OLD_ROOT``).
    Returns the PNG path. ``progress``: a bar or periodic lines on stderr while frames are scanned."""
    if sort not in ("random", "coverage"):
        raise ValueError(f"sort must be 'random' or 'coverage', got {sort!r}")
    manifest = load_manifest(root)
    rng = np.random.default_rng(seed)
    by_dataset = _samples_by_dataset(manifest)
    if not by_dataset:
        raise ValueError(f"{root}: the corpus holds no samples")
    indexes: dict[str, object] = {}
    tiles = []
    if diff is None and sort == "random":
        for img, mask, meta in _random_picks(by_dataset, n, rng, indexes):
            tiles.append(_tile(img, mask, cell, f"{meta.dataset}:{Path(meta.source).name}#{meta.frame}"))
    else:
        old_where, old_indexes = _old_masks(diff) if diff is not None else ({}, {})
        ranked = {}  # one frame per source: the worst of it
        for img, mask, meta in _scan(by_dataset, rng, indexes, progress):
            valid = mask > 0
            if diff is not None:
                key = sample_key(meta.dataset, meta.source, meta.frame)
                if key not in old_where:
                    continue
                old = _read_sample(*old_where[key], old_indexes)[1] > 0
                if old.shape != valid.shape:
                    old = cv2.resize(old.astype(np.uint8), valid.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
                union = np.count_nonzero(old | valid)
                score = 1.0 - (np.count_nonzero(old & valid) / union if union else 1.0)  # larger = worse
                caption = f"IoU {1 - score:.2f} {Path(meta.source).name}#{meta.frame}"
            else:
                old, score = None, 1.0 - valid.mean()  # lower coverage = worse
                caption = f"{valid.mean():.0%} {Path(meta.source).name}#{meta.frame}"
            src = (meta.dataset, meta.source)
            if src not in ranked or score > ranked[src][0]:
                ranked[src] = (score, img, mask, old, caption)
        if not ranked:
            raise ValueError(f"{root}: no frame shared with {diff}" if diff is not None else f"{root}: no samples")
        for _, img, mask, old, caption in sorted(ranked.values(), key=lambda r: -r[0])[:n]:
            tiles.append(_tile(img, mask, cell, caption, old_mask=old))
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
