"""Opening a 5 M-frame corpus on many ranks: the corpus table (``table.npz``, memory-mapped) against the
per-sample parse of every index it replaced, on synthetic metadata corpora of 50 k / 500 k / 5 M frames.

    python -m benchmarks.bench_scale --out benchmarks/results                 # 50 k and 500 k (~4 min)
    python -m benchmarks.bench_scale --out benchmarks/results --sizes 50000,500000,5000000 --before-max 500000

(Times on a loaded 2-core machine; the 5 M corpus adds ~4 min to write its 0.77 GB of indexes and ~8 min to
build its table once, and ``--before-max 5000000`` another ~10 min for the old parse.)

A corpus here is what the loader opens, built cheaply: a real ``manifest.json`` and real DALI ``.idx`` files
for shards of 500 samples in 20 datasets (95 % train, 5 % val), and each tar a sparse file of the right size
(``truncate``: no data blocks). The metadata members are holes, so every sample is its own split group, the
worst case for ``val_from_train``. Every figure comes from a fresh subprocess (one per measurement, like a
rank starting), so peak RSS is that process's own:

* ``before``: the pre-table ``open_sample_table`` (a verbatim copy of it and of the index parser it called,
  below) — open time, peak RSS, the pickle a spawned worker received; ``val_from_train`` read one metadata
  member per sample on top (measured up to ``--before-max``);
* ``after``: ``build_corpus_table`` once (what ``usjepa-ingest`` / ``usjepa-ingest index`` do), then
  ``open_sample_table`` — open time, peak RSS, pickle size, ``set_epoch`` + the rank's pass ids at 64 ranks,
  the same open with ``val_from_train=0.05``, and what a worker adds when it gets the reader by fork and by
  spawn: anonymous (unshareable) memory after 4096 random sample look-ups, against a worker that got nothing
  (file pages of the mapped table are page cache shared by every process on the node, reported apart).

The 5 M x 64-rank projection multiplies the per-rank figures: index bytes read and files opened by all
ranks at each start, and memory of an 8-GPU node (8 ranks, each with ``num_workers`` spawned DALI workers).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import hardware_line, save_result, utc_now

REPO = Path(__file__).resolve().parents[1]
PER_SHARD = 500
N_DATASETS = 20
RANKS, RANKS_PER_NODE, WORKERS_PER_RANK = 64, 8, 8


# ------------------------------------------------------------------------------------ synthetic corpus


def _padded(n: int) -> int:
    return (n + 511) // 512 * 512


def make_corpus(root: Path, n_frames: int, seed: int = 0) -> dict:
    """Manifest + real indexes + sparse tars for ``n_frames`` samples; returns sizes written."""
    from usjepa.shards.format import FORMAT_VERSION, MANIFEST_NAME, shard_name, write_json_atomic

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_ds = np.full(N_DATASETS, n_frames // N_DATASETS)
    per_ds[: n_frames % N_DATASETS] += 1
    shards, datasets, idx_bytes = [], {}, 0
    for d, n_ds in enumerate(per_ds.tolist()):
        name = f"ds{d:02d}"
        n_val = n_ds // 20
        datasets[name] = {"anatomy": "synthetic", "kind": "video", "sources": n_ds,
                          "frames": {"train": n_ds - n_val, "val": n_val}, "skipped": 0}
        for split, n in (("train", n_ds - n_val), ("val", n_val)):
            for number, start in enumerate(range(0, n, PER_SHARD)):
                k = min(PER_SHARD, n - start)
                jpg = rng.integers(15_000, 60_000, k)
                mask = rng.integers(200, 700, k)
                meta = rng.integers(180, 260, k)
                lines, pos = [f"v1.2 {k}"], 0
                for j in range(k):
                    key = f"{name}_{rng.bytes(10).hex()}"
                    groups = []
                    for ext, size in (("jpg", jpg[j]), ("json", meta[j]), ("mask.png", mask[j])):
                        groups.append(f"{ext} {pos + 512} {size} {key}.{ext}")
                        pos += 512 + _padded(int(size))
                    lines.append(" ".join(groups))
                tar_size = (pos + 1024 + 10239) // 10240 * 10240  # end blocks, padded to tarfile's record size
                tar = root / shard_name(name, split, number)
                text = "\n".join(lines) + "\n"
                tar.with_suffix(".idx").write_text(text)
                idx_bytes += len(text)
                with open(tar, "wb") as f:
                    f.truncate(tar_size)
                shards.append({"path": tar.name, "index": tar.with_suffix(".idx").name, "dataset": name,
                               "split": split, "samples": k, "bytes": tar_size, "sha256": "0" * 64})
    write_json_atomic(root / MANIFEST_NAME, {"format_version": FORMAT_VERSION, "created": utc_now(),
                                             "preprocess": {"synthetic": True}, "split": {"rule": "synthetic"},
                                             "datasets": datasets, "shards": shards, "skipped": []})
    return {"shards": len(shards), "index_bytes": idx_bytes}


# ------------------------------------------------------------------------- before: the per-sample parse
# Verbatim (but for names) from usjepa/shards/readers.py and format.py as of commit bfbfa35, the last
# version without the corpus table: every rank parsed every index line into Python objects.


def _old_check_member_name(name: str) -> None:
    from usjepa.shards.format import ShardFormatError

    if name.startswith("/") or name.startswith("\\") or ".." in Path(name).parts or "\\" in name:
        raise ShardFormatError(f"unsafe tar member name {name!r}")


def _old_split_member_name(name: str) -> tuple[str, str]:
    from usjepa.shards.format import ShardFormatError

    _old_check_member_name(name)
    base_start = name.rfind("/") + 1
    dot = name.find(".", base_start)
    if dot < 0:
        raise ShardFormatError(f"tar member {name!r} has no extension")
    return name[:dot], name[dot + 1 :]


def _old_parse_index_line(line: str, tar_size):
    from usjepa.shards.format import SAMPLE_EXTS, ShardFormatError

    parts = line.split()
    if len(parts) % 4 or not parts:
        raise ShardFormatError("malformed line")
    key, members = None, {}
    for j in range(0, len(parts), 4):
        ext, off, size, name = parts[j], int(parts[j + 1]), int(parts[j + 2]), parts[j + 3]
        k, _ = _old_split_member_name(name)
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


def _old_read_index(idx_path, tar_size=None, strict=True):
    from usjepa.shards.format import INDEX_VERSION, SAMPLE_EXTS, ShardFormatError, ShardIndex

    idx_path = Path(idx_path)
    keys, rows, dropped = [], [], 0
    with open(idx_path) as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] != INDEX_VERSION:
            raise ShardFormatError(f"{idx_path}: not a {INDEX_VERSION} index (first line {header!r})")
        n = int(header[1])
        for lineno, line in enumerate(f, start=2):
            try:
                key, members = _old_parse_index_line(line, tar_size)
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


@dataclass
class OldTable:
    shard_paths: list
    dataset_names: list
    dataset_sizes: list
    shard: np.ndarray
    rows: np.ndarray  # [N, 6]: jpg, mask, meta offsets and sizes (the old table's six columns)
    keys: np.ndarray


def old_open_sample_table(root, split: str) -> OldTable:
    from usjepa.shards.format import IMAGE_EXT, MASK_EXT, META_EXT, SAMPLE_EXTS, load_manifest

    root = Path(root)
    manifest = load_manifest(root)
    shards = sorted((s for s in manifest["shards"] if s["split"] == split), key=lambda s: (s["dataset"], s["path"]))
    paths, shard_col, row_blocks, key_blocks, ds_sizes = [], [], [], [], {}
    for s in shards:
        tar_size = Path(s["abs_path"]).stat().st_size
        ix = _old_read_index(Path(s["abs_index"]), strict=False)
        rows = np.stack([ix.offsets[IMAGE_EXT], ix.sizes[IMAGE_EXT], ix.offsets[MASK_EXT], ix.sizes[MASK_EXT],
                         ix.offsets[META_EXT], ix.sizes[META_EXT]], axis=1)
        ends = np.stack([ix.offsets[e] + ix.sizes[e] for e in SAMPLE_EXTS], axis=1).max(axis=1)
        assert (ends <= tar_size).all()
        shard_col.append(np.full(len(ix.keys), len(paths), np.int32))
        paths.append(s["abs_path"])
        row_blocks.append(rows)
        key_blocks.append(np.asarray(ix.keys, dtype="S"))
        ds_sizes[s["dataset"]] = ds_sizes.get(s["dataset"], 0) + len(ix.keys)
    names = list(ds_sizes)
    rows = np.concatenate(row_blocks)
    return OldTable(paths, names, [ds_sizes[n] for n in names], np.concatenate(shard_col),
                    np.ascontiguousarray(rows), np.concatenate(key_blocks))


def old_sample_groups(table: OldTable) -> int:
    """The old ``val_from_train``: one metadata read per sample (returns how many were unreadable)."""
    from usjepa.shards.format import SampleMeta, ShardFormatError, read_member

    fds, bad = {}, 0
    for i in range(len(table.shard)):
        s = int(table.shard[i])
        fd = fds.get(s) or fds.setdefault(s, os.open(table.shard_paths[s], os.O_RDONLY))
        try:
            SampleMeta.from_json(read_member(fd, table.rows[i, 4], table.rows[i, 5]))
        except (OSError, ShardFormatError, UnicodeDecodeError, ValueError):
            bad += 1
    for fd in fds.values():
        os.close(fd)
    return bad


# ----------------------------------------------------------------------------------- measurements


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_mb() -> dict:
    """This process's anonymous (unshareable) and file-backed resident memory, MB."""
    got = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if parts[0] in ("Rss:", "Anonymous:"):
            got[parts[0][:-1]] = int(parts[1]) / 1024.0
    return {"anon_mb": got["Anonymous"], "file_mb": got["Rss"] - got["Anonymous"]}


def lookups(reader, n: int, seed: int = 0) -> int:
    """What a loader worker touches per sample: shard, byte ranges, key, median (no data is read)."""
    rng = np.random.default_rng(seed)
    total = 0
    if isinstance(reader, OldTable):
        for i in rng.integers(0, len(reader.shard), n).tolist():
            total += int(reader.shard[i]) + int(reader.rows[i].sum()) + len(reader.keys[i])
        return total
    t = reader.table
    for i in rng.integers(0, len(t), n).tolist():
        total += int(reader.shard[i]) + int(reader.jpg_offset[i]) + int(reader.jpg_size[i])
        total += int(reader.mask_offset[i]) + int(reader.mask_size[i]) + len(t.keys[i]) + (reader.median(i) is None)
    return total


def _worker(payload: bytes | None, n: int, conn) -> None:
    import usjepa.shards.readers  # noqa: F401  (a loader worker has it imported either way)

    reader = None if payload is None else pickle.loads(payload)
    if reader is not None:
        lookups(reader, n)
    conn.send(memory_mb())  # while the reader is alive: what it holds counts
    conn.close()


def _forked_worker(reader, n: int, conn) -> None:
    before = memory_mb()
    if reader is not None:
        lookups(reader, n)
    after = memory_mb()
    conn.send({"anon_mb": after["anon_mb"] - before["anon_mb"], "file_mb": after["file_mb"] - before["file_mb"]})
    conn.close()


def worker_cost(reader, method: str, n: int = 4096) -> dict:
    """Memory a worker that receives ``reader`` by ``method`` holds beyond one that received nothing."""
    ctx = mp.get_context(method)
    got = []
    for payload in (None, reader):
        a, b = ctx.Pipe(duplex=False)
        if method == "spawn":
            p = ctx.Process(target=_worker, args=(None if payload is None else pickle.dumps(payload), n, b))
        else:
            p = ctx.Process(target=_forked_worker, args=(payload, n, b))
        p.start()
        got.append(a.recv())
        p.join(timeout=300)
    return {k: round(got[1][k] - got[0][k], 1) for k in got[0]}


def child(kind: str, root: str) -> dict:
    """One measurement in this (fresh) process."""
    from usjepa.shards.sampler import EpochSampler

    out = {}
    t0 = time.perf_counter()
    if kind == "build":
        from usjepa.shards.readers import build_corpus_table

        path = build_corpus_table(root)
        out.update(build_s=time.perf_counter() - t0, table_mb=path.stat().st_size / 1e6)
        return out
    elif kind == "before":
        table = old_open_sample_table(root, "train")
        out["open_s"] = time.perf_counter() - t0
        out["rss_mb"] = peak_rss_mb()
        out["pickle_mb"] = len(pickle.dumps(table)) / 1e6
        out["spawn_worker"] = worker_cost(table, "spawn", 4096)
        out["fork_worker"] = worker_cost(table, "fork", 4096)
        t1 = time.perf_counter()
        old_sample_groups(table)
        out["val_from_train_extra_s"] = time.perf_counter() - t1
        sizes = table.dataset_sizes
    elif kind == "after":
        from usjepa.shards.readers import open_sample_table

        table = open_sample_table(root, "train")
        out["open_s"] = time.perf_counter() - t0
        out["rss_mb"] = peak_rss_mb()
        reader = table.reader_view()
        out["pickle_mb"] = len(pickle.dumps(reader)) / 1e6
        out["spawn_worker"] = worker_cost(reader, "spawn", 4096)
        out["fork_worker"] = worker_cost(reader, "fork", 4096)
        sizes = table.dataset_sizes
    elif kind == "after_val":
        from usjepa.shards.readers import open_sample_table

        table = open_sample_table(root, "train", val_from_train=0.05)
        out["open_val_from_train_s"] = time.perf_counter() - t0
        out["rss_val_from_train_mb"] = peak_rss_mb()
        return out
    sampler = EpochSampler(sizes, 128, 0, RANKS, seed=0)
    t1 = time.perf_counter()
    sampler.set_epoch(1)
    sampler.pass_ids()
    out["set_epoch_s"] = time.perf_counter() - t1
    return out


def run_child(kind: str, root: Path, timeout: int = 1800) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_scale", "--child", kind, str(root)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- main


def project(n_frames: int, shards: int, index_bytes: int, before: dict | None, after: dict) -> dict:
    """5 M x 64 ranks from one rank's figures (per start of the job)."""
    node = lambda r: RANKS_PER_NODE * (r["rss_mb"] + WORKERS_PER_RANK * r["spawn_worker"]["anon_mb"])  # noqa: E731
    p = {"frames": n_frames, "ranks": RANKS,
         "after_index_bytes_read_gb": 0.0, "after_files_opened": RANKS * 2,  # manifest and table, per rank
         "after_stats": RANKS * 2 * shards, "after_node_memory_gb": node(after) / 1024,
         "before_index_bytes_read_gb": RANKS * index_bytes / 1e9, "before_files_opened": RANKS * shards,
         "before_stats": RANKS * shards}
    if before:
        p["before_node_memory_gb"] = node(before) / 1024
    return p


def markdown(rows: list[dict], hw: str) -> str:
    def cell(r, side, key, fmt):
        v = (r.get(side) or {}).get(key)
        return "—" if v is None else fmt.format(v)

    out = ["| corpus | open per rank, before → after | peak RSS of the rank | pickle for a spawned worker | "
           "spawned worker adds (anon) | forked worker adds | set_epoch (64 ranks) | open with val_from_train | "
           "table build, once | hardware |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a = r.get("before") or {}, r["after"]
        speed = f" (**{b['open_s'] / a['open_s']:.0f}×**)" if b else ""
        vb = f"{b['open_s'] + b['val_from_train_extra_s']:.1f} s → " if b else "— → "
        out.append(
            f"| {r['frames'] / 1e3:,.0f} k frames, {r['shards']} shards | "
            f"{cell(r, 'before', 'open_s', '{:.1f} s')} → **{a['open_s']:.2f} s**{speed} | "
            f"{cell(r, 'before', 'rss_mb', '{:.0f} MB')} → **{a['rss_mb']:.0f} MB** | "
            f"{cell(r, 'before', 'pickle_mb', '{:.1f} MB')} → {a['pickle_mb'] * 1e3:.2f} kB | "
            f"{b['spawn_worker']['anon_mb'] if b else '—'} MB → **{a['spawn_worker']['anon_mb']} MB** "
            f"(+{a['spawn_worker']['file_mb']} MB shared page cache) | "
            f"{b['fork_worker']['anon_mb'] if b else '—'} MB → {a['fork_worker']['anon_mb']} MB | "
            f"{a['set_epoch_s']:.2f} s | {vb}{a['open_val_from_train_s']:.2f} s | "
            f"{a['build_s']:.0f} s, {a['table_mb']:.0f} MB | {hw} |")
    return "\n".join(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--sizes", default="50000,500000", help="corpus sizes in frames, comma-separated "
                    "(add 5000000 for the 5 M corpus: ~1 GB of index files, several minutes)")
    ap.add_argument("--before-max", type=int, default=500_000,
                    help="measure the old per-sample parse up to this size (at 5 M it takes minutes and ~1.3 GB)")
    ap.add_argument("--work", type=Path, default=None, help="where the synthetic corpora go (default: a temp dir)")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return {}
    from benchmarks.common import hardware

    hw = hardware()
    work = Path(tempfile.mkdtemp(prefix="bench_scale_", dir=args.work))
    rows = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            root = work / f"c{n}"
            t0 = time.perf_counter()
            made = make_corpus(root, n)
            row = {"frames": n, **made, "make_s": round(time.perf_counter() - t0, 1)}
            print(f"[{n}] corpus: {made} in {row['make_s']} s", flush=True)
            if n <= args.before_max:
                row["before"] = run_child("before", root)
                print(f"[{n}] before: {row['before']}", flush=True)
            after = run_child("build", root)
            after.update(run_child("after", root))
            after.update(run_child("after_val", root))
            row["after"] = after
            print(f"[{n}] after: {after}", flush=True)
            row["projection"] = project(n, made["shards"], made["index_bytes"], row.get("before"), after)
            rows.append(row)
            shutil.rmtree(root)
            # saved after each size: the 5 M corpus takes minutes, the smaller ones are kept if it is stopped
            record = {"benchmark": "bench_scale", "when": utc_now(), "hardware": hw, "per_shard": PER_SHARD,
                      "datasets": N_DATASETS, "load_average_at_end": os.getloadavg(), "rows": rows}
            save_result(args.out, "bench_scale", record, markdown(rows, hardware_line(hw)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return record


if __name__ == "__main__":
    main()
