"""The sample table of one split (every usable sample's shard and byte ranges) and the byte reader.

Built once per loader from ``manifest.json`` and the shard indexes, identically on every rank (same files,
same rules), so all ranks agree on the sample ids the sampler hands out. Problems found here drop
samples *before* the epoch plan is made, which keeps batch counts equal across ranks:

* a shard or index file that is missing or unreadable → the whole shard is skipped;
* a truncated tar → the samples whose members lie past its end are skipped (the rest are kept);
* an index line that lacks a member or is malformed → that sample is skipped.

Problems found while reading (a file truncated or replaced after the table was built, bytes that are not
a JPEG / PNG, an I/O error) raise ``BadSample``; the loaders replace such a sample inside its batch and count
it, so the batch keeps its size and every rank its batch count. Never silently: each reader warns once per
kind of error, and ``ReadErrorBudget`` stops the run when more than 10 + 1 % of a rank's reads fail or 32 in
a row do — a dead mount or a corpus rewritten underneath is not trained through.

Open files are bounded: a reader keeps an LRU of shard descriptors sized from the process's open-file limit,
which it first raises toward the hard limit (when every touched shard stayed open, 3 526 of 5 000 random reads
of a 10 000-shard corpus under the common limit of 1 024 failed with EMFILE).
"""

from __future__ import annotations

import errno
import logging
import os
import resource
from collections import Counter, OrderedDict
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
from usjepa.shards.worker_guard import LoaderWorkerError

log = logging.getLogger(__name__)

JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# The run stops when more than UNREADABLE_ALLOWANCE + MAX_UNREADABLE_FRACTION of a rank's reads failed (the
# allowance: a few bad files in a small corpus, or early in a run, are not 1 %), or MAX_UNREADABLE_IN_A_ROW
# reads in a row did (a mount gone late in a long run, when 1 % is a large number).
MAX_UNREADABLE_FRACTION = 0.01
UNREADABLE_ALLOWANCE = 10
MAX_UNREADABLE_IN_A_ROW = 32
# The soft open-file limit is raised toward the hard one, but not past this: a reader needs only a fraction of
# it, and some libraries still use select(), which breaks on descriptors numbered above 1 023.
OPEN_FILES_WANTED = 65536


class BadSample(Exception):
    """A sample whose bytes cannot be used (short read, not a JPEG/PNG, missing file)."""


class UnreadableData(LoaderWorkerError):
    """Too many of this rank's reads failed: the run stops rather than train on replacements."""


class ReadErrorBudget:
    """A rank's reads and unreadable samples in the order they were handed out; ``count`` raises
    ``UnreadableData`` past the limits above."""

    def __init__(self):
        self.reads = self.errors = self.in_a_row = 0

    def count(self, replaced) -> None:
        """One batch: ``replaced`` is a bool per sample (True: unreadable, stood in for by another)."""
        replaced = np.asarray(replaced, bool)
        if not replaced.any():  # the common case, without a Python loop over the batch
            self.reads += len(replaced)
            self.in_a_row = 0
            return
        for bad in replaced.tolist():
            self.reads += 1
            self.errors += bad
            self.in_a_row = self.in_a_row + 1 if bad else 0
            if self.in_a_row >= MAX_UNREADABLE_IN_A_ROW:
                raise UnreadableData(f"{self.in_a_row} samples in a row were unreadable ({self.errors} of "
                                     f"{self.reads} reads on this rank): is the corpus still there? The causes "
                                     f"are in the warnings above")
        if self.errors > UNREADABLE_ALLOWANCE + MAX_UNREADABLE_FRACTION * self.reads:
            raise UnreadableData(f"{self.errors} of {self.reads} reads on this rank were unreadable (more than "
                                 f"{UNREADABLE_ALLOWANCE} + {MAX_UNREADABLE_FRACTION:.0%}); the causes are in the "
                                 f"warnings above")


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE toward the hard limit (at most ``OPEN_FILES_WANTED``) where the
    system allows it; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_WANTED)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as e:  # a container may refuse; the LRU then fits the lower limit
            log.info("could not raise the open-file limit from %d to %d: %s", soft, want, e)
    return soft


def open_file_budget() -> int:
    """Shard descriptors one reader may keep open: a quarter of the soft limit (after raising it), leaving the
    rest to the other readers of the process (train and validation), sockets, libraries and log files."""
    soft = raise_open_file_limit()
    return max(4, (OPEN_FILES_WANTED if soft == resource.RLIM_INFINITY else soft) // 4)


def error_kind(e: BaseException) -> str:
    """A read error in a few words, the same for every sample it hits (warned once per kind)."""
    if isinstance(e, OSError) and e.errno in errno.errorcode:
        return errno.errorcode[e.errno]
    if isinstance(e, ShardFormatError):
        return "short read (shard truncated after indexing?)"
    return type(e).__name__


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

    def __len__(self) -> int:
        return len(self.shard)

    def key(self, i: int) -> str:
        return self.keys[i].decode()

    def reader_view(self) -> "SampleReader":
        return SampleReader(self.shard_paths, self.shard, self.jpg_offset, self.jpg_size, self.mask_offset,
                            self.mask_size, self.meta_offset, self.meta_size)


def _shard_rows(tar: Path, idx: Path, skipped: Counter) -> tuple[list[str], np.ndarray] | None:
    try:
        tar_size = tar.stat().st_size
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


def open_sample_table(root: str | os.PathLike, split: str) -> SampleTable:
    """Read the manifest and every index of ``split``; skip (with a warning, counted) what is unusable."""
    root = Path(root)
    manifest = load_manifest(root)
    shards = sorted((s for s in manifest["shards"] if s["split"] == split), key=lambda s: (s["dataset"], s["path"]))
    skipped: Counter = Counter()
    paths: list[str] = []
    shard_col, row_blocks, key_blocks, ds_sizes = [], [], [], {}
    for s in shards:
        got = _shard_rows(Path(s["abs_path"]), Path(s["abs_index"]), skipped)
        if got is None or not got[0]:
            continue
        keys, rows = got
        shard_col.append(np.full(len(keys), len(paths), np.int32))
        paths.append(s["abs_path"])
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
    )


class SampleReader:
    """Reads a sample's JPEG and mask bytes by offset (``os.pread``), keeping the most recently used shard
    descriptors open (``open_file_budget()`` of them).

    Picklable (descriptors are opened lazily in whatever process uses it), so it travels into DALI's and
    PyTorch's worker processes. ``errors`` counts this process's read errors by kind."""

    def __init__(self, shard_paths, shard, jpg_offset, jpg_size, mask_offset, mask_size, meta_offset, meta_size):
        self.shard_paths = list(shard_paths)
        self.shard = shard
        self.jpg_offset, self.jpg_size = jpg_offset, jpg_size
        self.mask_offset, self.mask_size = mask_offset, mask_size
        self.meta_offset, self.meta_size = meta_offset, meta_size
        self._fds: OrderedDict[int, int] = OrderedDict()  # shard -> descriptor, least recently used first
        self._capacity: int | None = None  # decided in the process that reads (its own limit)
        self.errors: Counter = Counter()
        # Here too, not only where it reads: the loader's process receives every batch's shared-memory handles
        # from the workers as descriptors, and the workers it forks inherit the limit.
        raise_open_file_limit()

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fds"], d["_capacity"], d["errors"] = OrderedDict(), None, Counter()
        return d

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        if self._capacity is None:
            self._capacity = open_file_budget()
        while len(self._fds) >= self._capacity:
            os.close(self._fds.popitem(last=False)[1])
        try:
            fd = os.open(self.shard_paths[shard], os.O_RDONLY)
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE) or not self._fds:
                raise
            self.close()  # the process ran out of descriptors elsewhere: give ours back and try once more
            fd = os.open(self.shard_paths[shard], os.O_RDONLY)
        self._fds[shard] = fd
        return fd

    def _bad(self, s: int, i: int, kind: str, detail: str) -> BadSample:
        self.errors[kind] += 1
        if self.errors[kind] == 1:
            log.warning("unreadable sample (%s), replaced by another of its batch; first seen at %s sample %d: %s "
                        "(warned once per kind and process)", kind, self.shard_paths[s], i, detail)
        return BadSample(f"{self.shard_paths[s]} sample {i}: {detail}")

    def read(self, i: int) -> tuple[bytes, bytes]:
        """(jpeg bytes, mask png bytes) of sample ``i``; ``BadSample`` when they cannot be used."""
        s = int(self.shard[i])
        try:
            fd = self._fd(s)
            jpg = read_member(fd, self.jpg_offset[i], self.jpg_size[i])
            mask = read_member(fd, self.mask_offset[i], self.mask_size[i])
        except (OSError, ShardFormatError) as e:
            raise self._bad(s, i, error_kind(e), str(e)) from e
        # A JPEG cut short loses its end-of-image marker; checking both markers keeps a decoder error (which
        # would stop the whole DALI batch) out of the pipeline for the common corruptions.
        if not (jpg.startswith(JPEG_SOI) and jpg.rstrip(b"\0").endswith(JPEG_EOI)):
            raise self._bad(s, i, "incomplete JPEG", "image member is not a complete JPEG")
        if not mask.startswith(PNG_SIGNATURE):
            raise self._bad(s, i, "mask not a PNG", "mask member is not a PNG")
        return jpg, mask

    def median(self, i: int) -> float | None:
        """The masked median stored at ingest (``SampleMeta.median``); None when the corpus predates it or the
        metadata member is unreadable (the caller then computes it from the pixels)."""
        try:
            return SampleMeta.from_json(read_member(self._fd(int(self.shard[i])), self.meta_offset[i],
                                                    self.meta_size[i])).median
        except (OSError, ShardFormatError, UnicodeDecodeError, ValueError):
            return None

    def open_files(self) -> int:
        return len(self._fds)

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
