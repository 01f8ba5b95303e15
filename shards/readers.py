"""The sample table of one split (every usable sample's shard and byte ranges) and the byte reader.

Built once per loader from ``manifest.json`` and the shard indexes, identically on every rank (same files,
same rules), so all ranks agree on the sample ids the sampler hands out. Problems found here drop
samples *before* the epoch plan is made, which keeps batch counts equal across ranks:

* a shard or index file that is missing or unreadable → the whole shard is skipped;
* a truncated tar → the samples whose members lie past its end are skipped (the rest are kept);
* an index line that lacks a member or is malformed → that sample is skipped.

Problems found while reading (a file truncated or replaced after the table was built, bytes that are not
a JPEG / PNG) raise ``BadSample``; the loaders replace such a sample inside its batch and count it, so the
batch keeps its size and every rank its batch count.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from usjepa.shards.format import (
    IMAGE_EXT,
    MASK_EXT,
    META_EXT,
    SAMPLE_EXTS,
    SampleMeta,
    ShardFormatError,
    load_manifest,
    read_index,
    read_member,
)
from usjepa.shards.remote import (  # issue 21.2
    DEFAULT_CACHE_LIMIT_GB,
    RemoteReads,
    RemoteShards,
    is_url,
    local_path,
    mirror_corpus,
)

log = logging.getLogger(__name__)

JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class BadSample(Exception):
    """A sample whose bytes cannot be used (short read, not a JPEG/PNG, missing file)."""


@dataclass
class SampleTable:
    """Columnar table of the usable samples of one split, ordered by dataset name, then shard, then tar order.

    Sample id = row. Datasets own contiguous id ranges (``dataset_sizes`` in ``dataset_names`` order),
    which is the layout ``sampler.epoch_order`` expects."""

    root: str
    split: str
    shard_paths: list[str]
    dataset_names: list[str]
    dataset_sizes: list[int]
    shard: np.ndarray  # int32 [N]
    jpg_offset: np.ndarray  # int64 [N]
    jpg_size: np.ndarray  # int64 [N]
    mask_offset: np.ndarray  # int64 [N]
    mask_size: np.ndarray  # int64 [N]
    meta_offset: np.ndarray  # int64 [N]
    meta_size: np.ndarray  # int64 [N]
    keys: np.ndarray  # bytes 'S' [N]
    skipped: Counter = field(default_factory=Counter)  # reason -> samples (or shards) dropped at build time
    remote: RemoteShards | None = None  # issue 21.2: set when shard_paths are URLs (shards/remote.py)

    def __len__(self) -> int:
        return len(self.shard)

    def key(self, i: int) -> str:
        return self.keys[i].decode()

    def reader_view(self) -> "SampleReader":
        return SampleReader(self.shard_paths, self.shard, self.jpg_offset, self.jpg_size, self.mask_offset,
                            self.mask_size, self.meta_offset, self.meta_size,
                            remote=RemoteReads(self.remote) if self.remote else None)


def _shard_rows(tar: Path, idx: Path, skipped: Counter, tar_size: int | None = None
                ) -> tuple[list[str], np.ndarray] | None:
    try:
        tar_size = tar.stat().st_size if tar_size is None else tar_size
    except OSError as e:
        log.warning("skipping shard %s: %s", tar, e)
        skipped["missing_shard"] += 1
        return None
    try:
        ix = read_index(idx, strict=False)
    except FileNotFoundError as e:
        log.warning("skipping shard %s: its index is missing (%s)", tar, e)
        skipped["missing_index"] += 1
        return None
    except (ShardFormatError, ValueError, OSError, UnicodeDecodeError) as e:
        log.warning("skipping shard %s: unreadable index (%s)", tar, e)
        skipped["bad_index"] += 1
        return None
    if ix.dropped:
        log.warning("%s: %d index lines skipped (malformed or missing a member)", idx, ix.dropped)
        skipped["missing_member"] += ix.dropped
    keys = ix.keys
    rows = np.stack([ix.offsets[IMAGE_EXT], ix.sizes[IMAGE_EXT], ix.offsets[MASK_EXT], ix.sizes[MASK_EXT],
                     ix.offsets[META_EXT], ix.sizes[META_EXT]], axis=1)
    # a sample needs all three members inside the tar, the metadata too
    ends = np.stack([ix.offsets[e] + ix.sizes[e] for e in SAMPLE_EXTS], axis=1).max(axis=1)
    inside = ends <= tar_size
    n_out = int((~inside).sum())
    if n_out:
        log.warning("%s is truncated (%d bytes): skipping %d of its %d samples", tar, tar_size, n_out, len(keys))
        skipped["truncated"] += n_out
        keys = [k for k, ok in zip(keys, inside) if ok]
        rows = rows[inside]
    return keys, rows


def open_sample_table(root: str | os.PathLike, split: str, cache_dir: str | None = None,
                      cache_limit_gb: float = DEFAULT_CACHE_LIMIT_GB) -> SampleTable:
    """Read the manifest and every index of ``split``; skip (with a warning, counted) what is unusable.

    ``root`` may be an fsspec URL: its manifest and indexes are mirrored into ``cache_dir`` and the shards
    are read remotely (``shards/remote.py``; ``cache_limit_gb`` bounds its local shard cache)."""
    remote = None
    if is_url(root):  # issue 21.2: the table is built from the local mirror; shard paths become URLs
        root, manifest, remote = mirror_corpus(str(root), cache_dir, cache_limit_gb)
    else:
        root = Path(local_path(root))
        manifest = load_manifest(root)
    shards = sorted((s for s in manifest["shards"] if s["split"] == split), key=lambda s: (s["dataset"], s["path"]))
    skipped: Counter = Counter()
    paths: list[str] = []
    shard_col, row_blocks, key_blocks, ds_sizes = [], [], [], {}
    for s in shards:
        size = int(s["bytes"]) if remote and "bytes" in s else None  # issue 21.2: no stat for a URL
        got = _shard_rows(Path(s["abs_path"]), Path(s["abs_index"]), skipped, size)
        if got is None or not got[0]:
            continue
        keys, rows = got
        shard_col.append(np.full(len(keys), len(paths), np.int32))
        paths.append(s["url"] if remote else s["abs_path"])
        row_blocks.append(rows)
        key_blocks.append(np.asarray(keys, dtype="S"))
        ds_sizes[s["dataset"]] = ds_sizes.get(s["dataset"], 0) + len(keys)
    if not paths:
        raise FileNotFoundError(f"no usable {split!r} shards under {root} (skipped: {dict(skipped)})")
    rows = np.concatenate(row_blocks)
    if skipped:
        log.warning("%s/%s: skipped at load time: %s", root, split, dict(skipped))
    names = list(ds_sizes)  # insertion order = sorted dataset order of the shard list
    return SampleTable(
        root=str(root),
        split=split,
        shard_paths=paths,
        dataset_names=names,
        dataset_sizes=[ds_sizes[n] for n in names],
        shard=np.concatenate(shard_col),
        jpg_offset=rows[:, 0].copy(),
        jpg_size=rows[:, 1].copy(),
        mask_offset=rows[:, 2].copy(),
        mask_size=rows[:, 3].copy(),
        meta_offset=rows[:, 4].copy(),
        meta_size=rows[:, 5].copy(),
        keys=np.concatenate(key_blocks),
        skipped=skipped,
        remote=remote,
    )


class SampleReader:
    """Reads a sample's JPEG and mask bytes by offset (``os.pread``), one cached descriptor per shard.

    Picklable (descriptors are opened lazily in whatever process uses it), so it travels into DALI's and
    PyTorch's worker processes."""

    def __init__(self, shard_paths, shard, jpg_offset, jpg_size, mask_offset, mask_size, meta_offset, meta_size,
                 remote: RemoteReads | None = None):
        self.shard_paths = list(shard_paths)
        self.remote = remote  # issue 21.2: shard paths are URLs, read by range or from the local shard cache
        self.shard = shard
        self.jpg_offset, self.jpg_size = jpg_offset, jpg_size
        self.mask_offset, self.mask_size = mask_offset, mask_size
        self.meta_offset, self.meta_size = meta_offset, meta_size
        self._fds: dict[int, int] = {}

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fds"] = {}
        return d

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            path = self.shard_paths[shard]
            fd = os.open(self.remote.local_path(path) if self.remote else path, os.O_RDONLY)
            self._fds[shard] = fd
        return fd

    def read(self, i: int) -> tuple[bytes, bytes]:
        """(jpeg bytes, mask png bytes) of sample ``i``; ``BadSample`` when they cannot be used."""
        s = int(self.shard[i])
        try:
            jpg = self._bytes(s, self.jpg_offset[i], self.jpg_size[i])
            mask = self._bytes(s, self.mask_offset[i], self.mask_size[i])
        except (OSError, ShardFormatError) as e:
            raise BadSample(f"{self.shard_paths[s]} sample {i}: {e}") from e
        # A JPEG cut short loses its end-of-image marker; checking both markers keeps a decoder error (which
        # would stop the whole DALI batch) out of the pipeline for the common corruptions.
        if not (jpg.startswith(JPEG_SOI) and jpg.rstrip(b"\0").endswith(JPEG_EOI)):
            raise BadSample(f"{self.shard_paths[s]} sample {i}: image member is not a complete JPEG")
        if not mask.startswith(PNG_SIGNATURE):
            raise BadSample(f"{self.shard_paths[s]} sample {i}: mask member is not a PNG")
        return jpg, mask

    def median(self, i: int) -> float | None:
        """The masked median stored at ingest (``SampleMeta.median``); None when the corpus predates it or the
        metadata member is unreadable (the caller then computes it from the pixels)."""
        try:
            return SampleMeta.from_json(self._bytes(int(self.shard[i]), self.meta_offset[i],
                                                    self.meta_size[i])).median
        except (OSError, ShardFormatError, UnicodeDecodeError, ValueError):
            return None

    def _bytes(self, shard: int, offset, size) -> bytes:
        if self.remote is not None:  # issue 21.2: from the batch's ranges unless the shard is cached locally
            got = self.remote.member(self.shard_paths[shard], offset, size)
            if got is not None:
                return got
        return read_member(self._fd(shard), offset, size)

    def prefetch(self, ids) -> None:
        """Called with a batch's sample ids before they are read: a remote corpus fetches their members in
        coalesced ranges; local shards need nothing (``pread`` is as cheap as a lookup)."""
        if self.remote is not None:
            self.remote.prefetch(self, ids)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
