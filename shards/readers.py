"""The sample table of one split (every usable sample's shard and byte ranges) and the byte reader.

The table is the corpus table file (``table.npz``, see ``shards.format``), memory-mapped: opening a split
costs O(shards) — read the manifest's hash, stat each shard, map one file — on every rank and in every loader
worker, which maps the same file (a pickled table or reader carries the file's path and how rows were selected,
never the columns). ``usjepa-ingest`` writes the table; a corpus without one (or with a stale one: another
manifest, an index rewritten, a shard grown or back) gets it built at first open, by one process while the
others wait, atomically, in the corpus folder or, when that is read-only, in the temp folder. The rules are
the same on every rank, so all ranks agree on the sample ids the sampler hands out. Problems found here drop
samples *before* the epoch plan is made, which keeps batch counts equal across ranks:

* a shard or index file that is missing or unreadable → the whole shard is skipped;
* a truncated tar → the samples whose members lie past its end are skipped (the rest are kept);
* an index line that lacks a member or is malformed → that sample is skipped.

Problems found while reading (a file truncated or replaced after the table was built, bytes that are not
a JPEG / PNG, an I/O error) raise ``BadSample``; the loaders replace such a sample inside its batch and count
it, so the batch keeps its size and every rank its batch count. Never silently: each reader warns once per
kind of error, and ``ReadErrorBudget`` stops the run when more than 10 + 1 % of a rank's reads fail or 32 in
a row do — a dead mount or a corpus rewritten underneath is not trained through.

Object storage (issue 21.2): ``root`` may be an fsspec URL. Its manifest and indexes are mirrored into
``cache_dir`` (``shards.remote``) and the corpus table is built there from them exactly as for a local corpus
(tar sizes from the manifest, each shard's metadata members fetched in coalesced ranges), so it is the same
``table.npz``. Such a table's recipe also carries the URL, ``cache_dir`` and the cache limit: a worker that
unpickles it rebuilds the (stateless) store from the mirrored manifest, without a request, and its reader
fetches a batch's members by coalesced byte ranges or from the bounded, sha256-checked local shard cache.

Open files are bounded: a reader keeps an LRU of shard descriptors sized from the process's open-file limit,
which it first raises toward the hard limit (when every touched shard stayed open, 3 526 of 5 000 random reads
of a 10 000-shard corpus under the common limit of 1 024 failed with EMFILE).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import multiprocessing as mp
import os
import resource
import tempfile
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np

from usjepa.shards.format import (
    IMAGE_EXT,
    MANIFEST_NAME,
    MASK_EXT,
    META_EXT,
    TABLE_NAME,
    TABLE_VERSION,
    SampleMeta,
    ShardFormatError,
    load_manifest,
    manifest_sha256,
    map_table,
    read_index,
    read_member,
    write_table,
)
from usjepa.shards.holdout import held_out_groups, holdout_key
from usjepa.shards.remote import (  # issue 21.2
    DEFAULT_CACHE_LIMIT_GB,
    RemoteReads,
    RemoteShards,
    coalesce,
    is_url,
    local_path,
    mirror_corpus,
    remote_store,
)
from usjepa.shards.worker_guard import LoaderWorkerError

log = logging.getLogger(__name__)

JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BYTE_COLUMNS = ("jpg_offset", "jpg_size", "mask_offset", "mask_size", "meta_offset", "meta_size")


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


# ------------------------------------------------------------------------------------------ building


def _shard_rows(tar: Path, idx: Path, skipped: Counter, tar_size: int | None = None
                ) -> tuple[list[str], np.ndarray] | None:
    try:
        tar_size = tar.stat().st_size if tar_size is None else tar_size  # issue 21.2: a URL's from the manifest
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
    inside = _ends(rows) <= tar_size
    n_out = int((~inside).sum())
    if n_out:
        log.warning("%s is truncated (%d bytes): skipping %d of its %d samples", tar, tar_size, n_out, len(keys))
        skipped["truncated"] += n_out
        keys = [k for k, ok in zip(keys, inside) if ok]
        rows = rows[inside]
    return keys, rows


def _ends(rows: np.ndarray) -> np.ndarray:
    """int64 [n]: where the last member of each sample ends (rows: [n, 6] in ``BYTE_COLUMNS`` order)."""
    return (rows[:, 0::2] + rows[:, 1::2]).max(axis=1) if len(rows) else np.zeros(0, np.int64)


def _stat_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _groups_and_medians_of(keys: list[str], metas) -> tuple[list[str], np.ndarray]:
    """Each sample's split group and stored median from its metadata member's bytes (``metas``, one per key;
    None or unparsable: the sample is its own group, median unknown)."""
    groups, medians = [], np.full(len(keys), np.nan, np.float32)
    for j, (key, raw) in enumerate(zip(keys, metas)):
        try:
            if raw is None:
                raise ValueError("unread")
            meta = SampleMeta.from_json(raw)
        except (ShardFormatError, UnicodeDecodeError, ValueError, KeyError):
            groups.append("sample:" + key)
            continue
        groups.append(meta.group)
        if meta.median is not None:
            medians[j] = meta.median
    return groups, medians


def _groups_and_medians(tar: str, keys: list[str], rows: np.ndarray) -> tuple[list[str], np.ndarray]:
    """``_groups_and_medians_of`` a local shard (one small read per sample, here only)."""
    with open(tar, "rb") as f:
        fd = f.fileno()

        def metas():
            for off, size in zip(rows[:, 4].tolist(), rows[:, 5].tolist()):
                try:
                    yield read_member(fd, off, size)
                except (OSError, ShardFormatError):
                    yield None

        return _groups_and_medians_of(keys, metas())


def _remote_groups_and_medians(store: RemoteShards, url: str, keys: list[str], rows: np.ndarray
                               ) -> tuple[list[str], np.ndarray]:
    """``_groups_and_medians_of`` a remote shard: its metadata members fetched in coalesced ranges (issue 21.2)."""
    members = [(int(o), int(n)) for o, n in zip(rows[:, 4].tolist(), rows[:, 5].tolist())]
    starts, ends = coalesce(members)
    try:
        blobs = store.fetch_ranges(url, starts, ends)
    except OSError as e:
        log.warning("%s: metadata unreadable (%s): its samples are their own groups", url, e)
        return _groups_and_medians_of(keys, [None] * len(keys))

    def member(o: int, n: int) -> bytes:
        k = int(np.searchsorted(starts, o, side="right")) - 1
        return blobs[k][o - starts[k]:o - starts[k] + n]

    return _groups_and_medians_of(keys, (member(o, n) for o, n in members))


def _scan_shard(tar: str, idx: str, store: RemoteShards | None = None) -> tuple:
    """Everything the table keeps of one shard: (keys, byte ranges [n, 6], groups, medians, skipped, tar and
    index sizes as found). With ``store`` (issue 21.2), ``tar`` is a path in the mirror whose shard is remote:
    its size comes from the manifest and its metadata members by range."""
    url = store.shard_url(tar) if store is not None else None
    sizes = (store.size(url) if store is not None else _stat_size(tar)), _stat_size(idx)
    skipped: Counter = Counter()
    if store is not None and sizes[0] is None:
        log.warning("skipping shard %s: no such object", url)
        skipped["missing_shard"] += 1
        got = None
    else:
        got = _shard_rows(Path(tar), Path(idx), skipped, sizes[0] if store is not None else None)
    keys, rows = got if got is not None else ([], np.zeros((0, 6), np.int64))
    if not keys:
        groups, medians = [], np.zeros(0, np.float32)
    elif store is not None:
        groups, medians = _remote_groups_and_medians(store, url, keys, rows)
    else:
        groups, medians = _groups_and_medians(tar, keys, rows)
    return keys, rows, groups, medians, skipped, *sizes


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build_corpus_table(root: str | os.PathLike, out: str | os.PathLike | None = None,
                       workers: int | None = None, store: RemoteShards | None = None) -> Path:
    """Parse the manifest, every index and every metadata member once into the corpus table; write it to
    ``out`` (default ``root/table.npz``) atomically and return its path. Unusable shards and samples are left
    out and counted (module docstring), with the same warnings as at load time before tables existed.
    ``workers`` (default: the CPUs available) processes scan the shards of a large corpus in parallel.
    ``store`` (issue 21.2): ``root`` is the local mirror of a remote corpus whose tars ``store`` reads."""
    root = Path(root)
    manifest = load_manifest(root)
    shards = sorted(manifest["shards"], key=lambda s: (s["split"], s["dataset"], s["path"]))
    jobs = [(s["abs_path"], s["abs_index"], store) for s in shards]
    workers = min(workers or _default_workers(), len(jobs) // 32)
    if workers > 1:  # spawned, not forked: the caller may be a training rank with CUDA and threads running
        with mp.get_context("spawn").Pool(workers) as pool:
            scans = pool.starmap(_scan_shard, jobs, chunksize=8)
    else:
        scans = [_scan_shard(*job) for job in jobs]
    blocks, keys, groups, medians, shard_col = [], [], [], [], []
    entries, splits, n = [], {}, 0
    for s, (k, rows, g, med, skipped, tar_bytes, idx_bytes) in zip(shards, scans):
        sp = splits.setdefault(s["split"], {"rows": [n, n], "datasets": [], "skipped": Counter()})
        sp["skipped"].update(skipped)
        if k:
            blocks.append(rows)
            keys += k
            groups += g
            medians.append(med)
            shard_col.append(np.full(len(k), len(entries), np.int32))
        entries.append({"path": s["path"], "index": s["index"], "dataset": s["dataset"], "split": s["split"],
                        "tar_bytes": tar_bytes, "idx_bytes": idx_bytes, "end": int(_ends(rows).max(initial=0)),
                        "rows": [n, n + len(k)]})
        ds = sp["datasets"]
        if k and (not ds or ds[-1][0] != s["dataset"]):
            ds.append([s["dataset"], n - sp["rows"][0], n - sp["rows"][0]])
        n += len(k)
        if k:
            ds[-1][2] = n - sp["rows"][0]
        sp["rows"][1] = n
    names = sorted(set(groups))  # ids in name order: held_out_groups breaks key ties by id = by name
    group_id = {g: i for i, g in enumerate(names)}
    rows = np.concatenate(blocks) if blocks else np.zeros((0, 6), np.int64)
    columns = {
        "shard": np.concatenate(shard_col) if shard_col else np.zeros(0, np.int32),
        **{c: np.ascontiguousarray(rows[:, j], np.int64) for j, c in enumerate(BYTE_COLUMNS)},
        "key": np.asarray([k.encode() for k in keys], dtype="S") if keys else np.zeros(0, "S1"),
        "group": np.fromiter((group_id[g] for g in groups), np.int32, len(groups)),
        "median": np.concatenate(medians) if medians else np.zeros(0, np.float32),
        "group_holdout": np.fromiter((holdout_key(g) for g in names), np.float64, len(names)),
    }
    for sp in splits.values():
        sp["skipped"] = dict(sp["skipped"])
    info = {"table_version": TABLE_VERSION, "manifest_sha256": manifest["sha256"], "shards": entries,
            "splits": splits}
    out = Path(out) if out is not None else root / TABLE_NAME
    write_table(out, info, columns)
    return out


# ------------------------------------------------------------------------------------------- opening


def _fallback_table_path(root: Path) -> Path:
    """Where the table of a read-only corpus goes: the node's temp folder, one file per corpus folder."""
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "usjepa-tables" / f"{digest}.npz"


def _shard_file(root: str, rel: str) -> str:
    """``root/rel`` for a path of the table: refused when it could leave the root. The build resolved every
    manifest path inside the root (``resolve_in_root``, symlinks included); this is the textual check of the
    same paths at every open (``Path.resolve`` for every shard of every rank costs seconds at 10 000 shards)."""
    norm = os.path.normpath(rel)
    if os.path.isabs(norm) or norm == ".." or norm.startswith("../"):
        raise ShardFormatError(f"corpus table path {rel!r} escapes the corpus root {root}")
    return os.path.join(root, norm)


def _check_table(path: Path, root: Path, manifest_sha: str, store: RemoteShards | None = None
                 ) -> tuple[dict, list[int | None]] | None:
    """(info, current tar sizes) when the table at ``path`` describes the corpus as it is; None when it is
    missing or stale (another manifest, an index rewritten, a shard that grew or came back)."""
    try:
        info = map_table(path)[0]
    except FileNotFoundError:
        return None
    except ShardFormatError as e:
        log.warning("%s", e)
        return None
    if info.get("table_version") != TABLE_VERSION or info.get("manifest_sha256") != manifest_sha:
        log.info("%s was built from another manifest or table version: rebuilding it", path)
        return None
    sizes, root_r = [], str(root.resolve())
    for s in info["shards"]:
        tar = _shard_file(root_r, s["path"])
        # issue 21.2: a remote corpus's tar sizes are the manifest's (its sha256 is the table's identity)
        size = store.size(store.shard_url(tar)) if store is not None else _stat_size(tar)
        grown = size is not None and (s["tar_bytes"] is None or size > s["tar_bytes"])
        if grown or _stat_size(_shard_file(root_r, s["index"])) != s["idx_bytes"]:
            log.info("%s: %s or its index changed since the table was built: rebuilding it", path, s["path"])
            return None
        sizes.append(size)
    return info, sizes


@contextlib.contextmanager
def _build_lock(root: Path):
    """One builder per corpus at a time (the others wait, then find the table); where the filesystem has no
    locks, racing builders each write the same table and the last rename wins."""
    with open(root / MANIFEST_NAME, "rb") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:
            pass
        yield


def corpus_table_path(root: str | os.PathLike, store: RemoteShards | None = None
                      ) -> tuple[Path, dict, list[int | None]]:
    """(path, info, tar sizes) of an up-to-date table of the corpus at ``root``, building it first if needed.
    ``store`` (issue 21.2): ``root`` is the local mirror of the remote corpus ``store`` reads."""
    root = Path(root)
    sha = manifest_sha256(root)
    candidates = (root / TABLE_NAME, _fallback_table_path(root))
    for path in candidates:
        got = _check_table(path, root, sha, store)
        if got is not None:
            return (path, *got)
    with _build_lock(root):
        for path in candidates:  # built by another process while this one waited
            got = _check_table(path, root, sha, store)
            if got is not None:
                return (path, *got)
        log.warning("%s has no up-to-date corpus table: building %s once (usjepa-ingest index does it ahead)",
                    root, TABLE_NAME)
        try:
            path = build_corpus_table(root, store=store)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            path = _fallback_table_path(root)
            path.parent.mkdir(parents=True, exist_ok=True)
            log.warning("%s is read-only: the corpus table goes to %s", root, path)
            build_corpus_table(root, path, store=store)
        got = _check_table(path, root, sha, store)
    if got is None:
        raise ShardFormatError(f"{root} changed while its corpus table was being built; open it again")
    return (path, *got)


class _Selected:
    """A column seen through a row selection, ``column[rows[i]]``, without copying the column."""

    __slots__ = ("column", "rows")

    def __init__(self, column: np.ndarray, rows: np.ndarray):
        self.column, self.rows = column, rows

    def __getitem__(self, i):
        return self.column[self.rows[i]]

    def __len__(self) -> int:
        return len(self.rows)

    def __array__(self, dtype=None, copy=None):
        a = self.column[self.rows]
        return a if dtype is None else a.astype(dtype)


class SampleTable:
    """The usable samples of one split, ordered by dataset name, then shard, then tar order.

    Sample id = row. Datasets own contiguous id ranges (``dataset_sizes`` in ``dataset_names`` order),
    which is the layout ``sampler.epoch_order`` expects. Columns (``shard``, ``jpg_offset`` … ``meta_size``,
    ``keys``, ``group``, ``median``) are views of the memory-mapped corpus table. Pickles as its recipe (table
    path and id, split, shards cut at open, ``val_from_train``): the receiving process maps the same file and
    gets the same rows without checking the shards again.

    ``remote`` (issue 21.2): (corpus URL, cache_dir, cache limit in bytes) when ``root`` is the local mirror of
    a corpus in object storage. It is part of the recipe; ``remote_store`` makes the store again from the
    mirrored manifest (no request), ``shard_paths`` are then URLs and ``source`` is the URL."""

    def __init__(self, path, root, split: str, val_from_train: float = 0.0, limits: dict[int, int] | None = None,
                 table_id: str | None = None, remote: tuple[str, str, int] | None = None):
        # absolute paths: a worker may start in another folder
        self._recipe = (os.path.abspath(path), os.path.abspath(root), split, float(val_from_train), dict(limits or {}),
                        tuple(remote) if remote else None)
        info, tid, cols = map_table(path)
        if table_id is not None and tid != table_id:
            raise ShardFormatError(f"{path} was rebuilt after this loader opened it (another manifest or shards): "
                                   f"restart the run")
        self.table_id = tid
        self.root, self.split = str(root), split
        base = "train" if val_from_train else split
        sp = info["splits"].get(base)
        a, b = sp["rows"] if sp else (0, 0)
        self.skipped = Counter(sp["skipped"] if sp else {})
        keep = np.ones(b - a, bool) if limits or val_from_train else None
        for k, size in sorted((limits or {}).items()):  # shards truncated or gone since the table was built
            s = info["shards"][k]
            lo, hi = s["rows"][0] - a, s["rows"][1] - a
            if size < 0:
                keep[lo:hi] = False
                self.skipped["missing_shard"] += 1
                continue
            out = _ends(np.stack([cols[c][a + lo : a + hi] for c in BYTE_COLUMNS], axis=1)) > size
            keep[lo:hi] &= ~out
            self.skipped["truncated"] += int(out.sum())
        if val_from_train:
            group = cols["group"][a:b]
            present = np.bincount(group[keep], minlength=len(cols["group_holdout"])) > 0
            held = held_out_groups(cols["group_holdout"], present, val_from_train, f"{root}")
            keep &= held[group] if split != "train" else ~held[group]
        rows = None if keep is None else np.flatnonzero(keep).astype(np.int32 if b - a < 2**31 else np.int64)
        # dataset ranges of the split, counted over the kept rows
        self.dataset_names, self.dataset_sizes = [], []
        for name, lo, hi in sp["datasets"] if sp else []:
            k = hi - lo if rows is None else int(np.searchsorted(rows, hi) - np.searchsorted(rows, lo))
            if k:
                self.dataset_names.append(name)
                self.dataset_sizes.append(k)
        if not self.dataset_sizes:
            raise FileNotFoundError(f"no usable {split!r} samples under {root} (skipped: {dict(self.skipped)})")
        root_r = str(Path(root).resolve())
        self.shard_paths = [_shard_file(root_r, s["path"]) for s in info["shards"]]
        self.remote: RemoteShards | None = None
        self.source = self.root  # what open_sample_table was given: the root, or the corpus URL
        self.cache_dir, self.cache_limit_gb = None, DEFAULT_CACHE_LIMIT_GB
        if remote:  # issue 21.2
            self.remote = remote_store(*remote, mirror=root_r)
            self.shard_paths = [self.remote.shard_url(p) for p in self.shard_paths]
            self.source, self.cache_dir, self.cache_limit_gb = remote[0], remote[1], remote[2] / 1e9

        def column(name):
            c = cols[name][a:b]
            return c if rows is None else _Selected(c, rows)

        self.shard = column("shard")
        self.jpg_offset, self.jpg_size = column("jpg_offset"), column("jpg_size")
        self.mask_offset, self.mask_size = column("mask_offset"), column("mask_size")
        self.meta_offset, self.meta_size = column("meta_offset"), column("meta_size")
        self.keys, self.group, self.median = column("key"), column("group"), column("median")
        self._len = b - a if rows is None else len(rows)

    def __getstate__(self):
        return {"recipe": self._recipe, "table_id": self.table_id}

    def __setstate__(self, d):
        path, root, split, val_from_train, limits, remote = d["recipe"]
        self.__init__(path, root, split, val_from_train, limits, d["table_id"], remote)

    def __len__(self) -> int:
        return self._len

    def key(self, i: int) -> str:
        return self.keys[i].decode()

    def reader_view(self) -> "SampleReader":
        return SampleReader(self)


def open_sample_table(root: str | os.PathLike, split: str, val_from_train: float = 0.0, *,
                      cache_dir: str | None = None,
                      cache_limit_gb: float = DEFAULT_CACHE_LIMIT_GB) -> SampleTable:
    """The usable samples of ``split`` (module docstring), from the corpus table (built first if needed).

    ``val_from_train`` > 0: ``"train"`` is the training split minus a deterministic slice of its groups, any
    other split is that slice (``shards.holdout``). ``root`` may be an fsspec URL: its manifest and indexes
    are mirrored into ``cache_dir``, the table is built there, and the shards are read remotely
    (``shards/remote.py``; ``cache_limit_gb`` bounds the local shard cache)."""
    remote = store = None
    if is_url(root):  # issue 21.2
        url = str(root)
        root, _, store = mirror_corpus(url, cache_dir, cache_limit_gb)
        remote = (store.url, store.cache_dir, store.cache_limit_bytes)
    else:
        root = local_path(root)
    path, info, sizes = corpus_table_path(root, store)
    base = "train" if val_from_train else split
    limits = {}
    for k, (s, size) in enumerate(zip(info["shards"], sizes)):
        if s["split"] != base or s["rows"][0] == s["rows"][1]:
            continue
        if size is None:
            log.warning("skipping shard %s: it is gone since the corpus table was built", s["path"])
            limits[k] = -1
        elif size < s["end"]:
            log.warning("%s is truncated (%d bytes): skipping its samples past that", s["path"], size)
            limits[k] = size
    table = SampleTable(path, root, split, val_from_train, limits, remote=remote)
    if table.skipped:
        log.warning("%s/%s: skipped at load time: %s", root, split, dict(table.skipped))
    return table


class SampleReader:
    """Reads a sample's JPEG and mask bytes by offset (``os.pread``), keeping the most recently used shard
    descriptors open (``open_file_budget()`` of them).

    Picklable: it pickles as its table's recipe (a few hundred bytes), descriptors are opened lazily in
    whatever process uses it, so it travels into DALI's and PyTorch's worker processes, spawned ones too.
    ``errors`` counts this process's read errors by kind."""

    def __init__(self, table: SampleTable):
        self.table = table
        self.shard_paths = table.shard_paths
        self.shard = table.shard
        self.jpg_offset, self.jpg_size = table.jpg_offset, table.jpg_size
        self.mask_offset, self.mask_size = table.mask_offset, table.mask_size
        self.remote = RemoteReads(table.remote) if table.remote is not None else None  # issue 21.2
        self._fds: OrderedDict[int, int] = OrderedDict()  # shard -> descriptor, least recently used first
        self._capacity: int | None = None  # decided in the process that reads (its own limit)
        self.errors: Counter = Counter()
        # Here too, not only where it reads: the loader's process receives every batch's shared-memory handles
        # from the workers as descriptors, and the workers it forks inherit the limit.
        raise_open_file_limit()

    def __getstate__(self):
        return {"table": self.table}

    def __setstate__(self, d):
        self.__init__(d["table"])

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        if self._capacity is None:
            self._capacity = open_file_budget()
        while len(self._fds) >= self._capacity:
            os.close(self._fds.popitem(last=False)[1])
        path = self.shard_paths[shard]
        if self.remote is not None:  # issue 21.2: the shard's verified copy in the local cache (downloaded now)
            path = self.remote.local_path(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE) or not self._fds:
                raise
            self.close()  # the process ran out of descriptors elsewhere: give ours back and try once more
            fd = os.open(path, os.O_RDONLY)
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
            jpg = self._bytes(s, self.jpg_offset[i], self.jpg_size[i])
            mask = self._bytes(s, self.mask_offset[i], self.mask_size[i])
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
        """The masked median stored at ingest (``SampleMeta.median``, in the table); None when the corpus
        predates it or the metadata member was unreadable (the caller then computes it from the pixels)."""
        m = float(self.table.median[i])
        return None if m != m else m

    def _bytes(self, shard: int, offset, size) -> bytes:
        if self.remote is not None:  # issue 21.2: from the batch's ranges unless the shard is cached locally
            got = self.remote.member(self.shard_paths[shard], offset, size)
            if got is not None:
                return got
        return read_member(self._fd(shard), offset, size)

    def prefetch(self, ids) -> None:
        """Called with a batch's sample ids before they are read: a remote corpus fetches their members in
        coalesced ranges (issue 21.2); local shards need nothing (``pread`` is as cheap as a lookup)."""
        if self.remote is not None:
            self.remote.prefetch(self, ids)

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
