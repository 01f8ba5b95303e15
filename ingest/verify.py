"""``usjepa-ingest verify``: re-check every shard of a corpus against its manifest.

Per shard: the file exists with the manifest's size and sha256; its DALI index parses, lists the manifest's
sample count, and every member lies inside the tar; streaming the tar gives the index's keys in the same
order, and the bytes at each index offset are the member's bytes; every JPEG and PNG decodes, with the
mask the size of the frame; every JSON is valid ``SampleMeta`` of the shard's dataset and split. Across
the corpus: no key twice, and per-dataset train/val counts equal the manifest's.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from usjepa.ingest.progress import with_progress
from usjepa.shards.format import (IMAGE_EXT, MASK_EXT, META_EXT, SampleMeta, ShardFormatError, iter_tar_samples,
                                  load_manifest, read_index, read_member)


def _sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def verify_shard(shard: dict, keys_seen: set) -> tuple[list[str], Counter]:
    """Problems found in one shard (empty when it is sound) and its per-(dataset, split) sample count."""
    problems: list[str] = []
    counts: Counter = Counter()
    name = shard["path"]
    tar, idx = Path(shard["abs_path"]), Path(shard["abs_index"])
    if not tar.is_file() or not idx.is_file():
        return [f"{name}: shard or index file missing"], counts
    digest, size = _sha256(tar)
    if "bytes" in shard and size != shard["bytes"]:
        problems.append(f"{name}: {size} bytes, manifest says {shard['bytes']}")
    if "sha256" in shard and digest != shard["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest")
    try:
        index = read_index(idx, tar_size=size)
    except (ShardFormatError, ValueError) as e:
        return problems + [f"{name}: bad index: {e}"], counts
    if len(index) != shard["samples"]:
        problems.append(f"{name}: index lists {len(index)} samples, manifest says {shard['samples']}")
    fd = os.open(tar, os.O_RDONLY)
    try:
        i = -1
        for i, (key, members) in enumerate(iter_tar_samples(tar)):
            where = f"{name}: sample {i} ({key})"
            if i >= len(index) or index.keys[i] != key:
                problems.append(f"{where}: not the index's sample {i}")
                break
            if key in keys_seen:
                problems.append(f"{where}: key appears twice in the corpus")
            keys_seen.add(key)
            missing = {IMAGE_EXT, MASK_EXT, META_EXT} - set(members)
            if missing:
                problems.append(f"{where}: lacks {sorted(missing)}")
                continue
            for ext in (IMAGE_EXT, MASK_EXT, META_EXT):
                if read_member(fd, index.offsets[ext][i], index.sizes[ext][i]) != members[ext]:
                    problems.append(f"{where}: index offset of .{ext} points at other bytes")
            img = cv2.imdecode(np.frombuffer(members[IMAGE_EXT], np.uint8), cv2.IMREAD_UNCHANGED)
            mask = cv2.imdecode(np.frombuffer(members[MASK_EXT], np.uint8), cv2.IMREAD_UNCHANGED)
            if img is None or img.ndim != 2 or img.dtype != np.uint8:
                problems.append(f"{where}: .jpg is not a decodable 8-bit grayscale JPEG")
            elif mask is None or mask.shape != img.shape:
                problems.append(f"{where}: .mask.png does not decode to a mask of the frame's size")
            elif not mask.any():
                problems.append(f"{where}: empty USrc mask")
            try:
                meta = SampleMeta.from_json(members[META_EXT])
                if meta.split != shard["split"]:
                    problems.append(f"{where}: split {meta.split!r} in a {shard['split']} shard")
                if meta.dataset != shard["dataset"]:
                    problems.append(f"{where}: dataset {meta.dataset!r} in a {shard['dataset']} shard")
                counts[(meta.dataset, meta.split)] += 1
            except (ShardFormatError, ValueError) as e:
                problems.append(f"{where}: bad .json: {e}")
        if i + 1 != len(index):
            problems.append(f"{name}: tar holds {i + 1} samples, index {len(index)}")
    except ShardFormatError as e:
        problems.append(f"{name}: {e}")
    finally:
        os.close(fd)
    return problems, counts


def verify_corpus(root: str | Path, progress: bool = False) -> list[str]:
    """All problems found in the corpus at ``root``; an empty list means it verified. ``progress``: a bar
    or periodic lines on stderr (``usjepa.ingest.progress``)."""
    try:
        manifest = load_manifest(root)
    except (FileNotFoundError, ShardFormatError) as e:
        return [str(e)]
    problems: list[str] = []
    keys_seen: set = set()
    totals: Counter = Counter()
    shards = manifest["shards"]
    if progress:
        shards = with_progress(shards, len(shards), "verify", "shards")
    for shard in shards:
        p, c = verify_shard(shard, keys_seen)
        problems += p
        totals.update(c)
    for name, d in manifest["datasets"].items():
        for split in ("train", "val"):
            want = d.get("frames", {}).get(split, 0)
            if totals[(name, split)] != want:
                problems.append(f"dataset {name} {split}: {totals[(name, split)]} samples in shards, manifest says {want}")
    return problems
