"""Ingest throughput: frames/s of a full ``usjepa-ingest run`` with 1 and 2 workers (the baseline is the
1-worker run in the same process), on the synthetic "demo" corpus and on ../shared/realdata/pocus when
present (once as it is and once as five copies, long enough for the worker scaling to show), the split's
perceptual hashing of the real stills in the main process vs the worker pool, and the cost per frame of each
stage on one clip (where the time goes).

    python -m benchmarks.bench_ingest --out bench_out

Frames/s are end to end: listing, decoding, preprocessing, encoding, spilling, shuffling, shard writing and
the manifest, including the start of the (spawned) worker processes, but
not the start of Python itself; each measurement runs in a fresh process. ``frames_phase_fps`` leaves out the
shard-writing phase.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import hardware, hardware_line

REPO = Path(__file__).resolve().parents[1]
REALDATA = Path(os.environ.get("USJEPA_REALDATA", REPO.parent / "shared" / "realdata"))


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the worker pool is joined before return)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_once(inputs: list[str], workers: int, tmp: Path) -> dict:
    """One measurement in a fresh Python process, as the usjepa-ingest command runs; the parent's imports are
    done before the clock starts, the workers' are inside it."""
    out = tmp / f"out_w{workers}_{time.monotonic_ns()}"
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_ingest", "--one-run", str(workers), str(out),
                           *inputs], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_run(inputs: list[str], workers: int, out: Path) -> dict:
    import webdataset  # noqa: F401  (the shard writer's import, done once per process, outside the clock)

    from usjepa.ingest.pipeline import IngestOptions, run_ingest
    from usjepa.ingest.sources import datasets_from_args

    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    m = run_ingest(datasets_from_args(inputs),
                   IngestOptions(out=out, workers=workers, progress=False))
    dt = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    frames = m["summary"]["frames"]
    return {"workers": workers, "frames": frames, "seconds": dt, "fps": frames / dt,
            # fork-server workers are not children of this process, so their CPU time is invisible here:
            # CPU figures only for the in-process (1 worker) run
            "cpu_seconds": cpu if workers == 1 else None,
            "frames_per_cpu_second": frames / cpu if workers == 1 else None,
            "frames_phase_fps": frames / m["timing"]["frames_phase_seconds"],
            "decoded": sum(d["decoded_frames"] for d in m["datasets"].values()),
            "duplicates_dropped": sum(d["duplicate_frames_dropped"] for d in m["datasets"].values())}


def repeated_corpus(src: Path, copies: int, dst: Path) -> Path:
    """``copies`` hard-linked (else copied) replicas of a dataset folder side by side: a corpus long enough that
    the fixed costs of a run (worker start, the serial shard phase) stop hiding how the frames phase scales."""
    import shutil

    for k in range(copies):
        shutil.copytree(src, dst / f"copy{k}", copy_function=_link_or_copy)
    return dst


def _link_or_copy(a, b):
    import shutil

    try:
        os.link(a, b)
    except OSError:
        shutil.copy2(a, b)


def stage_costs(path: Path, max_frames: int = 200) -> dict:
    """Milliseconds per frame of each stage on one file, in this process, one OpenCV thread."""
    import cv2

    from usjepa.ingest.preprocess import PreprocessConfig, compute_usrc_mask, encode_sample, finish_frame, prepare_frame
    from usjepa.ingest.readers import open_frames

    cv2.setNumThreads(1)
    cfg = PreprocessConfig()
    t = time.perf_counter()
    frames = []
    for _, f in open_frames(path):
        frames.append(f)
        if len(frames) >= max_frames:
            break
    t_read = time.perf_counter() - t
    t = time.perf_counter()
    prepared = [prepare_frame(f, cfg) for f in frames]
    t_prep = time.perf_counter() - t
    t = time.perf_counter()
    mask = compute_usrc_mask(np.stack([g for g, _ in prepared]), cfg)
    t_mask = time.perf_counter() - t
    t = time.perf_counter()
    finished = [finish_frame(g, c, mask, cfg) for g, c in prepared]
    t_fin = time.perf_counter() - t
    t = time.perf_counter()
    for g in finished:
        encode_sample(g, mask, cfg)
    t_enc = time.perf_counter() - t
    n = len(frames)
    return {"file": path.name, "frames": n, "size": list(frames[0].shape),
            **{k: 1e3 * v / n for k, v in (("read_ms", t_read), ("prepare_ms", t_prep), ("mask_ms", t_mask),
                                           ("finish_ms", t_fin), ("encode_ms", t_enc))}}


def split_hashing(roots: list[Path], workers: int, repeats: int) -> dict:
    """Seconds to hash every still of ``roots`` for the train/val split (``duplicates_share_a_split``): in this
    process (the path before: one core) vs through an ingest worker pool of ``workers``, interleaved, best of
    ``repeats``. The hash cache is cleared before each in-process round (workers start with none)."""
    from usjepa.ingest.duplicates import _file_hash
    from usjepa.ingest.pipeline import _Workers
    from usjepa.ingest.sources import DatasetSpec, duplicates_share_a_split, list_sources, split_of_group

    sources = list_sources([DatasetSpec(name=r.name, root=r) for r in roots]).sources
    split = {s.group: split_of_group(s.group) for s in sources}
    best = {"in_process": float("inf"), "pool": float("inf")}
    for _ in range(repeats):
        with _Workers(workers) as pool:
            pool.start()  # the pool's start is a fixed cost of the ingest run, paid once for both phases
            t = time.perf_counter()
            moved_pool = duplicates_share_a_split(sources, split, pool.map)
            best["pool"] = min(best["pool"], time.perf_counter() - t)
        _file_hash.cache_clear()
        t = time.perf_counter()
        moved = duplicates_share_a_split(sources, split)
        best["in_process"] = min(best["in_process"], time.perf_counter() - t)
        assert moved == moved_pool, "the pool's hashes moved other groups than the in-process ones"
    n = sum(s.kind == "still" for s in sources)
    return {"stills": n, "workers": workers, "seconds": best, "ms_per_still_in_process": 1e3 * best["in_process"] / n,
            "speedup": best["in_process"] / best["pool"]}


def markdown(result: dict) -> str:
    hw = result["hardware"]
    rows = ["| benchmark | corpus | frames | 1 worker | 2 workers | ratio 2 vs 1 | frames phase 2 vs 1 | "
            "frames per CPU-second (1 worker) | hardware |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, c in result["corpora"].items():
        r1, r2 = c["runs"]
        rows.append(f"| ingest end to end | {name} | {r1['frames']} | {r1['fps']:.0f} frames/s | {r2['fps']:.0f} frames/s "
                    f"| {c['ratio_2_vs_1']:.2f}x | {r2['frames_phase_fps'] / r1['frames_phase_fps']:.2f}x "
                    f"| {r1['frames_per_cpu_second']:.0f} | {hardware_line(hw)}, load {hw['load_avg_1min']:.1f} |")
    h = result.get("split_hashing")
    if h:
        rows.append("")
        rows.append(f"Split hashing (perceptual hash of every still for the train/val split, {h['stills']} real stills): "
                    f"{h['seconds']['in_process']:.2f} s in the main process ({h['ms_per_still_in_process']:.2f} ms per "
                    f"still, the path before) vs {h['seconds']['pool']:.2f} s through {h['workers']} ingest workers = "
                    f"{h['speedup']:.2f}x")
    s = result["stage_costs"]
    rows.append("")
    rows.append(f"Stage cost per frame ({s['file']}, {s['size'][1]}x{s['size'][0]}, 1 thread): read {s['read_ms']:.2f} ms, "
                f"prepare {s['prepare_ms']:.2f} ms, USrc mask {s['mask_ms']:.2f} ms, finish {s['finish_ms']:.2f} ms, "
                f"encode {s['encode_ms']:.2f} ms")
    return "\n".join(rows) + "\n"


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one-run"]:  # child process of run_once
        print(json.dumps(measure_run(argv[3:], int(argv[1]), Path(argv[2]))))
        return {}
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_out", help="folder for bench_ingest.json and bench_ingest.md")
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting, interleaved (the best is reported)")
    ap.add_argument("--long-copies", type=int, default=5,
                    help="also ingest this many copies of the POCUS folder as one long corpus (worker scaling)")
    a = ap.parse_args(argv)
    from usjepa.ingest.synthetic import make_synthetic_corpus

    result = {"benchmark": "ingest frames/s, 1 vs 2 workers", "hardware": {**hardware(), "load_avg_1min": os.getloadavg()[0]},
              "corpora": {}}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        corpora = {"synthetic demo": [str(make_synthetic_corpus(tmp / "raw", preset="demo", seed=0))]}
        if (REALDATA / "pocus").is_dir():
            corpora["realdata pocus"] = [str(REALDATA / "pocus")]
            if a.long_copies > 1:
                corpora[f"realdata pocus x{a.long_copies}"] = [str(repeated_corpus(REALDATA / "pocus", a.long_copies,
                                                                                   tmp / "long"))]
        for name, inputs in corpora.items():
            runs: dict[int, dict] = {}
            for _ in range(a.repeats):  # interleaved, best of each: other load on the machine hits both alike
                for w in (1, 2):
                    r = run_once(inputs, w, tmp)
                    print(f"{name}: {w} worker(s): {r['frames']} frames in {r['seconds']:.1f} s = {r['fps']:.0f} "
                          f"frames/s (frames phase {r['frames_phase_fps']:.0f}/s)", flush=True)
                    if w not in runs or r["fps"] > runs[w]["fps"]:
                        runs[w] = r
            result["corpora"][name] = {"runs": [runs[1], runs[2]], "ratio_2_vs_1": runs[2]["fps"] / runs[1]["fps"]}
        still_roots = [REALDATA / d for d in ("busi", "ddti") if (REALDATA / d).is_dir()]
        if still_roots:
            result["split_hashing"] = split_hashing(still_roots, workers=2, repeats=a.repeats)
        clip = None
        if (REALDATA / "pocus").is_dir():
            clip = next((REALDATA / "pocus").rglob("*.mov"), None)
        clip = clip or next((tmp / "raw").rglob("*.mp4"))
        result["stage_costs"] = stage_costs(clip)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_ingest.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (out / "bench_ingest.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
