"""``make demo``: the whole job on a synthetic corpus, on a laptop CPU, in a few minutes.

    python -m usjepa.demo --out demo_out

1. a synthetic corpus (stills, videos, a volume; class labels in folder-per-class layout)
   — ``usjepa.ingest.synthetic.make_synthetic_corpus``;
2. ``usjepa-ingest`` → WebDataset shards + DALI indexes + manifest;
3. stage 1: a tiny teacher by masked pixel reconstruction (``usjepa.train``, ``configs/tiny_cpu.yaml``);
4. stage 2: a tiny US-JEPA student by SALT against that frozen teacher;
5. linear probe of the student, the teacher and a random-init floor on the corpus's labelled sets
   (``usjepa.probe.run.probe_encoders``).

Running it again continues where it stopped (training resumes with ``--resume auto``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import yaml

REPO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
TINY_ARCH = "vit_test_tiny"

log = logging.getLogger("usjepa.demo")


def banner(i: int, n: int, text: str, t0: float) -> None:
    print(f"\n=== [{i}/{n}] {text}   (t = {time.perf_counter() - t0:.0f} s)", flush=True)


def labelled_roots(datasets_yaml: Path) -> dict[str, Path]:
    """The datasets of the corpus list that carry class labels (folder-per-class), by name."""
    spec = yaml.safe_load(datasets_yaml.read_text())
    entries = spec.get("datasets", spec) if isinstance(spec, dict) else spec
    if isinstance(entries, dict):
        entries = [{"name": k, **v} for k, v in entries.items()]
    out = {}
    for e in entries:
        root = Path(e["root"])
        if not root.is_absolute():
            root = datasets_yaml.parent / root
        # folder-per-class: class sub-folders holding stills, videos (K frames each) or volumes (K slices)
        if e.get("kind", "stills") in ("stills", "images", "image", "video", "volume") and root.is_dir():
            out[e["name"]] = root
    return out


def run_demo(out: Path, stage1_epochs: int = 4, stage2_epochs: int = 6, probe_seeds: int = 3) -> dict:
    from usjepa.train import train

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    n = 5

    banner(1, n, "synthetic corpus", t0)
    from usjepa.ingest.synthetic import make_synthetic_corpus

    datasets_yaml = out / "raw" / "datasets.yaml"
    if not datasets_yaml.is_file():  # written last, so its presence means the corpus is complete
        datasets_yaml = Path(make_synthetic_corpus(out / "raw", preset="demo", seed=0))
    print(f"dataset list: {datasets_yaml}")

    banner(2, n, "ingest -> shards", t0)
    shards = out / "shards"
    from usjepa.ingest.cli import main as ingest_main

    rc = ingest_main([str(datasets_yaml), "--out", str(shards)])
    if rc not in (0, 3, None):  # 3: finished, some input files skipped (listed in the manifest)
        raise SystemExit(f"usjepa-ingest failed with status {rc}")

    common = [str(REPO_CONFIG), "--resume", "auto", "--set", f"data.root={shards}", "--set", "train.progress=true"]
    banner(3, n, "stage 1: tiny teacher by masked pixel reconstruction", t0)
    stage1 = out / "stage1_teacher"
    train(common + ["--out", str(stage1), "--set", "stage=1", "--set", f"optim.epochs={stage1_epochs}"])
    teacher = stage1 / "checkpoints" / "best.pt"

    banner(4, n, "stage 2: tiny US-JEPA student by SALT against the frozen teacher", t0)
    stage2 = out / "stage2_student"
    train(common + ["--out", str(stage2), "--set", f"model.teacher={teacher}", "--set", f"optim.epochs={stage2_epochs}"])

    banner(5, n, "linear probe: student vs teacher vs random init", t0)
    probe_dir = out / "probe"
    from usjepa.probe.run import probe_encoders

    roots = labelled_roots(datasets_yaml)
    if not roots:
        raise SystemExit(f"{datasets_yaml} lists no labelled (folder-per-class) dataset to probe")
    probe_encoders(
        {"US-JEPA student (tiny)": str(stage2 / "export" / "encoder_best.safetensors"),
         "stage-1 teacher (tiny)": str(stage1 / "export" / "encoder_best.safetensors"),
         "random init": f"random:{TINY_ARCH}"},
        roots, probe_dir, seeds=probe_seeds,
    )

    elapsed = time.perf_counter() - t0
    paths = {
        "shards": shards,
        "teacher checkpoints": stage1 / "checkpoints",
        "student checkpoints": stage2 / "checkpoints",
        "student encoder (timm-loadable)": stage2 / "export" / "encoder_best.safetensors",
        "training metrics": [stage1 / "metrics.jsonl", stage2 / "metrics.jsonl"],
        "probe table": probe_dir / "probe_table.md",
        "probe results": probe_dir / "probe_results.json",
    }
    print(f"\n=== done in {elapsed:.0f} s")
    for k, v in paths.items():
        print(f"{k:34s} {', '.join(map(str, v)) if isinstance(v, list) else v}")
    table = probe_dir / "probe_table.md"
    if table.is_file():
        print("\n" + table.read_text())
    return {"seconds": elapsed, **{k: str(v) for k, v in paths.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    run_demo(Path(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
