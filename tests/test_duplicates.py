"""Perceptual-hash duplicates (``usjepa.ingest.duplicates``) and ingest's train/val split keeping copies
together (issue 22: the same picture in two splits scores a memorised image)."""

from __future__ import annotations

import cv2
import numpy as np

from usjepa.ingest.duplicates import dhash, duplicate_clusters, hamming
from usjepa.ingest.sources import DatasetSpec, assign_splits, list_sources
from usjepa.shards.format import split_of_group


def _scan(rng) -> np.ndarray:
    return cv2.GaussianBlur(rng.integers(0, 255, (120, 160), dtype=np.uint8), (9, 9), 3)


def test_dhash_survives_rescale_and_jpeg_and_separates_different_scans():
    rng = np.random.default_rng(0)
    a, b = _scan(rng), _scan(rng)
    ok, jpg = cv2.imencode(".jpg", cv2.resize(a, (200, 150)), [cv2.IMWRITE_JPEG_QUALITY, 60])
    again = cv2.imdecode(jpg, cv2.IMREAD_GRAYSCALE)
    h = np.array([dhash(a), dhash(again), dhash(b), dhash(np.clip(a.astype(int) + 20, 0, 255).astype(np.uint8))],
                 dtype=np.uint64)
    assert hamming(h[0], h[1]) <= 4 and hamming(h[0], h[3]) <= 4 and hamming(h[0], h[2]) > 10
    assert duplicate_clusters([int(x) for x in h] + [None]) == [0, 0, 2, 0, 4]


def test_ingest_split_keeps_copies_of_a_still_in_one_split(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "ds"
    root.mkdir()
    names = [f"img{k:03d}.png" for k in range(60)]
    for n in names:
        cv2.imwrite(str(root / n), _scan(rng))
    # copies whose own file name would put them in the other split than their original
    slug = lambda n: f"ds:{n}"  # noqa: E731 -- the group id list_sources gives a file without a group pattern
    pairs = []
    for n in names:
        copy = f"copy_of_{n}"
        if split_of_group(slug(copy), 0.3) != split_of_group(slug(n), 0.3):
            cv2.imwrite(str(root / copy), cv2.imread(str(root / n), cv2.IMREAD_GRAYSCALE))
            pairs.append((n, copy))
        if len(pairs) == 3:
            break
    assert len(pairs) == 3
    listing = assign_splits(list_sources([DatasetSpec(name="ds", root=root)]), 0.3)
    split = {s.rel: s.split for s in listing.sources}
    for original, copy in pairs:
        assert split[original] == split[copy]
    # distinct images keep their own hash split
    assert all(split[n] == split_of_group(slug(n), 0.3) for n in names if n not in {p[0] for p in pairs})


def test_split_hashing_through_ingest_workers_gives_the_same_split(tmp_path):
    """Ingest hashes the stills for its split in its worker pool, chunk by chunk and in order: the split is the
    one the in-process hashing gives, unreadable stills included (no hash, kept alone)."""
    from usjepa.ingest import sources as src
    from usjepa.ingest.pipeline import _Workers

    rng = np.random.default_rng(2)
    root = tmp_path / "ds"
    root.mkdir()
    for k in range(150):  # 3 chunks of 64 when the chunk size below is in force
        cv2.imwrite(str(root / f"img{k:03d}.png"), _scan(rng))
    for k in range(0, 150, 7):  # a copy of every 7th, in a group of its own
        cv2.imwrite(str(root / f"dup{k:03d}.png"), cv2.imread(str(root / f"img{k:03d}.png"), cv2.IMREAD_GRAYSCALE))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    listing = list_sources([DatasetSpec(name="ds", root=root)])
    serial = assign_splits(listing, 0.3)
    with _Workers(2) as pool:
        pooled = assign_splits(listing, 0.3, pool.map)
    assert src.HASH_CHUNK < 150
    assert [s.split for s in pooled.sources] == [s.split for s in serial.sources]
    split = {s.rel: s.split for s in pooled.sources}
    assert all(split[f"dup{k:03d}.png"] == split[f"img{k:03d}.png"] for k in range(0, 150, 7))
