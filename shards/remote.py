"""Shards from object storage: a corpus root that is an fsspec URL (``s3://``, ``gs://``, ``https://``, ...).

The sample table is built exactly as for a local corpus, from a local mirror of the small files
(``manifest.json`` and the DALI ``.idx`` files, fetched concurrently into ``cache_dir``), so every rank agrees
on the sample ids without touching a tar. The tars stay remote and are read in two ways:

* **by byte range**: before a batch is rendered, the members it needs (image and mask) are grouped
  per shard and adjacent ranges are coalesced (gaps up to ``MAX_GAP`` bytes, which covers the tar headers
  between a sample's members), then fetched in one concurrent ``cat_ranges`` call: about one request per
  (shard, run of samples) instead of two per sample (the metadata is in the corpus table);
* **from the local shard cache**: a shard is downloaded whole, checked against the manifest's sha256 and kept
  under ``cache_dir/shards/<sha256>.tar`` once range reads of it have fetched as many bytes as the shard holds,
  counted by every process of the node together (ski rental: a shard read once costs at most twice its
  bytes, a shard read every epoch is downloaded once).
  The cache is bounded by ``cache_limit_gb``: least recently used shards (file mtime, shared by all
  processes of a node) are deleted past the limit; a shard larger than the limit is never cached.

Every request is retried with exponential backoff on transient errors; after the last try the error names the
URL and the number of tries. A shard whose download does not match the manifest's sha256 is fetched once more,
then refused (its samples become ``BadSample``: replaced in their batch and counted, as for a damaged local
shard). Manifest paths are resolved inside the mirror, so no entry can point outside the corpus prefix.

Credentials and endpoints come from the filesystem's usual configuration (``AWS_*`` variables, ``~/.aws``,
or fsspec's ``FSSPEC_S3_ENDPOINT_URL``-style variables), never from the manifest.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from usjepa.shards.format import MANIFEST_NAME, ShardFormatError, load_manifest

log = logging.getLogger(__name__)

DEFAULT_CACHE_LIMIT_GB = 50.0
MAX_GAP = 64 << 10  # coalesce ranges closer than this: one more request costs more than 64 KB on any store
RETRIES = 4  # tries per request: 1 + 3 retries after 0.5, 1, 2 s
BACKOFF_S = 0.5
_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "usjepa")


def is_url(root) -> bool:
    """True for a root that needs fsspec (``s3://``, ``https://``, ...); ``file://`` counts as a local path."""
    return isinstance(root, str) and "://" in root and not root.startswith("file://")


def local_path(root):
    """``file:///x`` -> ``/x``; anything else unchanged."""
    return root[len("file://"):] if isinstance(root, str) and root.startswith("file://") else root


def _transient_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [OSError, TimeoutError]
    try:  # https:// (fsspec's HTTP filesystem) raises aiohttp's errors for 5xx and dropped connections
        import aiohttp

        errs.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:  # s3:// passes botocore's connection errors through (refused, reset, timed out), not as OSError
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        errs += [BotoConnectionError, HTTPClientError]
    except ImportError:
        pass
    return tuple(errs)


class RemoteError(OSError):
    """A remote request that failed for good (after its retries, or a sha256 that never matched)."""


@dataclass
class RemoteShards:
    """Where the shards of one remote corpus are and how to read them; picklable (the filesystem object is
    made again in each process that uses it, as fsspec wants after a fork or spawn)."""

    url: str  # corpus root URL, no trailing '/'
    cache_dir: str
    cache_limit_bytes: int
    sizes: dict[str, int]  # shard URL -> bytes (manifest)
    sha256: dict[str, str]  # shard URL -> hex digest (manifest)
    mirror: str = ""  # the local mirror folder (manifest + indexes) whose paths map to shard URLs
    retries: int = RETRIES
    backoff_s: float = BACKOFF_S
    requests: Counter = field(default_factory=Counter)  # kind -> requests made by this process
    _fs: object = field(default=None, repr=False)
    _pid: int = field(default=-1, repr=False)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fs"], d["_pid"], d["requests"] = None, -1, Counter()
        return d

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            import fsspec

            self._fs = fsspec.core.url_to_fs(self.url)[0]
            self._pid = os.getpid()
        return self._fs

    def shard_url(self, path: str) -> str:
        """The URL of a shard path inside the mirror (a table's ``shard_paths`` before they become URLs)."""
        prefix = self.mirror.rstrip(os.sep) + os.sep
        if path.startswith(prefix) and ".." not in Path(path[len(prefix):]).parts:  # textual: no resolve per shard
            return f"{self.url}/{Path(path[len(prefix):]).as_posix()}"
        return shard_url(self.url, Path(self.mirror), path)

    def size(self, url: str) -> int | None:
        """Bytes of shard ``url``: the manifest's, else asked of the store (None: no such object)."""
        if url not in self.sizes:
            try:
                self.sizes[url] = int(self.retry(f"size of {url}", self.fs.size, url))
            except RemoteError as e:
                if isinstance(e.__cause__, FileNotFoundError):
                    return None
                raise
        return self.sizes[url]

    # ------------------------------------------------------------------ requests, retried with backoff
    def retry(self, what: str, fn, *args, **kwargs):
        transient = _transient_errors()
        for attempt in range(self.retries):
            try:
                return fn(*args, **kwargs)
            except _NOT_TRANSIENT as e:
                raise RemoteError(f"{what}: {type(e).__name__}: {e}") from e
            except transient as e:
                status = getattr(e, "status", None)  # an HTTP answer: only 429 and 5xx are worth another try
                if isinstance(status, int) and status < 500 and status != 429:
                    raise RemoteError(f"{what}: {e!r}") from e
                if attempt + 1 == self.retries:
                    raise RemoteError(f"{what}: failed {self.retries} times, last error: {e!r}") from e
                delay = self.backoff_s * 2 ** attempt
                log.warning("%s: %r; retry %d/%d in %.1f s", what, e, attempt + 1, self.retries - 1, delay)
                time.sleep(delay)

    def fetch_ranges(self, url: str, starts: list[int], ends: list[int]) -> list[bytes]:
        """Bytes [start, end) of ``url`` for each pair, in one concurrent call (one request per range)."""
        out = self.retry(f"reading {len(starts)} ranges of {url}", self.fs.cat_ranges, [url] * len(starts),
                         starts, ends, on_error="raise")
        self.requests["range"] += len(starts)
        for s, e, b in zip(starts, ends, out):
            if len(b) != e - s:
                raise RemoteError(f"{url}: short read, wanted {e - s} bytes at {s}, got {len(b)}")
        return out

    # ------------------------------------------------------------------ the bounded local shard cache
    def cache_path(self, url: str) -> Path:
        return Path(self.cache_dir) / "shards" / f"{self.sha256[url]}.tar"

    def cached(self, url: str) -> Path | None:
        """The verified local copy of ``url`` if it is in the cache (and marks it recently used)."""
        p = self.cache_path(url) if url in self.sha256 else None
        if p is None:
            return None
        try:
            os.utime(p)
        except FileNotFoundError:
            return None
        return p

    def cacheable(self, url: str) -> bool:
        return url in self.sha256 and 0 < self.sizes[url] <= self.cache_limit_bytes

    def _range_counter(self, url: str) -> Path:
        return Path(self.cache_dir) / "ranges" / f"{self.sha256[url]}.kb"

    def note_range_bytes(self, url: str, nbytes: int) -> None:
        """Count bytes fetched by range from ``url`` where every process of the node sees them: one byte per
        KB appended to a counter file (``O_APPEND`` writes are atomic), so DataLoader workers that are
        restarted each epoch, and the node's other ranks, add up to the same total."""
        if not self.cacheable(url):
            return
        p = self._range_counter(url)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, bytes(-(-int(nbytes) // 1024)))
        finally:
            os.close(fd)

    def ranges_paid_for(self, url: str) -> bool:
        """Range reads of ``url`` have fetched as many bytes as the whole shard: time to cache it."""
        try:
            return self.cacheable(url) and self._range_counter(url).stat().st_size * 1024 >= self.sizes[url]
        except FileNotFoundError:
            return False

    def download(self, url: str) -> Path:
        """Download ``url`` whole into the cache, verify its sha256 (one refetch on a mismatch, then
        ``RemoteError``), evict least recently used shards past the limit; return the local path."""
        dest = self.cache_path(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.evict(keep_free=self.sizes[url])
        tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
        want = self.sha256[url]
        for attempt in (1, 2):
            self.retry(f"downloading {url}", self.fs.get_file, url, str(tmp))
            self.requests["shard"] += 1
            got = _sha256_file(tmp)
            if got == want:
                os.replace(tmp, dest)  # atomic: other processes see the whole verified shard or nothing
                self._range_counter(url).unlink(missing_ok=True)
                return dest
            tmp.unlink(missing_ok=True)
            log.warning("%s: sha256 %s does not match the manifest's %s (try %d of 2)", url, got, want, attempt)
        raise RemoteError(f"{url}: sha256 {got} does not match the manifest's {want} after a refetch; "
                          f"the shard was changed after ingest (not cached, its samples are skipped)")

    def evict(self, keep_free: int = 0) -> list[Path]:
        """Delete least recently used cached shards until they fill at most ``limit - keep_free`` bytes.
        Safe with other processes: a deleted shard stays readable through descriptors already open."""
        d = Path(self.cache_dir) / "shards"
        entries = []
        for p in d.glob("*.tar"):
            try:
                st = p.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            entries.append((st.st_mtime, st.st_size, p))
        entries.sort()
        total, removed = sum(e[1] for e in entries), []
        for _, size, p in entries:
            if total <= self.cache_limit_bytes - keep_free:
                break
            p.unlink(missing_ok=True)
            total -= size
            removed.append(p)
        return removed


def _write_atomic(dest: Path, data: bytes) -> None:
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def mirror_corpus(url: str, cache_dir: str | None = None,
                  cache_limit_gb: float = DEFAULT_CACHE_LIMIT_GB) -> tuple[Path, dict, RemoteShards]:
    """Copy ``manifest.json`` and every ``.idx`` of the corpus at ``url`` into a local mirror (indexes already
    mirrored from the same manifest are kept, so a restart fetches only the manifest). Returns the mirror
    folder (a corpus root ``open_sample_table`` reads, without tars), its checked manifest, and the
    ``RemoteShards`` that maps each entry's local ``abs_path`` to its URL via ``shard_url``."""
    cache_dir = str(Path(cache_dir or default_cache_dir()).expanduser().resolve())
    url = url.rstrip("/")
    mirror = mirror_dir(url, cache_dir)
    store = RemoteShards(url, cache_dir, int(cache_limit_gb * 1e9), {}, {}, mirror=str(mirror.resolve()))
    mirror.mkdir(parents=True, exist_ok=True)
    raw = store.retry(f"reading {url}/{MANIFEST_NAME}", store.fs.cat_file, f"{url}/{MANIFEST_NAME}")
    digest = hashlib.sha256(raw).hexdigest()
    stamp = mirror / "mirrored.json"
    same = stamp.is_file() and json.loads(stamp.read_text()).get("manifest_sha256") == digest
    _write_atomic(mirror / MANIFEST_NAME, raw)  # the node's other ranks may be mirroring the same corpus
    manifest = load_manifest(mirror)  # checks the format; resolves (and bounds) every path inside the mirror
    todo = {}
    for s in manifest["shards"]:
        s["url"] = shard_url(url, mirror, s["abs_path"])
        if "bytes" in s:
            store.sizes[s["url"]] = int(s["bytes"])
        if s.get("sha256"):
            store.sha256[s["url"]] = s["sha256"]
        if not (same and Path(s["abs_index"]).is_file()):
            todo[shard_url(url, mirror, s["abs_index"])] = Path(s["abs_index"])
    if todo:
        t0 = time.perf_counter()
        # one concurrent call; a missing index comes back as an exception and the shard is skipped later,
        # exactly as a missing local index is
        got = store.retry(f"reading {len(todo)} indexes under {url}", store.fs.cat, list(todo), on_error="return")
        store.requests["index"] += len(todo)
        for u, dest in todo.items():
            data = got.get(u, got.get(store.fs._strip_protocol(u)))  # keys come back without the protocol
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, Exception) and not isinstance(data, FileNotFoundError):
                data = store.retry(f"reading {u}", store.fs.cat_file, u)  # transient: retried, or a clear error
            if isinstance(data, bytes):
                _write_atomic(dest, data)
            else:
                dest.unlink(missing_ok=True)
        log.info("mirrored %d indexes of %s in %.1f s", len(todo), url, time.perf_counter() - t0)
    _write_atomic(stamp, json.dumps({"url": url, "manifest_sha256": digest}).encode())
    return mirror, manifest, store


def mirror_dir(url: str, cache_dir: str) -> Path:
    return Path(cache_dir) / "corpora" / hashlib.sha256(url.encode()).hexdigest()[:16]


def remote_store(url: str, cache_dir: str, cache_limit_bytes: int, mirror: str) -> RemoteShards:
    """The store of a corpus already mirrored at ``mirror`` (sizes and sha256 from the mirrored manifest, no
    request): how an unpickled table's recipe, in a loader worker, gets its store back."""
    store = RemoteShards(url, cache_dir, int(cache_limit_bytes), {}, {}, mirror=str(mirror))
    for s in load_manifest(mirror)["shards"]:
        u = store.shard_url(s["abs_path"])
        if "bytes" in s:
            store.sizes[u] = int(s["bytes"])
        if s.get("sha256"):
            store.sha256[u] = s["sha256"]
    return store


def corpus_manifest(root, cache_dir: str | None = None) -> dict:
    """The checked manifest of a corpus root, local or URL (for a URL, through the mirror)."""
    if is_url(root):
        return mirror_corpus(root, cache_dir)[1]
    return load_manifest(local_path(root))


def shard_url(url: str, mirror: Path, abs_path: str) -> str:
    """The URL of a mirror path (already resolved inside the mirror by ``load_manifest``)."""
    rel = Path(abs_path).relative_to(mirror.resolve())
    if not rel.parts or ".." in rel.parts:
        raise ShardFormatError(f"manifest path {abs_path!r} is not inside the corpus {url}")
    return f"{url}/{rel.as_posix()}"


class RemoteReads:
    """The remote side of one ``SampleReader`` whose shard paths are URLs: a batch's members by coalesced byte
    ranges (``prefetch``), a shard's local path in the cache (``local_path``, downloading it), and which
    shards were refused. Duck-typed against the reader's columns, so this module stays below ``readers``."""

    def __init__(self, store: RemoteShards):
        self.store = store
        self._batch: dict[tuple[str, int, int], bytes] = {}
        self._refused: dict[str, str] = {}  # shard URL -> why it cannot be read (sha256 never matched)

    def __getstate__(self):
        return {"store": self.store, "_batch": {}, "_refused": {}}

    def local_path(self, url: str) -> str:
        """The verified local copy of shard ``url``, downloaded into the cache if needed."""
        if url in self._refused:
            raise RemoteError(self._refused[url])
        local = self.store.cached(url)
        if local is None:
            if not self.store.cacheable(url):
                raise RemoteError(f"{url}: not cacheable (larger than data.cache_limit_gb, or no sha256 in "
                                  f"the manifest) and read outside a batch's ranges")
            try:
                local = self.store.download(url)
            except RemoteError as e:
                self._refused[url] = str(e)
                raise
        return str(local)

    def _local(self, url: str) -> bool:
        """Read ``url`` through the cache: it is there, or range reads have cost as much as downloading it."""
        return url not in self._refused and (self.store.cached(url) is not None or self.store.ranges_paid_for(url))

    def prefetch(self, reader, ids) -> None:
        """Fetch the members (image, mask) of samples ``ids`` whose shards are not read locally:
        per shard the ranges sorted and coalesced, one concurrent call per shard."""
        self._batch = {}
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for i in np.asarray(ids, np.int64):  # the metadata is in the corpus table: image and mask only
            url = reader.shard_paths[int(reader.shard[i])]
            if url in self._refused or self._local(url):
                continue
            by_shard.setdefault(url, []).extend(
                (int(o), int(n)) for o, n in ((reader.jpg_offset[i], reader.jpg_size[i]),
                                              (reader.mask_offset[i], reader.mask_size[i])))
        for url, members in by_shard.items():
            starts, ends = coalesce(members)
            try:
                blobs = self.store.fetch_ranges(url, starts, ends)
            except RemoteError as e:
                log.warning("%s", e)  # the samples' reads fail one by one below and are replaced, counted
                continue
            for o, n in members:
                k = bisect.bisect_right(starts, o) - 1
                self._batch[(url, o, n)] = blobs[k][o - starts[k]:o - starts[k] + n]
            self.store.note_range_bytes(url, sum(e - b for b, e in zip(starts, ends)))

    def member(self, url: str, offset, size) -> bytes | None:
        """The bytes of one member: from this batch's ranges, else None when the shard is read from the local
        cache (the caller then ``pread``s ``local_path``), else one range request."""
        got = self._batch.get((url, int(offset), int(size)))
        if got is not None:
            return got
        if url in self._refused:
            raise RemoteError(self._refused[url])
        if self._local(url):
            return None
        self.store.note_range_bytes(url, int(size))
        return self.store.fetch_ranges(url, [int(offset)], [int(offset) + int(size)])[0]


def coalesce(members: list[tuple[int, int]], max_gap: int = MAX_GAP) -> tuple[list[int], list[int]]:
    """(offset, size) pairs -> sorted, merged [start, end) ranges; ranges closer than ``max_gap`` are merged."""
    starts: list[int] = []
    ends: list[int] = []
    for o, n in sorted(set(members)):
        if starts and o <= ends[-1] + max_gap:
            ends[-1] = max(ends[-1], o + n)
        else:
            starts.append(o)
            ends.append(o + n)
    return starts, ends
