"""Run every ``benchmarks/bench_*.py`` in turn and gather their markdown tables in ``DIR/summary.md``.

    python -m benchmarks.run_all --out bench_out            # the full sizes each benchmark documents
    python -m benchmarks.run_all --out bench_out --quick    # small sizes: a few minutes on 2 cores

Each benchmark runs as its own subprocess (one failure does not stop the rest, and none inherits another's
thread or Numba settings) with ``--out DIR``; the summary lists each one's status, time and table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import hardware, hardware_line, utc_now

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Each benchmark's small-size options. The train loop needs two log intervals (the first is dropped), so
# 16 CPU steps (log every 8) and 10 GPU steps (log every 5) are its minimum.
QUICK = {
    "bench_ingest": ["--repeats", "1", "--long-copies", "1"],
    "bench_loader": ["--frames", "256", "--side", "224", "--rounds", "1", "--min-images", "0"],
    "bench_masks": ["--rounds", "4", "--calls", "10"],
    "bench_probe": ["--n", "288", "--seeds", "3"],
    "bench_remote": ["--frames", "128", "--rounds", "1"],
    "bench_scale": ["--sizes", "50000"],
    "bench_startup": ["--workers", "4", "--frames", "512", "--rounds", "1"],
    "bench_train": ["--cpu-steps", "16", "--gpu-steps", "10", "--rounds", "1"],
    "bench_usrc": ["--ddti-limit", "60", "--rounds", "1"],
}


def bench_modules() -> list[str]:
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def run_bench(name: str, out: Path, quick: bool) -> dict:
    cmd = [sys.executable, "-m", f"benchmarks.{name}", "--out", str(out)] + (QUICK.get(name, []) if quick else [])
    print(f"== {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=REPO).returncode
    return {"name": name, "command": " ".join(["python"] + cmd[1:]), "rc": rc, "seconds": time.perf_counter() - t0}


def tables_of(name: str, out: Path, since: float) -> list[str]:
    """The markdown files this run of ``name`` wrote (bench_train writes ``bench_train_cpu.md`` / ``_gpu.md``)."""
    files = [p for p in sorted(out.glob(f"{name}*.md")) if p.stat().st_mtime >= since]
    return [p.read_text().rstrip("\n") for p in files]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="each benchmark's small sizes")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = utc_now()
    sections, runs = [], []
    for name in bench_modules():
        since = time.time() - 1  # mtime granularity
        run = run_bench(name, args.out, args.quick)
        runs.append(run)
        status = "ok" if run["rc"] == 0 else f"FAILED (exit {run['rc']})"
        tables = tables_of(name, args.out, since) if run["rc"] == 0 else []
        sections.append(f"## {name}: {status}, {run['seconds']:.0f} s\n\n`{run['command']}`\n\n"
                        + ("\n\n".join(tables) if tables else "(no table written)"))
    hw = hardware()
    summary = (f"# Benchmarks{' (--quick sizes)' if args.quick else ''}\n\n"
               f"Hardware: {hardware_line(hw)}; Python {hw['python']}, torch {hw['torch']}, DALI {hw['dali']}; "
               f"started {started}.\n\n" + "\n\n".join(sections) + "\n")
    (args.out / "summary.md").write_text(summary)
    print(summary)
    failed = [r["name"] for r in runs if r["rc"] != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
