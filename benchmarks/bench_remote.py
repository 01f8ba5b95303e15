"""Shards from object storage: the same corpus read from a local folder and from a loopback S3 server.

A synthetic corpus is written locally and uploaded to moto's S3 server on 127.0.0.1 (started here); then,
interleaved in one process:

* **bytes**: a training epoch's batches (the sampler's global shuffle), each batch's image + mask + metadata
  members read by ``SampleReader`` — ``pread`` locally, coalesced range requests from S3 (``prefetch``);
  images/s, requests and bytes per batch;
* **loader**: ``build_loader(backend="torch")`` with all augmentations, 2 workers: local; S3 by range only
  (``cache_limit_gb=0``); S3 with the shard cache (the third epoch timed: range reads of the first epoch and
  the start of the second fill it).

moto is a Python server on the same 2 cores as the client, so the S3 figures are a floor for the client's
overhead per request, not a cloud store's latency or bandwidth.

    python -m benchmarks.bench_remote --out benchmarks/results
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import hardware, hardware_line, save_result, utc_now

BUCKET = "usjepa-bench"


def start_s3():
    """moto's S3 server on 127.0.0.1 and fsspec pointed at it (this process and its forked workers)."""
    import logging
    import os

    import fsspec.config
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    fsspec.config.conf["s3"] = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench"}
    return server


def read_bytes(table, batches) -> dict:
    reader = table.reader_view()
    before = reader.remote.store.requests["range"] if reader.remote else 0  # the store is the table's: shared
    t0 = time.perf_counter()
    n = nbytes = 0
    for ids in batches:
        reader.prefetch(ids)
        for i in ids:
            jpg, png = reader.read(int(i))
            reader.median(int(i))
            n += 1
            nbytes += len(jpg) + len(png)
    dt = time.perf_counter() - t0
    reqs = reader.remote.store.requests["range"] - before if reader.remote else 0
    reader.close()
    return {"images_per_s": n / dt, "requests_per_batch": reqs / len(batches), "member_bytes_per_batch":
            nbytes / len(batches), "seconds": dt}


def run_loader(root, epochs: int, batch_size: int, workers: int, **kw) -> dict:
    from usjepa.shards.loader import build_loader

    loader = build_loader(root, "train", batch_size, {"num_workers": workers, "cap": None}, backend="torch",
                          seed=0, **kw)
    timed = {}
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        t0, n = time.perf_counter(), 0
        for b in loader:
            n += len(b)
        timed = {"images_per_s": n / (time.perf_counter() - t0), "images": n, "epoch": epoch}
    loader.close()
    return timed  # the last epoch: for the cached run, the one read from the cache


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=512)
    ap.add_argument("--side", type=int, default=224)
    ap.add_argument("--per-shard", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians are reported")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)

    try:
        import s3fs
        from moto.server import ThreadedMotoServer  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"bench_remote needs s3fs and moto[server] (pip install -e .[dev]): {e}")

    from usjepa.shards.readers import open_sample_table
    from usjepa.shards.sampler import EpochSampler
    from usjepa.shards.synthetic_shards import write_synthetic_corpus

    tmp = Path(tempfile.mkdtemp(prefix="bench_remote_"))
    root = write_synthetic_corpus(tmp / "local", {"a": args.frames // 2, "b": args.frames - args.frames // 2},
                                  size=(args.side, args.side), per_shard=args.per_shard, seed=0)
    server = start_s3()
    try:
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        fs.put(str(root) + "/", f"{BUCKET}/corpus", recursive=True)
        url = f"s3://{BUCKET}/corpus"
        t0 = time.perf_counter()
        remote = open_sample_table(url, "train", cache_dir=str(tmp / "cache_open"), cache_limit_gb=0)
        open_s3 = time.perf_counter() - t0
        local = open_sample_table(root, "train")
        sampler = EpochSampler(local.dataset_sizes, args.batch_size, 0, 1, 0, cap=None, shuffle=True,
                               drop_last=True)
        batches = list(sampler.pass_ids())  # the training epoch's batches: a global shuffle over all shards
        rounds = []
        for r in range(args.rounds):
            row = {"bytes_local": read_bytes(local, batches), "bytes_s3": read_bytes(remote, batches)}
            row["loader_local"] = run_loader(root, 1, args.batch_size, args.workers)
            row["loader_s3_range"] = run_loader(url, 1, args.batch_size, args.workers,
                                                cache_dir=str(tmp / f"cache_r{r}"), cache_limit_gb=0)
            row["loader_s3_cached"] = run_loader(url, 3, args.batch_size, args.workers,
                                                 cache_dir=str(tmp / f"cache_c{r}"), cache_limit_gb=10)
            rounds.append(row)
            print(f"round {r}: " + ", ".join(f"{k} {v['images_per_s']:.0f} img/s" for k, v in row.items()),
                  flush=True)
    finally:
        server.stop()

    def med(key, field="images_per_s"):
        return statistics.median(r[key][field] for r in rounds)

    def ratio(key, base):
        return statistics.median(r[key]["images_per_s"] / r[base]["images_per_s"] for r in rounds)

    hw = hardware()
    record = {
        "benchmark": "bench_remote", "when": utc_now(), "hardware": hw, "args": vars(args) | {"out": str(args.out)},
        "shards": len(local.shard_paths), "samples": len(local), "open_s3_s": open_s3, "rounds": rounds,
        "median": {k: med(k) for k in rounds[0]},
        "ratio_to_local": {"bytes_s3": ratio("bytes_s3", "bytes_local"),
                           "loader_s3_range": ratio("loader_s3_range", "loader_local"),
                           "loader_s3_cached": ratio("loader_s3_cached", "loader_local")},
        "requests_per_batch_s3": med("bytes_s3", "requests_per_batch"),
    }
    rpb = record["requests_per_batch_s3"]
    md = (f"| read path | local | loopback S3 (moto) | S3 / local |\n|---|---|---|---|\n"
          f"| bytes only, batch {args.batch_size} | {med('bytes_local'):.0f} img/s | {med('bytes_s3'):.0f} img/s, "
          f"{rpb:.1f} requests/batch (members: {2 * args.batch_size}) | {record['ratio_to_local']['bytes_s3']:.2f}× |\n"
          f"| loader (torch backend, {args.workers} workers), range reads | {med('loader_local'):.0f} img/s | "
          f"{med('loader_s3_range'):.0f} img/s | {record['ratio_to_local']['loader_s3_range']:.2f}× |\n"
          f"| loader, 3rd epoch, from the shard cache | {med('loader_local'):.0f} img/s | "
          f"{med('loader_s3_cached'):.0f} img/s | {record['ratio_to_local']['loader_s3_cached']:.2f}× |\n\n"
          f"{len(local)} frames {args.side}², {len(local.shard_paths)} shards of {args.per_shard}; "
          f"opening the s3:// table (manifest + indexes mirrored) {open_s3:.2f} s; medians of {args.rounds} "
          f"interleaved rounds; {hardware_line(hw)}.\n")
    save_result(args.out, "bench_remote", record, md)
    return record


if __name__ == "__main__":
    main()
