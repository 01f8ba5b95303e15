"""Exact and near-duplicate images by a perceptual hash (dHash), so that splits keep copies together.

A labelled set can hold the same picture twice (BUSI has one image under two labels, benign and
malignant), or a re-export of it (rescaled, recompressed). If the two land in different splits, the test
set scores a memorised training image. ``dhash`` (Krawetz's difference hash) shrinks the grayscale image to
9 x 8 with area averaging and keeps one bit per horizontal neighbour pair (is the left pixel brighter?):
64 bits that survive rescaling, JPEG recompression and small brightness changes, and differ in many bits
between different scans. Two images whose hashes differ in at most ``NEAR_BITS`` bits are near-duplicates
(equal hashes: exact, or visually identical). ``duplicate_clusters`` groups them transitively.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import cv2
import numpy as np

NEAR_BITS = 4  # of 64: recompression and rescaling move 0-2 bits; unrelated scans differ in ~20-32


def dhash(gray: np.ndarray) -> int:
    """64-bit difference hash of a 2-D uint8 (or float) image."""
    if gray.ndim == 3:
        gray = cv2.cvtColor(gray, cv2.COLOR_BGR2GRAY)
    small = cv2.resize(gray.astype(np.float32), (9, 8), interpolation=cv2.INTER_AREA)
    bits = (small[:, :-1] > small[:, 1:]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


@functools.lru_cache(maxsize=65536)
def _file_hash(path: str, size: int, mtime_ns: int) -> int | None:
    img = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if img is None or float(img.std()) < 1.0:  # unreadable, or flat: no content to compare (all bits 0)
        return None
    return dhash(img)


def file_dhash(path: str | os.PathLike) -> int | None:
    """``dhash`` of a still image file, None when it does not decode (the probe skips it later, with a
    reason). Cached by path, size and mtime: split draws re-read the same files."""
    st = os.stat(path)
    return _file_hash(str(Path(path)), st.st_size, st.st_mtime_ns)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit differences between uint64 hashes, broadcasting."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    flat = np.ascontiguousarray(x).reshape(-1).view(np.uint8).reshape(-1, 8)
    return np.unpackbits(flat, axis=1).sum(1).reshape(x.shape)


def duplicate_clusters(hashes: list[int | None], max_bits: int = NEAR_BITS) -> list[int]:
    """Cluster id per hash (index of its cluster's first member): hashes within ``max_bits`` of each other
    are joined, transitively; None (no hash) stays alone."""
    n = len(hashes)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    idx = np.array([i for i, h in enumerate(hashes) if h is not None], dtype=np.int64)
    h = np.array([hashes[i] for i in idx], dtype=np.uint64)
    for start in range(0, len(h), 512):  # [512, n] distance blocks: memory stays small on large sets
        d = hamming(h[start:start + 512, None], h[None, :])
        for a, b in zip(*np.nonzero(d <= max_bits)):
            i, j = idx[start + a], idx[b]
            if i < j:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    return [find(i) for i in range(n)]
