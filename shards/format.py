"""The usjepa shard format: the one place that defines what a shard, its index and the manifest are.

A corpus is a folder holding ``manifest.json`` and WebDataset tar shards, each with a DALI index beside it::

    <root>/manifest.json
    <root>/<dataset>-<split>-<NNNNNN>.tar      standard WebDataset tar (readable by any WebDataset tool)
    <root>/<dataset>-<split>-<NNNNNN>.idx      DALI webdataset index "v1.2", written by the writer itself

A shard holds samples of one dataset and one split (``train`` or ``val``). A sample is three members:

    KEY.jpg        8-bit grayscale JPEG of the preprocessed frame
    KEY.mask.png   1-bit PNG of the USrc mask (same size as the frame; 1 = valid ultrasound region)
    KEY.json       metadata (see ``SampleMeta``)

KEY has no dots, because WebDataset and DALI split a member name into key and extension at the first dot.

Index file: first line ``v1.2 <n_samples>``; then one line per sample, in tar order, with one group
``<ext> <data_offset> <size> <member_name>`` per member. ``data_offset`` is the byte offset of the member's
data (after its 512-byte header), so a sample's bytes can be read with one ``pread`` per member.

Manifest (``manifest.json``), written by ``usjepa-ingest``::

    {"format_version": 1, "created": ISO time, "preprocess": {...parameters...},
     "split": {"val_fraction": 0.05, "rule": "sha1(group)"},
     "datasets": {NAME: {"anatomy", "kind", "sources", "frames": {"train": n, "val": n}, "skipped": n}},
     "shards": [{"path", "index", "dataset", "split", "samples", "bytes", "sha256"}],
     "skipped": [{"dataset", "path", "reason"}]}

Paths inside the manifest are relative to the manifest's folder and are resolved inside it
(``resolve_in_root``); a path that escapes the root is refused.

Corpus table (``table.npz``, written by ``usjepa-ingest`` / ``usjepa-ingest index``; derived, rebuildable from
the manifest and the indexes): everything the loader needs per sample, as columns that every rank and loader
worker memory-maps, so opening a corpus costs O(shards), not O(frames). A standard *uncompressed* ``.npz``
(``np.load`` reads it; ``map_table`` maps each member in place). Rows are ordered by split, dataset, shard path,
then tar order, so each split and each dataset is one contiguous row range. Members::

    info           uint8 [*]   UTF-8 JSON: table_version, manifest_sha256 (identity of the manifest it was built
                               from), shards [{path, index, dataset, split, tar_bytes, idx_bytes, end, rows}],
                               splits {name: {rows, datasets [[name, first, end]], skipped {reason: n}}}
    shard          int32 [N]   row in info.shards
    jpg_offset, jpg_size, mask_offset, mask_size, meta_offset, meta_size    int64 [N]   (from the index)
    key            S [N]       sample key (UTF-8)
    group          int32 [N]   split group (SampleMeta.group) as an id; ids follow the sorted group names
    median         float32 [N] SampleMeta.median (NaN: absent or metadata unreadable)
    group_holdout  float64 [G] stable_unit_hash("holdout\0" + group) per group id (``shards.holdout``)

A sample whose metadata member cannot be read counts as its own group, ``"sample:" + key``.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import re
import secrets
import struct
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from usjepa.files import fsync_dir  # noqa: F401  (moved down to usjepa.files; importers use this name)

FORMAT_VERSION = 1
INDEX_VERSION = "v1.2"
MANIFEST_NAME = "manifest.json"
TABLE_NAME = "table.npz"
TABLE_VERSION = 1
IMAGE_EXT = "jpg"
MASK_EXT = "mask.png"
META_EXT = "json"
SAMPLE_EXTS = (IMAGE_EXT, MASK_EXT, META_EXT)
_EXT_SET = set(SAMPLE_EXTS)
SPLITS = ("train", "val")
DEFAULT_VAL_FRACTION = 0.05

_SLUG_RE = re.compile(r"[^A-Za-z0-9_]+")


class ShardFormatError(ValueError):
    """A shard, index or manifest does not follow the format (truncated, tampered, wrong version)."""


# ----------------------------------------------------------------------------------------------- keys


def dataset_slug(name: str) -> str:
    """A dataset name made safe for keys and file names: letters, digits and underscores only."""
    slug = _SLUG_RE.sub("_", name).strip("_")
    if not slug:
        raise ValueError(f"dataset name {name!r} has no usable characters")
    return slug


def sample_key(dataset: str, source_rel: str, frame_index: int) -> str:
    """Stable, dot-free key of one frame: the same source frame gets the same key on every run and machine."""
    digest = hashlib.sha1(f"{source_rel}\0{frame_index}".encode()).hexdigest()[:20]
    return f"{dataset_slug(dataset)}_{digest}"


def stable_unit_hash(text: str) -> float:
    """Map a string to [0, 1) with sha1, identically across processes, runs and machines."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2.0**64


def split_of_group(group_id: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> str:
    """Held-out split by group (video, volume, patient, file): a group never straddles train and val."""
    return "val" if stable_unit_hash("split\0" + group_id) < val_fraction else "train"


def shard_name(dataset: str, split: str, number: int) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return f"{dataset_slug(dataset)}-{split}-{number:06d}.tar"


def index_path_for(tar_path: str | os.PathLike) -> Path:
    return Path(tar_path).with_suffix(".idx")


def check_member_name(name: str) -> None:
    """Refuse tar member names that could escape a folder if extracted (absolute paths, '..')."""
    # plain string tests, no Path: this runs for every member of every index when a table is built
    if name.startswith("/") or "\\" in name or ".." in name.split("/"):
        raise ShardFormatError(f"unsafe tar member name {name!r}")


def split_member_name(name: str) -> tuple[str, str]:
    """'KEY.mask.png' -> ('KEY', 'mask.png'): split at the first dot of the base name, as DALI does."""
    check_member_name(name)
    base_start = name.rfind("/") + 1
    dot = name.find(".", base_start)
    if dot < 0:
        raise ShardFormatError(f"tar member {name!r} has no extension")
    return name[:dot], name[dot + 1 :]


# ------------------------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class SampleMeta:
    """What ``KEY.json`` holds."""

    dataset: str
    anatomy: str
    source: str  # path of the source file relative to the dataset root
    frame: int  # frame index within the source (0 for still images)
    group: str  # split group: video / volume / patient / file
    orig_size: tuple[int, int]  # (height, width) of the source frame before resizing
    split: str
    label: str | None = None
    median: float | None = None  # gray-level median inside the USrc mask: the contrast augmentation's centre μ

    def to_json(self) -> bytes:
        d = dict(self.__dict__)
        d["orig_size"] = list(self.orig_size)
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "SampleMeta":
        d = json.loads(raw)
        try:
            return cls(
                dataset=str(d["dataset"]),
                anatomy=str(d["anatomy"]),
                source=str(d["source"]),
                frame=int(d["frame"]),
                group=str(d["group"]),
                orig_size=(int(d["orig_size"][0]), int(d["orig_size"][1])),
                split=str(d["split"]),
                label=None if d.get("label") is None else str(d["label"]),
                median=None if d.get("median") is None else float(d["median"]),
            )
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise ShardFormatError(f"sample metadata is missing or has a bad field: {e}") from e


# --------------------------------------------------------------------------------------------- writer


class _HashingWriter(io.RawIOBase):
    """File wrapper that hashes and counts every byte written, so sha256 costs no second read."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.nbytes = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        mv = memoryview(b)
        self._f.write(mv)
        self.sha256.update(mv)
        self.nbytes += mv.nbytes
        return mv.nbytes

    def flush(self) -> None:
        self._f.flush()


@dataclass(frozen=True)
class ShardInfo:
    """One manifest ``shards`` entry (paths relative to the corpus root)."""

    path: str
    index: str
    dataset: str
    split: str
    samples: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class ShardWriter:
    """Write one shard with ``webdataset.TarWriter`` plus its DALI index, atomically.

    Data goes to ``NAME.tar.tmp`` / ``NAME.idx.tmp``; ``close()`` fsyncs and renames both, so a shard that
    exists under its final name is always complete. A killed writer leaves only ``*.tmp`` files behind.
    """

    def __init__(self, root: str | os.PathLike, dataset: str, split: str, number: int):
        self.root = Path(root)
        self.dataset = dataset
        self.split = split
        self.name = shard_name(dataset, split, number)
        self.tar_path = self.root / self.name
        self.idx_path = index_path_for(self.tar_path)
        self._tmp_tar = self.tar_path.with_name(self.name + ".tmp")
        self._file = open(self._tmp_tar, "wb")
        self._hashing = _HashingWriter(self._file)
        import webdataset as wds  # imported here, not at the top: it imports torch (~1.4 s per ingest worker)
        # mtime fixed and mode/user constant: identical input gives byte-identical shards, and headers
        # stay plain 512-byte ustar blocks (a float mtime would add a PAX header per member).
        self._tw = wds.TarWriter(self._hashing, encoder=False, mtime=0, user="usjepa", group="usjepa")
        self._tf: tarfile.TarFile = self._tw.tarstream
        self._pos = 0
        self._lines: list[str] = []
        self._keys: set[str] = set()
        self.samples = 0

    def write(self, key: str, image_jpeg: bytes, mask_png: bytes, meta: SampleMeta) -> None:
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no dots or slashes")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in shard {self.name}")
        n_before = len(self._tf.members)
        self._tw.write({"__key__": key, IMAGE_EXT: image_jpeg, MASK_EXT: mask_png, META_EXT: meta.to_json()})
        groups = []
        for ti in self._tf.members[n_before:]:
            header = len(ti.tobuf(self._tf.format, self._tf.encoding, self._tf.errors))
            data_offset = self._pos + header
            self._pos = data_offset + ((ti.size + 511) // 512) * 512
            ext = split_member_name(ti.name)[1]
            groups.append(f"{ext} {data_offset} {ti.size} {ti.name}")
        if self._pos != self._tf.offset:  # our offset bookkeeping must agree with tarfile's own
            raise ShardFormatError(f"index offset drift in {self.name}: {self._pos} != {self._tf.offset}")
        del self._tf.members[n_before:]  # tarfile keeps every TarInfo otherwise; we already indexed them
        self._lines.append(" ".join(groups))
        self._keys.add(key)
        self.samples += 1

    def close(self) -> ShardInfo:
        if self.samples == 0:
            raise ShardFormatError(f"refusing to write an empty shard {self.name}")
        self._tw.close()  # writes the tar end-of-archive blocks through the hashing wrapper
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        tmp_idx = self.idx_path.with_name(self.idx_path.name + ".tmp")
        with open(tmp_idx, "w") as f:
            f.write(f"{INDEX_VERSION} {self.samples}\n")
            f.write("\n".join(self._lines))
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_idx, self.idx_path)  # index first: a final-named tar always has its index
        os.replace(self._tmp_tar, self.tar_path)
        return ShardInfo(
            path=self.name,
            index=self.idx_path.name,
            dataset=self.dataset,
            split=self.split,
            samples=self.samples,
            bytes=self._hashing.nbytes,
            sha256=self._hashing.sha256.hexdigest(),
        )

    def abort(self) -> None:
        """Drop a partly written shard (nothing under the final name is touched)."""
        try:
            self._tw.close()  # let tarfile flush into the tmp file now, not into a closed file at GC time
            self._file.close()
        finally:
            self._tmp_tar.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------------------------- reader


@dataclass
class ShardIndex:
    """Parsed index of one shard: sample keys in tar order and per-extension data offsets and sizes."""

    keys: list[str]
    offsets: dict[str, np.ndarray]  # ext -> int64 [n_samples]
    sizes: dict[str, np.ndarray]  # ext -> int64 [n_samples]
    dropped: int = 0  # malformed or incomplete sample lines left out (only with strict=False)

    def __len__(self) -> int:
        return len(self.keys)


def _parse_index_line(line: str, tar_size: int | None) -> tuple[str, dict[str, tuple[int, int]]]:
    """One sample line -> (key, {ext: (data_offset, size)}); raises ShardFormatError (or ValueError)."""
    parts = line.split()
    if len(parts) == 12 and tar_size is None:  # the usual line: checked here without a call per member
        name = parts[3]
        dot = name.find(".")
        key = name[:dot]
        if (dot > 0 and name[dot + 1 :] == parts[0] and parts[7] == f"{key}.{parts[4]}"
                and parts[11] == f"{key}.{parts[8]}" and "/" not in key and "\\" not in key
                and {parts[0], parts[4], parts[8]} == _EXT_SET):
            return key, {parts[0]: (int(parts[1]), int(parts[2])), parts[4]: (int(parts[5]), int(parts[6])),
                         parts[8]: (int(parts[9]), int(parts[10]))}
    if len(parts) % 4 or not parts:
        raise ShardFormatError("malformed line")
    key, members = None, {}
    for j in range(0, len(parts), 4):
        ext, off, size, name = parts[j], int(parts[j + 1]), int(parts[j + 2]), parts[j + 3]
        k, _ = split_member_name(name)
        if key is None:
            key = k
        elif k != key:
            raise ShardFormatError("members of different samples on one line")
        if tar_size is not None and off + size > tar_size:
            raise ShardFormatError(f"member {name} ends at byte {off + size}, past the tar's {tar_size}")
        members[ext] = (off, size)
    missing = set(SAMPLE_EXTS) - members.keys()
    if missing:
        raise ShardFormatError(f"sample {key} lacks {sorted(missing)}")
    return key, members


def read_index(idx_path: str | os.PathLike, tar_size: int | None = None, strict: bool = True) -> ShardIndex:
    """Parse a DALI v1.2 index. Every sample must have all ``SAMPLE_EXTS``; with ``tar_size`` given, every
    member must lie inside the tar (a truncated tar is caught here, before any read).

    ``strict=False`` keeps a damaged shard's good samples: a malformed or incomplete sample line is left out
    and counted in ``ShardIndex.dropped`` instead of raising. A bad header raises either way."""
    idx_path = Path(idx_path)
    keys: list[str] = []
    rows: list[list[tuple[int, int]]] = []
    dropped = 0
    with open(idx_path) as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] != INDEX_VERSION:
            raise ShardFormatError(f"{idx_path}: not a {INDEX_VERSION} index (first line {header!r})")
        n = int(header[1])
        for lineno, line in enumerate(f, start=2):
            try:
                key, members = _parse_index_line(line, tar_size)
            except (ShardFormatError, ValueError) as e:
                if strict:
                    raise ShardFormatError(f"{idx_path}:{lineno}: {e}") from e
                dropped += 1
                continue
            keys.append(key)
            rows.append([members[ext] for ext in SAMPLE_EXTS])
    if strict and len(keys) != n:
        raise ShardFormatError(f"{idx_path}: {len(keys)} samples listed, {n} announced")
    table = np.asarray(rows, dtype=np.int64).reshape(len(keys), len(SAMPLE_EXTS), 2)
    offsets = {ext: table[:, e, 0].copy() for e, ext in enumerate(SAMPLE_EXTS)}
    sizes = {ext: table[:, e, 1].copy() for e, ext in enumerate(SAMPLE_EXTS)}
    return ShardIndex(keys, offsets, sizes, dropped)


def read_member(f: BinaryIO | int, offset: int, size: int) -> bytes:
    """Read one member's bytes by offset (``os.pread``: no seek state, safe across threads)."""
    fd = f if isinstance(f, int) else f.fileno()
    data = os.pread(fd, int(size), int(offset))
    if len(data) != size:
        raise ShardFormatError(f"short read: wanted {size} bytes at {offset}, got {len(data)} (truncated shard?)")
    return data


def iter_tar_samples(tar_path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {ext: bytes}) from a shard in tar order without the index, refusing unsafe names.
    Raises ``ShardFormatError`` on a truncated or corrupt tar."""
    try:
        with tarfile.open(tar_path, mode="r|") as tf:
            key, members = None, {}
            for ti in tf:
                if not ti.isreg():
                    continue
                k, ext = split_member_name(ti.name)
                if key is not None and k != key:
                    yield key, members
                    members = {}
                key = k
                fobj = tf.extractfile(ti)
                members[ext] = fobj.read() if fobj is not None else b""
            if key is not None:
                yield key, members
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardFormatError(f"{tar_path}: unreadable tar ({e})") from e


# ------------------------------------------------------------------------------------------- manifest


def resolve_in_root(root: str | os.PathLike, rel: str) -> Path:
    """Resolve a manifest path inside ``root``; refuse absolute paths and anything escaping the root."""
    root_r = Path(root).resolve()
    if os.path.isabs(rel):
        raise ShardFormatError(f"manifest path {rel!r} is absolute; it must be relative to {root_r}")
    p = (root_r / rel).resolve()
    if p != root_r and root_r not in p.parents:
        raise ShardFormatError(f"manifest path {rel!r} escapes the corpus root {root_r}")
    return p


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_manifest(root: str | os.PathLike) -> dict:
    """Load and check ``<root>/manifest.json``; shard paths are resolved (inside root) into ``abs_path`` and
    ``abs_index`` keys of each shard entry."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {root}: run usjepa-ingest first")
    raw = path.read_bytes()
    try:
        m = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardFormatError(f"{path}: not valid JSON ({e})") from e
    if m.get("format_version") != FORMAT_VERSION:
        raise ShardFormatError(
            f"{path}: format_version {m.get('format_version')!r}, this usjepa reads {FORMAT_VERSION}"
        )
    for field in ("datasets", "shards"):
        if field not in m:
            raise ShardFormatError(f"{path}: missing {field!r}")
    for s in m["shards"]:
        for field in ("path", "index", "dataset", "split", "samples"):
            if field not in s:
                raise ShardFormatError(f"{path}: a shard entry lacks {field!r}: {s}")
        s["abs_path"] = str(resolve_in_root(root, s["path"]))
        s["abs_index"] = str(resolve_in_root(root, s["index"]))
    m["sha256"] = hashlib.sha256(raw).hexdigest()  # the manifest's identity, recorded in the corpus table
    return m


def manifest_sha256(root: str | os.PathLike) -> str:
    path = Path(root) / MANIFEST_NAME
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {root}: run usjepa-ingest first") from None


# ---------------------------------------------------------------------------------------- corpus table


def write_table(path: str | os.PathLike, info: dict, columns: dict[str, np.ndarray]) -> None:
    """Write a corpus table atomically (unique tmp name + rename): ranks that race to build the same table
    each rename a complete file, and a reader never sees a partial one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            raw = json.dumps(info, sort_keys=True, separators=(",", ":")).encode()
            np.savez(f, info=np.frombuffer(raw, np.uint8), **columns)  # savez stores, never compresses
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def map_table(path: str | os.PathLike) -> tuple[dict, str, dict[str, np.ndarray]]:
    """(info, table id, columns) of a table written by ``write_table``. The columns are read-only views of one
    shared memory map of the file: nothing but the headers is read here. The id is the sha256 of ``info``,
    which names the table's content (identical builds get the same id)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            columns = {}
            for zi in members:
                if zi.compress_type != zipfile.ZIP_STORED or not zi.filename.endswith(".npy"):
                    raise ShardFormatError(f"{path}: member {zi.filename} is compressed or not .npy")
                # data starts after the local header, whose name and extra field lengths are its own
                name_len, extra_len = struct.unpack_from("<HH", mm, zi.header_offset + 26)
                f.seek(zi.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                if fortran or dtype.hasobject or len(shape) != 1:
                    raise ShardFormatError(f"{path}: member {zi.filename} is not a flat column")
                columns[zi.filename[:-4]] = np.frombuffer(mm, dtype, shape[0], f.tell())
    except (zipfile.BadZipFile, ValueError, struct.error, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ShardFormatError(f"{path}: not a corpus table ({e})") from e
    raw = columns.pop("info", None)
    try:
        info = json.loads(bytes(raw))
    except (TypeError, ValueError) as e:
        raise ShardFormatError(f"{path}: the table's info member is missing or bad") from e
    return info, hashlib.sha256(bytes(raw)).hexdigest(), columns
