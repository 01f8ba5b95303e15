"""The ingest run: sources -> per-task spill files (parallel workers) -> shuffled shards -> manifest.

Two phases, both resumable, both parallel over worker processes (``multiprocessing``; see ``_Workers``):

1. **Frames.** Sources are grouped into tasks (one video or volume, or up to ``STILLS_PER_TASK`` stills).
   A worker reads, preprocesses and encodes a whole task into ``<work>/tasks/<id>.tmp.<pid>/`` — a spill
   file of samples (JPEG, PNG, JSON back to back) and ``summary.json`` (sample keys, byte offsets, counts,
   skipped files) — then renames the folder to ``<work>/tasks/<id>/``. The rename is the journal entry: a
   task folder under its final name is complete, anything else is thrown away on restart.
2. **Shards.** Per (dataset, split), every spilled sample is ordered by ``sha1(seed, key)`` — a permutation
   fixed by the keys alone, so it is the same however the work was split, interrupted or parallelised — and
   copied in that order from the spills (one ``pread`` per sample) into ``ShardWriter`` shards that close
   at ``shard_size`` bytes. Only keys and offsets are held in memory (~60 bytes a frame), never images:
   5 M frames shuffle in well under 1 GB of RAM, at the cost of spill files as large as the shards (deleted
   at the end). Each closed shard is appended to ``<work>/shards-<dataset>-<split>.jsonl`` (fsynced); a
   restart keeps the journalled shards and continues at the next position of the same permutation.

Finally the manifest is written atomically and the work folder removed. Because JPEG/PNG encoding and the
permutation are deterministic and ``ShardWriter`` fixes tar metadata, a killed and resumed run writes
byte-identical shards to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from usjepa.files import exclusive_lock
from usjepa.ingest.preprocess import (FrameRejected, PreprocessConfig, compute_usrc_mask, encode_sample,
                                      finish_frame, prepare_frame)
from usjepa.ingest.readers import SourceUnreadable, native_messages_dropped, open_frames
from usjepa.ingest.sources import (DEFAULT_EXCLUDE, DatasetSpec, Listing, Source, assign_splits, group_counts,
                                   list_sources, part_of)
from usjepa.shards.corruptions import masked_median
from usjepa.shards.format import (DEFAULT_VAL_FRACTION, FORMAT_VERSION, MANIFEST_NAME, SPLITS, SampleMeta,
                                  ShardWriter, dataset_slug, fsync_dir, sample_key, split_of_group,
                                  write_json_atomic)
from usjepa.shards.readers import build_corpus_table

STILLS_PER_TASK = 32  # stills per task: few enough files per spill, many enough to amortise its fsync
MASK_CHUNK_FRAMES = 1000  # one USrc mask per clip, or per 1000 frames of a longer one (bounds worker RAM)
DEFAULT_SHARD_SIZE = 512 * 2**20
WORK_DIR = ".ingest-work"
_TAR_BLOCK = 512


class IngestError(RuntimeError):
    """A run that cannot start or continue (locked, options changed since the interrupted run, ...)."""


class OutputWriteError(IngestError):
    """Writing into ``--out`` failed (disk full, I/O error, read-only file system, quota). The run stops;
    the sources being written are not journaled, so a rerun of the same command retries them."""


@contextlib.contextmanager
def _writing_into(out: Path):
    """Turn an ``OSError`` raised while writing the output into one line naming the cause and ``--out``.
    Only wrap code that touches nothing but the output folder: a source's own read errors are bad input,
    reported per file by ``process_task``."""
    try:
        yield
    except OSError as e:
        code = errno.errorcode.get(e.errno, "") if e.errno else ""
        fix = "free space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable (or fix the disk)"
        raise OutputWriteError(f"cannot write to --out {out}: {e.strerror or e}{f' ({code})' if code else ''}; "
                               f"the run stopped with no source marked bad: {fix}, then rerun the same "
                               f"command to resume") from e


@dataclass(frozen=True)
class IngestOptions:
    out: Path
    workers: int = 1
    part: tuple[int, int] = (0, 1)
    stride: int = 1
    shard_size: int = DEFAULT_SHARD_SIZE
    seed: int = 0
    val_fraction: float = DEFAULT_VAL_FRACTION
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    progress: bool = True


@dataclass(frozen=True)
class Task:
    task_id: str
    dataset: str
    anatomy: str
    sources: tuple[Source, ...]


def manifest_name(part: tuple[int, int]) -> str:
    i, n = part
    return MANIFEST_NAME if n == 1 else f"manifest.part-{i}-of-{n}.json"


def _part_tag(part: tuple[int, int]) -> str:
    return f"part-{part[0]}-of-{part[1]}"


# ---------------------------------------------------------------------------------------------- tasks


def make_tasks(listing: Listing, part: tuple[int, int]) -> list[Task]:
    anatomy = {d.name: d.anatomy for d in listing.datasets}
    mine = [s for s in listing.sources if part_of(s, part[1]) == part[0]]
    tasks: list[Task] = []
    for name in anatomy:
        ds = [s for s in mine if s.dataset == name]
        stills = [s for s in ds if s.kind == "still"]
        chunks = [[s] for s in ds if s.kind != "still"]
        chunks += [stills[i : i + STILLS_PER_TASK] for i in range(0, len(stills), STILLS_PER_TASK)]
        for chunk in chunks:
            digest = hashlib.sha1("\n".join(s.uid for s in chunk).encode()).hexdigest()[:16]
            tasks.append(Task(f"{dataset_slug(name)}-{digest}", name, anatomy[name], tuple(chunk)))
    return tasks


def _worker_init() -> None:
    # Die with the parent: a SIGKILLed run must not leave workers finishing tasks behind a restarted one.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the parent
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from worker processes; OpenCV threads would oversubscribe


class _SourceStats:
    def __init__(self) -> None:
        self.decoded = self.strided = self.duplicates = self.written = 0
        self.header_frames: int | None = None
        self.header_shortfall = 0
        self.rejected: Counter = Counter()


def _frames_of_source(src: Source, cfg: PreprocessConfig, stride: int, stats: _SourceStats):
    """Yield (frame_index, gray, mask, orig_size) for one file: prepare every frame, one USrc mask per clip
    (or per MASK_CHUNK_FRAMES), then finish each frame. Rejected frames are counted, not yielded."""
    stream = open_frames(src.path, stride, max_pixels=cfg.max_pixels)
    chunk: list[tuple[int, np.ndarray, np.ndarray | None, tuple[int, int]]] = []

    def finish(chunk):
        shapes = {g.shape for _, g, _, _ in chunk}
        shared = compute_usrc_mask(np.stack([g for _, g, _, _ in chunk]), cfg) if len(shapes) == 1 else None
        for index, gray, colour, orig in chunk:
            mask = shared if shared is not None else compute_usrc_mask(gray, cfg)
            try:
                yield index, finish_frame(gray, colour, mask, cfg), mask, orig
            except FrameRejected as e:
                stats.rejected[e.reason.split(" (")[0]] += 1

    try:
        for index, frame in stream:
            try:
                gray, colour = prepare_frame(frame, cfg)
            except FrameRejected as e:
                stats.rejected[e.reason.split(" (")[0]] += 1
                continue
            chunk.append((index, gray, colour, tuple(frame.shape[:2])))
            if len(chunk) >= MASK_CHUNK_FRAMES:
                yield from finish(chunk)
                chunk = []
        if chunk:
            yield from finish(chunk)
    finally:
        stats.decoded, stats.strided, stats.duplicates = stream.decoded, stream.strided, stream.duplicates
        stats.header_frames, stats.header_shortfall = stream.header_frames, stream.header_shortfall


def process_task(task: Task, cfg: PreprocessConfig, stride: int, val_fraction: float, work: Path) -> dict:
    """Worker: ingest one task into its spill folder and return its summary (also saved as summary.json)."""
    out = work.parents[1]
    with _writing_into(out), native_messages_dropped():
        return _process_task(task, cfg, stride, val_fraction, work, out)


def _process_task(task: Task, cfg: PreprocessConfig, stride: int, val_fraction: float, work: Path, out: Path) -> dict:
    final = work / "tasks" / task.task_id
    if final.is_dir():
        return _light(json.loads((final / "summary.json").read_text()))
    tmp = work / "tasks" / f"{task.task_id}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    samples: list[list] = []  # [key, split, offset, len_jpg, len_png, len_json]
    skipped: list[dict] = []
    short: list[dict] = []  # videos kept with fewer frames than their header declares
    totals = {"sources": 0, "decoded": 0, "strided": 0, "duplicates": 0, "written": 0,
              "frames": {s: 0 for s in SPLITS}, "decoded_in_skipped": 0}
    rejected: Counter = Counter()
    offset = 0
    with open(tmp / "spill.bin", "wb") as spill:
        for src in task.sources:
            stats = _SourceStats()
            split = src.split or split_of_group(src.group, val_fraction)
            records: list[list] = []
            try:
                # closing(): the reader's counts are final even when encoding fails midway through a clip
                with contextlib.closing(_frames_of_source(src, cfg, stride, stats)) as frames:
                    for index, gray, mask, orig in frames:
                        jpg, png = encode_sample(gray, mask, cfg)
                        meta = SampleMeta(dataset=task.dataset, anatomy=task.anatomy, source=src.rel,
                                          frame=index, group=src.group, orig_size=orig, split=split,
                                          label=src.label, median=masked_median(gray, mask)).to_json()
                        with _writing_into(out):  # the output's fault, not the source's: stop, journal nothing
                            spill.write(jpg)
                            spill.write(png)
                            spill.write(meta)
                        records.append([sample_key(task.dataset, src.rel, index), split,
                                        None,  # byte offset, set once the whole source is kept
                                        len(jpg), len(png), len(meta)])
                reason = None
                if not records:
                    why = ", ".join(f"{r}: {n}" for r, n in sorted(stats.rejected.items())) or "none decoded"
                    reason = f"no usable frame ({stats.decoded} decoded; rejected {why})"
            except SourceUnreadable as e:
                reason = e.reason
            except OutputWriteError:
                raise
            except Exception as e:  # a library failing on odd input must not abort the run: report it
                reason = f"{type(e).__name__}: {e}".strip()[:300]
            if reason is not None:
                # a source's frames land only when the whole file was read: drop what it spilled
                spill.seek(offset)
                spill.truncate()
                totals["decoded_in_skipped"] += stats.decoded
                skipped.append({"dataset": task.dataset, "path": src.rel, "reason": reason})
                continue
            for r in records:
                r[2] = offset
                offset += r[3] + r[4] + r[5]
            samples += records
            if stats.header_shortfall:
                short.append({"dataset": task.dataset, "path": src.rel, "decoded": stats.decoded,
                              "header_frames": stats.header_frames})
            rejected.update(stats.rejected)
            for k in ("decoded", "strided", "duplicates"):
                totals[k] += getattr(stats, k)
            totals["sources"] += 1
            totals["written"] += len(records)
            totals["frames"][split] += len(records)
        spill.flush()
        os.fsync(spill.fileno())
    totals["rejected"] = dict(rejected)
    summary = {"task_id": task.task_id, "dataset": task.dataset, "n_sources": len(task.sources),
               "totals": totals, "skipped": skipped, "short_of_header": short, "samples": samples}
    with open(tmp / "summary.json", "w") as f:
        json.dump(summary, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    try:
        os.rename(tmp, final)  # the journal entry: atomic, and refuses to replace an existing task folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
    fsync_dir(final.parent)
    return _light(summary)


def _light(summary: dict) -> dict:
    """A task summary without its per-sample rows: all the parent keeps (the shard phase reads the rows
    from disk), so the parent's memory does not grow with the number of frames."""
    return {k: v for k, v in summary.items() if k != "samples"}


# --------------------------------------------------------------------------------------------- shards


def shuffle_order(keys, seed: int) -> np.ndarray:
    """Permutation of ``keys`` (str or bytes) by sha1(seed, key): depends on the set of keys only."""
    prefix = f"{seed}\0".encode()
    h = np.fromiter((int.from_bytes(hashlib.sha1(prefix + (k if isinstance(k, bytes) else k.encode())).digest()[:8], "big")
                     for k in keys), dtype=np.uint64, count=len(keys))
    return np.argsort(h, kind="stable")


def _padded(n: int) -> int:
    return _TAR_BLOCK + (n + _TAR_BLOCK - 1) // _TAR_BLOCK * _TAR_BLOCK


def write_split_shards(dataset: str, split: str, task_ids: list[str], work: Path, out: Path,
                       part: tuple[int, int], shard_size: int, seed: int) -> list[dict]:
    """Worker: write the shuffled shards of one (dataset, split) from the spills; resumes from its journal."""
    with _writing_into(out):
        return _write_split_shards(dataset, split, task_ids, work, out, part, shard_size, seed)


def _write_split_shards(dataset: str, split: str, task_ids: list[str], work: Path, out: Path,
                        part: tuple[int, int], shard_size: int, seed: int) -> list[dict]:
    # compact arrays, not Python objects: ~60 bytes a frame, so millions of frames shuffle in little RAM
    blocks = []
    for t, tid in enumerate(task_ids):
        rows = [r for r in json.loads((work / "tasks" / tid / "summary.json").read_text())["samples"] if r[1] == split]
        if rows:
            blocks.append((np.array([r[0] for r in rows], dtype="S"), np.full(len(rows), t, np.int32),
                           np.array([r[2:] for r in rows], dtype=np.int64)))
    if not blocks:
        return []
    keys = np.concatenate([b[0] for b in blocks])
    task_of = np.concatenate([b[1] for b in blocks])
    rows = np.concatenate([b[2] for b in blocks])  # [offset, len_jpg, len_png, len_json]
    del blocks
    order = shuffle_order(keys, seed)
    journal = work / f"shards-{dataset_slug(dataset)}-{split}.jsonl"
    done: list[dict] = []
    if journal.exists():
        for line in journal.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
                e = json.loads(line)
                p = out / e["info"]["path"]
                if e["seq"] == len(done) and p.is_file() and p.stat().st_size == e["info"]["bytes"]:
                    done.append(e)
        tmp = journal.with_name(journal.name + ".tmp")  # keep only the entries that survived the check
        tmp.write_text("".join(json.dumps(e) + "\n" for e in done))
        os.replace(tmp, journal)
    start = done[-1]["end"] if done else 0
    fds: dict[int, int] = {}
    try:
        with open(journal, "a") as jf:
            seq, pos = len(done), start
            while pos < len(order):
                number = seq * part[1] + part[0]
                writer = ShardWriter(out, dataset, split, number)
                first, size = pos, 0
                try:
                    while pos < len(order) and (size < shard_size or pos == first):
                        i = int(order[pos])
                        t = int(task_of[i])
                        if t not in fds:
                            if len(fds) >= 256:  # bound open files
                                os.close(fds.pop(next(iter(fds))))
                            fds[t] = os.open(work / "tasks" / task_ids[t] / "spill.bin", os.O_RDONLY)
                        off, lj, lp, lm = (int(x) for x in rows[i])
                        blob = os.pread(fds[t], lj + lp + lm, off)
                        if len(blob) != lj + lp + lm:
                            raise IngestError(f"spill of task {task_ids[t]} is truncated")
                        meta = SampleMeta.from_json(blob[lj + lp :])
                        writer.write(keys[i].decode(), blob[:lj], blob[lj : lj + lp], meta)
                        size += _padded(lj) + _padded(lp) + _padded(lm)
                        pos += 1
                    info = writer.close()
                except BaseException:
                    writer.abort()
                    raise
                entry = {"seq": seq, "start": first, "end": pos, "info": info.to_dict()}
                jf.write(json.dumps(entry) + "\n")
                jf.flush()
                os.fsync(jf.fileno())
                done.append(entry)
                seq += 1
    finally:
        for fd in fds.values():
            os.close(fd)
    return [e["info"] for e in done]


def _write_split_job(args) -> list[dict]:
    return write_split_shards(*args)


def _process_task_job(args) -> dict:
    return process_task(*args)


# ------------------------------------------------------------------------------------------------ run


_SHARD_TMP_RE = re.compile(r"-(?:train|val)-(\d{6})\.(?:tar|idx)\.tmp$")


def _is_own_tmp(name: str, part: tuple[int, int]) -> bool:
    """Whether a leftover ``*.tmp`` in the output folder belongs to this part (parts may share the folder)."""
    if name == manifest_name(part) + ".tmp":
        return True
    m = _SHARD_TMP_RE.search(name)
    return bool(m) and int(m.group(1)) % part[1] == part[0]


def _fingerprint(listing: Listing, opts: IngestOptions) -> str:
    doc = {"datasets": [d.to_dict() for d in listing.datasets], "sources": [s.uid for s in listing.sources],
           "preprocess": opts.preprocess.to_dict(), "stride": opts.stride, "seed": opts.seed,
           "val_fraction": opts.val_fraction, "shard_size": opts.shard_size, "part": list(opts.part),
           "exclude": list(opts.exclude), "format_version": FORMAT_VERSION}
    return hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _locked(path: Path):
    """Hold ``path`` exclusively, or fail at once with "locked" (``usjepa.files.exclusive_lock``)."""
    return exclusive_lock(path, IngestError(f"locked: another usjepa-ingest is writing this output now ({path}); "
                                            f"wait for it to finish, then rerun to check it is complete"))


class _Workers:
    """Runs jobs in ``n`` worker processes from a fork server, started once for both phases, or in this
    process when ``n`` is 1. Not plain fork: a child forked after OpenCV has used its thread pool deadlocks
    in ``cv2.setNumThreads``; not plain spawn: each worker would pay ~1.5 s importing webdataset (torch)."""

    def __init__(self, n: int):
        self.n = n
        self._pool = None

    def start(self) -> None:
        if self.n > 1 and self._pool is None:
            ctx = mp.get_context("forkserver")
            # the server imports these once and forks every worker from itself: workers start in
            # milliseconds with everything loaded, and never inherit this process's OpenCV threads
            ctx.set_forkserver_preload(["usjepa.ingest.pipeline", "webdataset"])
            self._pool = ctx.Pool(self.n, initializer=_worker_init)

    def map_unordered(self, fn, jobs: list):
        if self.n <= 1 or len(jobs) <= 1 and self._pool is None:
            import cv2

            threads = cv2.getNumThreads()
            cv2.setNumThreads(1)
            try:
                for j in jobs:
                    yield fn(j)
            finally:
                cv2.setNumThreads(threads)
            return
        self.start()
        yield from self._pool.imap_unordered(fn, jobs, chunksize=1)

    def map(self, fn, jobs: list):
        """``fn`` over ``jobs`` in order (in this process when ``n`` is 1 or there is one job)."""
        if self.n <= 1 or len(jobs) <= 1:
            return map(fn, jobs)
        self.start()
        return self._pool.imap(fn, jobs, chunksize=1)

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc) -> None:
        self.terminate() if exc[0] is not None else self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def terminate(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


def run_ingest(specs: list[DatasetSpec], opts: IngestOptions) -> dict:
    """Ingest ``specs`` into ``opts.out``; returns the manifest (plus a ``timing`` entry not saved in it)."""
    t0 = time.perf_counter()
    out = Path(opts.out)
    with _writing_into(out):
        out.mkdir(parents=True, exist_ok=True)
    with _Workers(opts.workers) as hashing:  # the stills' perceptual hashes, for the split
        listing = assign_splits(list_sources(specs, opts.exclude), opts.val_fraction, hashing.map)
    fp = _fingerprint(listing, opts)
    man_path = out / manifest_name(opts.part)
    work = out / WORK_DIR / _part_tag(opts.part)
    lock = out / WORK_DIR / f"{_part_tag(opts.part)}.lock"
    # Everything from the completeness check to the removal of the work folder happens under the lock, so a
    # second run into the same --out sees either "locked" or a finished output ("already complete").
    with _writing_into(out), _locked(lock):
        if man_path.is_file() and not work.is_dir():
            old = json.loads(man_path.read_text())
            lock.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                (out / WORK_DIR).rmdir()
            if old.get("run_fingerprint") == fp:
                old["timing"] = {"seconds": time.perf_counter() - t0, "already_complete": True}
                return old
            raise IngestError(f"{man_path} exists and was made from other inputs or options; choose another --out")
        (work / "tasks").mkdir(parents=True, exist_ok=True)
        cfg_path = work / "run.json"
        if cfg_path.is_file():
            if json.loads(cfg_path.read_text()).get("run_fingerprint") != fp:
                raise IngestError(f"{work} holds an interrupted run with other inputs or options; "
                                  f"delete it to start over, or rerun with the same command")
        else:
            write_json_atomic(cfg_path, {"run_fingerprint": fp})
        for p in (work / "tasks").glob("*.tmp.*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in out.glob("*.tmp"):  # partial shards/indexes of a killed writer of this part
            if _is_own_tmp(p.name, opts.part):
                p.unlink(missing_ok=True)

        tasks = make_tasks(listing, opts.part)
        workers = _Workers(opts.workers)
        try:
            if len(tasks) > 1:
                workers.start()
            summaries = _run_tasks(tasks, opts, work, workers)
            t_frames = time.perf_counter() - t0

            by_split: dict[tuple[str, str], list[str]] = {}
            for s in summaries:
                for split in SPLITS:
                    if s["totals"]["frames"][split]:
                        by_split.setdefault((s["dataset"], split), []).append(s["task_id"])
            jobs = [(ds, sp, sorted(tids), work, out, opts.part, opts.shard_size, opts.seed)
                    for (ds, sp), tids in sorted(by_split.items())]
            shards = [info for infos in workers.map_unordered(_write_split_job, jobs) for info in infos]
            workers.close()
        finally:
            workers.terminate()
        shards.sort(key=lambda s: s["path"])
        manifest = _manifest(listing, opts, summaries, shards, fp)
        write_json_atomic(man_path, manifest)
        if opts.part[1] == 1:  # a whole corpus: its table now, not at every rank's first open (parts: at merge)
            build_corpus_table(out, workers=opts.workers)
        fsync_dir(out)
        shutil.rmtree(work)
        lock.unlink()
    with contextlib.suppress(OSError):
        (out / WORK_DIR).rmdir()  # only when no other part is still working here
    total = time.perf_counter() - t0
    manifest["timing"] = {"seconds": total, "frames_phase_seconds": t_frames, "shards_phase_seconds": total - t_frames,
                          "frames_per_second": manifest["summary"]["frames"] / total if total > 0 else 0.0}
    return manifest


def _run_tasks(tasks: list[Task], opts: IngestOptions, work: Path, workers: _Workers) -> list[dict]:
    from tqdm import tqdm

    done_ids = {p.name for p in (work / "tasks").iterdir() if p.is_dir() and ".tmp." not in p.name}
    summaries = [_light(json.loads((work / "tasks" / t.task_id / "summary.json").read_text()))
                 for t in tasks if t.task_id in done_ids]
    todo = [t for t in tasks if t.task_id not in done_ids]
    n_sources = sum(len(t.sources) for t in tasks)
    sources_done = sum(s["n_sources"] for s in summaries)
    class _Progress(tqdm):
        monitor_interval = 0  # no monitor thread: it would outlive the bar (a stray thread in library callers)

    bar = _Progress(desc=f"ingest {sources_done}/{n_sources} sources", unit=" frames", dynamic_ncols=True,
               disable=not opts.progress, file=sys.stderr, smoothing=0.1)
    if summaries:
        bar.write(f"resuming: {len(summaries)} of {len(tasks)} tasks already done")
    jobs = [(t, opts.preprocess, opts.stride, opts.val_fraction, work) for t in todo]
    try:
        for s in workers.map_unordered(_process_task_job, jobs):
            summaries.append(s)
            sources_done += s["n_sources"]
            bar.set_description(f"ingest {sources_done}/{n_sources} sources", refresh=False)
            bar.update(s["totals"]["written"])
    finally:
        bar.close()
    return summaries


def _manifest(listing: Listing, opts: IngestOptions, summaries: list[dict], shards: list[dict], fp: str) -> dict:
    datasets = {}
    # what the listing finds outside any source (unreadable folders, excluded and ignored files) belongs to
    # no part: part 0 reports it, so that ``merge`` counts it once
    first_part = opts.part[0] == 0
    unlisted = listing.unreadable if first_part else []
    skipped = sorted([k for s in summaries for k in s["skipped"]] + unlisted, key=lambda k: (k["dataset"], k["path"]))
    for d in listing.datasets:
        mine = [s for s in summaries if s["dataset"] == d.name]
        t = lambda k: sum(s["totals"][k] for s in mine)  # noqa: E731
        rejected = Counter()
        for s in mine:
            rejected.update(s["totals"]["rejected"])
        frames = {sp: sum(s["totals"]["frames"][sp] for s in mine) for sp in SPLITS}
        datasets[d.name] = {
            "anatomy": d.anatomy, "kind": d.kind, "root": str(d.root),
            "sources": t("sources"), "frames": frames,
            "skipped": sum(1 for k in skipped if k["dataset"] == d.name),
            # the frame count check, over the files not skipped: written == decoded - strided - duplicates - rejected
            "decoded_frames": t("decoded"), "strided_frames": t("strided"),
            "decoded_frames_in_skipped_files": t("decoded_in_skipped"),
            "duplicate_frames_dropped": t("duplicates"), "rejected_frames": dict(rejected),
            "excluded_files": listing.excluded.get(d.name, 0) if first_part else 0,
            "ignored_files": sum(1 for k in listing.ignored if k["dataset"] == d.name) if first_part else 0,
        }
        written = frames["train"] + frames["val"]
        expected = t("decoded") - t("strided") - t("duplicates") - sum(rejected.values())
        if written != expected:  # bookkeeping guard: a frame lost or counted twice between reader and spill
            raise IngestError(f"dataset {d.name}: {written} frames written but {expected} expected")
        per_shard = sum(s["samples"] for s in shards if s["dataset"] == d.name)
        if per_shard != written:
            raise IngestError(f"dataset {d.name}: {per_shard} samples in shards but {written} frames spilled")
    skipped_uids = {f"{k['dataset']}\0{k['path']}" for k in skipped}
    mine = [s for s in listing.sources if part_of(s, opts.part[1]) == opts.part[0] and s.uid not in skipped_uids]
    for name, counts in group_counts(mine).items():
        datasets[name]["groups"] = counts  # split groups (patients, clips, files) written, per split
    n = sum(v["frames"]["train"] + v["frames"]["val"] for v in datasets.values())
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preprocess": {**opts.preprocess.to_dict(), "stride": opts.stride, "drop_duplicate_frames": True},
        "split": {"val_fraction": opts.val_fraction, "rule": "sha1(group)"},
        "shuffle": {"seed": opts.seed, "rule": "within dataset and split, ordered by sha1(seed, key)"},
        "part": f"{opts.part[0]}/{opts.part[1]}",
        "exclude": list(opts.exclude),
        # what all parts of a job array must share (``merge`` refuses parts that differ)
        "inputs": {"datasets": [d.to_dict() for d in listing.datasets], "n_sources": len(listing.sources),
                   "sources_sha1": hashlib.sha1("\n".join(s.uid for s in listing.sources).encode()).hexdigest(),
                   "stride": opts.stride, "seed": opts.seed, "shard_size": opts.shard_size},
        "run_fingerprint": fp,
        "datasets": datasets,
        "shards": shards,
        "skipped": skipped,
        "ignored": listing.ignored if first_part else [],
        "excluded_folders": listing.excluded_folders if first_part else [],
        # videos kept whole with fewer frames than their container header declares (an estimate for VFR)
        "short_of_header": sorted((k for s in summaries for k in s.get("short_of_header", [])),
                                  key=lambda k: (k["dataset"], k["path"])),
        "summary": {"frames": n, "sources": sum(v["sources"] for v in datasets.values()),
                    "skipped_files": len(skipped), "shards": len(shards),
                    "excluded_files": sum(v["excluded_files"] for v in datasets.values())},
    }


def summary_line(manifest: dict) -> str:
    s = manifest["summary"]
    tr = sum(d["frames"]["train"] for d in manifest["datasets"].values())
    va = sum(d["frames"]["val"] for d in manifest["datasets"].values())
    dup = sum(d.get("duplicate_frames_dropped", 0) for d in manifest["datasets"].values())
    line = (f"ingested {s['frames']} frames (train {tr}, val {va}) from {s['sources']} sources in "
            f"{len(manifest['datasets'])} datasets into {s['shards']} shards; {dup} duplicate frames dropped; "
            f"skipped {s['skipped_files']} files")
    if s.get("excluded_files"):
        line += f"; left out {s['excluded_files']} files by the exclude rules (label masks by default)"
    timing = manifest.get("timing")
    if timing and not timing.get("already_complete"):
        line += f"; {timing['seconds']:.1f} s, {timing['frames_per_second']:.0f} frames/s"
    elif timing:
        line += " (already complete)"
    return line
