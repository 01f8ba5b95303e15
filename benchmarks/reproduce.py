"""One-command small reproduction on real ultrasound: ingest → stage-1 teacher → SALT students → probe.

    python -m benchmarks.reproduce --out repro_out                   # CPU size (2 idle cores: 40 min)
    python -m benchmarks.reproduce --out repro_out --quick           # reduced: fewer steps, 3 students
    python -m benchmarks.reproduce --out repro_out --preset vitb16   # the same on a GPU with ViT-B/16
    make reproduce                                                   # = the first line, into repro_out/

1. ``usjepa-ingest`` of ``../shared/realdata`` (POCUS videos and stills, BUSI, DDTI) into shards.
2. Stage 1: a teacher by pixel reconstruction under the multi-block masks (``usjepa.train``, stage 1,
   ``model.decoder.masking: multiblock``: SALT's stage 1; the preset's ``stage1_masking: random`` is MAE's).
3. Stage 2: SALT students against that frozen teacher, each with at least the teacher's budget (SALT gives
   most compute to stage 2): by default the USrc-on student; ``--students`` adds rows of the ablation
   table: USrc off, and one switch each: batch-minimum lengths, layer-normed targets, targets x |valid|.
   Every run's lr and wd schedules end exactly at its last step (``optim.schedule_epochs``), and the
   table gives the student's last loss beside the image-mean and position + image-mean oracles and the
   prediction spread within an image against the targets' (``usjepa.models.salt.oracle_diagnostics``).
4. The probe (``usjepa.probe.run.probe_encoders``: linear and logreg on standardised features, ``--seeds``
   probe seeds) of a random init, the teacher and every student on DDTI (TI-RADS category, split grouped
   by patient) and on POCUS frames (lung finding, split grouped by video; the class with a single video is
   left out), over ``--splits`` grouped split draws (default 10, features reused). What a test set of
   ~90 DDTI images or 3
   POCUS videos scores depends on which patients or videos it holds (the same features: 0.126 on draw 0,
   0.170 ± 0.038 over 5 draws), and logreg has no seed spread at all, so the table gives the mean ± std
   over draws, and each comparison (teacher - random, student - teacher) is paired on the same draws.

The labelled sets are written here as ``labels.csv`` (path, label, group) beside copies of the images,
because the probe resolves image paths inside its data root. Pretraining sees the probe's images without
labels (as the paper's corpus contains its evaluation sets' sources; no labels are used before the probe).
Every phase resumes: running the command again continues the training runs (``--resume auto``) and
reuses the probe's feature cache. Writes ``reproduce.json`` and ``reproduce.md`` (the table, the config,
the hardware, the wall time of each phase) into ``--out``; ``--results`` copies them to a results folder.
``--probe-lr`` / ``--probe-patience`` re-probe the same encoders with another probe, and ``--stage1-steps``,
``--stage2-steps``, ``--stage2-lr`` train other runs beside the preset's; both get suffixed folders and files
(e.g. ``student_usrc_on_lr0.002``, ``reproduce_lr0.002.md``) and reuse what they do not change.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import yaml

from benchmarks.common import hardware, hardware_line, utc_now
from benchmarks.probe_realdata import ddti_nodules
from usjepa.probe.data import DEFAULT_PATIENT_PATTERN

REPO = Path(__file__).resolve().parents[1]
REALDATA = Path(os.environ.get("USJEPA_REALDATA", REPO.parent / "shared" / "realdata"))
log = logging.getLogger("usjepa.reproduce")


@dataclass(frozen=True)
class Preset:
    """Everything that sizes the reproduction; the JSON records it whole."""

    arch: str
    predictor: dict
    decoder: dict
    batch_size: int
    stage1_steps: int
    stage2_steps: int
    stage1_lr: float  # peak, as written (lr_scale none): a short run cannot use MAE's 800-epoch base lr
    stage2_lr: float
    backend: str
    threads: int | None
    bf16: bool
    compile: bool
    students: tuple[str, ...]
    frames_per_video: int = 24
    probe_seeds: int = 5
    split_draws: int = 10  # grouped train/val/test draws the probe is repeated over (split_seed 0..n-1)
    warmup_frac: float = 0.1
    stage1_masking: str = "multiblock"  # SALT's stage 1: pixels under the multi-block masks; "random": MAE


# Student variants: the switches each one sets on top of the stage-2 config (rows of the table).
VARIANTS = {
    "usrc off": {"masks.usrc": False},
    "usrc on": {"masks.usrc": True},
    "usrc on + batch-min lengths": {"masks.usrc": True, "masks.lengths": "batch_min"},
    "usrc on + target layernorm": {"masks.usrc": True, "model.target_norm": "layernorm"},
    "usrc on + targets x valid": {"masks.usrc": True, "masks.tgt_scale_of": "valid"},
}

# "cpu": a 6 x 192 ViT (patch 16, 224 px), sized to the 60-minute budget on this 2-core machine when idle:
# stage 1 runs 75-80 img/s (0.43 s a step), stage 2 ~24 img/s (1.33 s). SALT gives most of the compute to
# stage 2, so each student trains at least as many steps (images) as the teacher: 800 teacher steps (~6 min)
# and 1200 student steps (~27 min) for the default student; the ablation students (--students) cost 27 min
# each. The earlier allocation (2500 teacher steps, 200 per student: the student saw 8 % of the teacher's
# images, a summed lr of 0.062 vs 1.29) could not test SALT's claim. The 4 x 96 ViT an earlier session chose
# from rates measured under load took 8 min idle, and its teacher did not separate from random init even at
# 4000 steps (benchmarks/results/reproduce/README.md).
PRESETS = {
    "cpu": Preset(arch="vit_tiny6_patch16_224", predictor={"embed_dim": 96, "depth": 3, "num_heads": 3},
                  decoder={"embed_dim": 128, "depth": 2, "num_heads": 4, "mask_ratio": 0.75}, batch_size=32,
                  stage1_steps=800, stage2_steps=1200, stage1_lr=1.0e-3, stage2_lr=5.0e-4, backend="torch",
                  threads=2, bf16=False, compile=False, students=("usrc on",)),
    # One GPU, batch 128: MAE's base lr 1.5e-4 and Table 5's 5e-5 as written; ~2700 frames make 5000
    # steps ~240 epochs. Not run yet (no GPU in the session that wrote it).
    "vitb16": Preset(arch="vit_base_patch16_224", predictor={"embed_dim": 384, "depth": 12, "num_heads": 12},
                     decoder={"embed_dim": 512, "depth": 8, "num_heads": 16, "mask_ratio": 0.75}, batch_size=128,
                     stage1_steps=2000, stage2_steps=5000, stage1_lr=1.5e-4, stage2_lr=5.0e-5,
                     backend="dali", threads=None, bf16=True, compile=True, students=tuple(VARIANTS)),
}
# The CPU preset before it was resized (kept: the first runs and the teacher-steps check used it).
PRESETS["cpu_4x96"] = replace(PRESETS["cpu"], arch="vit_test_small", stage1_steps=1000, stage2_steps=1000,
                              predictor={"embed_dim": 48, "depth": 2, "num_heads": 2},
                              decoder={"embed_dim": 64, "depth": 1, "num_heads": 2, "mask_ratio": 0.75})
# --quick: the cpu preset with few steps (the student still gets the teacher's budget) and two students.
QUICK = {"stage1_steps": 120, "stage2_steps": 120, "frames_per_video": 12, "split_draws": 4,
         "students": ("usrc off", "usrc on")}


def student_budget(preset: Preset) -> dict:
    """Images each run sees, and the student's share of the teacher's (SALT: ≥ 1, most compute to stage 2)."""
    return {"teacher_images": preset.stage1_steps * preset.batch_size,
            "student_images": preset.stage2_steps * preset.batch_size,
            "student_to_teacher": preset.stage2_steps / preset.stage1_steps}


# ------------------------------------------------------------------------------------------ labelled sets


def write_labels(root: Path, rows: list[tuple[str, str, str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group"])
        w.writerows(rows)
    return root


def ddti_labelled(src: Path, out: Path) -> Path:
    """DDTI: one image per nodule (``probe_realdata.ddti_nodules``), label = TI-RADS category, group =
    patient, the crops copied under ``images/``."""
    rows = []
    for name, tirads, patient in ddti_nodules(src):
        dst = out / "images" / name
        if not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / "cropped" / name, dst)
        rows.append((f"images/{name}", f"TI-RADS {tirads}", f"patient{patient}"))
    return write_labels(out, rows)


def pocus_labelled(src: Path, out: Path, frames_per_video: int) -> Path:
    """POCUS: evenly spaced frames of each video, label = the manifest's class, group = the patient where the
    file name names one (``pat<n>``) and the video otherwise, so that no video or patient straddles splits.
    Stills are left out (one frame would be a whole split's share of its class:
    a first run scored covid on a single test frame), then classes with fewer than 3 videos (train, val and
    test each need one)."""
    manifest = [r for r in csv.DictReader(open(src / "MANIFEST.csv", newline=""))
                if Path(r["path"]).suffix.lower() not in (".png", ".jpg", ".jpeg")]
    sources_per_class: dict[str, int] = {}
    for r in manifest:
        sources_per_class[r["class"]] = sources_per_class.get(r["class"], 0) + 1
    rows = []
    for k, r in enumerate(manifest):
        if sources_per_class[r["class"]] < 3:
            continue
        path = src / r["path"]
        patient = re.search(DEFAULT_PATIENT_PATTERN, Path(r["path"]).name)  # Reg_pat1Image_…: clips of patient 1
        group = f"patient {int(patient.group(1))}" if patient else f"source{k:02d}"
        frames = read_frames(path, frames_per_video)
        for j, frame in enumerate(frames):
            name = f"frames/{k:02d}_{j:03d}.png"
            if not (out / name).is_file():
                (out / "frames").mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(out / name), frame)
            rows.append((name, r["class"], group))
    return write_labels(out, rows)


def read_frames(path: Path, n: int) -> list[np.ndarray]:
    """Up to n evenly spaced frames (BGR) of a video, or the still itself."""
    if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        return [] if img is None else [img]
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    if len(frames) <= n:
        return frames
    return [frames[int(i)] for i in np.linspace(0, len(frames) - 1, n).round()]


# ------------------------------------------------------------------------------------------------ training


def train_config(preset: Preset, stage: int, shards: Path, steps: int, steps_per_epoch: int) -> dict:
    """The trainer's YAML for one run: ``steps`` optimiser steps, the schedules spanning exactly them
    (``optim.schedule_epochs`` = steps / steps per epoch: rounding the epochs up would cut the cosine at
    200 of 249 scheduled steps)."""
    epochs = max(1, -(-steps // steps_per_epoch))
    horizon = steps / steps_per_epoch
    return {
        "stage": stage, "seed": 0,
        "model": {"arch": preset.arch, "teacher_arch": None, "predictor": preset.predictor,
                  "decoder": {**preset.decoder, "masking": preset.stage1_masking}},
        "data": {"root": str(shards), "batch_size": preset.batch_size, "backend": preset.backend,
                 "loader": {"num_workers": 1}},
        "masks": {},
        "optim": {"epochs": epochs, "schedule_epochs": horizon, "warmup_epochs": preset.warmup_frac * horizon,
                  "lr_start": 0.0, "lr_peak": preset.stage1_lr if stage == 1 else preset.stage2_lr,
                  "lr_final": 0.0 if stage == 1 else (preset.stage2_lr / 100), "lr_scale": "none",
                  **({"wd_start": 0.05, "wd_final": 0.05} if stage == 1 else {"wd_start": 0.04, "wd_final": 0.4})},
        "train": {"bf16": preset.bf16, "compile": preset.compile, "log_every": 10, "ckpt_every_steps": 100,
                  "keep_last": 1, "max_steps": steps, "tensorboard": False, "progress": False,
                  "threads": preset.threads},
    }


def run_training(cfg: dict, out: Path, overrides: dict | None = None) -> tuple[Path, float]:
    """Train (resuming if ``out`` holds checkpoints) -> (the exported last encoder, seconds the training
    took, also when an earlier invocation ran it: ``DONE`` records them)."""
    from usjepa.train import train

    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    sets = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in (overrides or {}).items()]
    export = out / "export" / "encoder_last.safetensors"
    done = out / "DONE"
    if not done.is_file():
        t0 = time.perf_counter()
        rc = train([str(path), "--out", str(out), "--resume", "auto"] + sum((["--set", s] for s in sets), []))
        if rc != 0:
            raise SystemExit(f"training in {out} failed with status {rc}")
        done.write_text(json.dumps({"finished_utc": utc_now(), "seconds": time.perf_counter() - t0}) + "\n")
    return export, float(json.loads(done.read_text())["seconds"])


def steps_per_epoch(shards: Path, batch_size: int) -> int:
    from usjepa.shards.loader import build_loader

    loader = build_loader(shards, "train", batch_size, {"num_workers": 1}, None, backend="torch")
    n = len(loader)
    loader.close()
    return n


def last_train_record(run: Path) -> dict:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    return records[-1] if records else {}


# ----------------------------------------------------------------------------------------------- reporting


def split_summary(probe: dict, datasets: list[str]) -> dict:
    """Per dataset, encoder and classifier of one ``probe_encoders`` result over several split draws: the
    macro-F1 of each draw (mean over probe seeds), their mean ± std over draws, and the degenerate seeds.
    The draws' spread is the honest error bar of a small test set: probe seeds share one split, so their
    spread misses which patients happened to be held out."""
    out: dict = {}
    for d in datasets:
        for enc, r in probe["results"][d].items():
            for clf, rc in r.items():
                if not isinstance(rc, dict) or "per_draw" not in rc:
                    continue
                out.setdefault(d, {}).setdefault(enc, {})[clf] = {
                    "per_split": rc["per_draw"], "draw_ids": rc["draw_ids"], **rc["macro_f1"],
                    "probe_seed_std": rc["probe_seed_std"], "degenerate_seeds": rc["degenerate_seeds"],
                    "seeds": len(rc["seeds"])}
    return out


def paired(summary: dict, a: str, b: str) -> dict:
    """a - b on the same split draws, per dataset and classifier (``usjepa.probe.draws.paired_difference``:
    mean ± std of the differences, draws a won, and whether the difference exceeds its spread)."""
    from usjepa.probe.draws import paired_difference

    out: dict = {}
    for d, encs in summary.items():
        if a not in encs or b not in encs:
            continue
        for clf in encs[a]:
            fa = dict(zip(encs[a][clf]["draw_ids"], encs[a][clf]["per_split"]))
            fb = dict(zip(encs[b][clf]["draw_ids"], encs[b][clf]["per_split"]))
            common = [k for k in fa if k in fb]
            out.setdefault(d, {})[clf] = paired_difference([fa[k] for k in common], [fb[k] for k in common])
    return out


DIAGNOSTICS = (("loss", "last train loss"), ("loss_oracle_image_mean", "oracle: image mean"),
               ("loss_oracle_position_plus_image_mean", "oracle: position + image mean"),
               ("spread_pred_in_image", "spread pred"), ("spread_target_in_image", "spread target"))


def table(summary: dict, training: dict) -> str:
    datasets = list(summary)
    cols = [(d, c) for d in datasets for c in next(iter(summary[d].values()))]
    head = ("| encoder | " + " | ".join(f"{d} macro-F1 ({c})" for d, c in cols) + " | "
            + " | ".join(t for _, t in DIAGNOSTICS) + " |")
    lines = [head, "|" + "---|" * (len(cols) + 1 + len(DIAGNOSTICS))]
    for enc in summary[datasets[0]]:
        cells = []
        for d, c in cols:
            r = summary[d][enc][c]
            flag = f" ⚠{r['degenerate_seeds']}/{r['seeds']}" if r["degenerate_seeds"] else ""
            cells.append(f"{r['mean']:.3f} ± {r['std']:.3f}{flag}")
        tr = training.get(enc, {})
        cells += [f"{tr[k]:.4f}" if k in tr else "–" for k, _ in DIAGNOSTICS]
        lines.append(f"| {enc} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(comparisons: dict) -> str:
    first = next(iter(comparisons.values()))
    cols = [(d, c) for d in first for c in first[d]]
    lines = ["| difference | " + " | ".join(f"{d} ({c})" for d, c in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, comp in comparisons.items():
        cells = [f"{comp[d][c]['mean']:+.3f} ± {comp[d][c]['std']:.3f} ({comp[d][c]['wins']}/{comp[d][c]['draws']})"
                 + (" ✔" if comp[d][c].get("decided") else "") for d, c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("repro_out"))
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--quick", action="store_true", help=f"reduced size: {QUICK}")
    ap.add_argument("--stage1-steps", type=int)
    ap.add_argument("--stage2-steps", type=int)
    ap.add_argument("--stage2-lr", type=float, help="the students' peak lr (default: the preset's)")
    ap.add_argument("--seeds", type=int, help="probe seeds per split draw (default 5)")
    ap.add_argument("--splits", type=int, help="grouped split draws to probe over (default 10)")
    ap.add_argument("--students", help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--probe-lr", type=float, help="one linear-probe lr instead of the probe's grid")
    ap.add_argument("--probe-patience", type=int, help="the probe's early-stopping patience (default: its own)")
    ap.add_argument("--reuse-shards", action="store_true",
                    help="use OUT/shards as they are (e.g. to re-probe after the ingest code changed, which makes "
                         "usjepa-ingest refuse the old folder)")
    ap.add_argument("--realdata", type=Path, default=REALDATA)
    ap.add_argument("--results", type=Path, help="also copy reproduce.json / .md here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")

    preset = PRESETS[args.preset]
    if args.quick:
        preset = replace(preset, **QUICK)
    for key, value in (("stage1_steps", args.stage1_steps), ("stage2_steps", args.stage2_steps),
                       ("stage2_lr", args.stage2_lr),
                       ("probe_seeds", args.seeds), ("split_draws", args.splits)):
        if value is not None:
            preset = replace(preset, **{key: value})
    if args.students:
        names = tuple(s.strip() for s in args.students.split(","))
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            ap.error(f"unknown students {unknown}; known: {list(VARIANTS)}")
        preset = replace(preset, students=names)
    if preset.stage2_steps < preset.stage1_steps:
        log.warning("each student trains %d steps, the teacher %d: SALT gives stage 2 at least stage 1's budget, "
                    "so this run does not test its claim", preset.stage2_steps, preset.stage1_steps)
    for sub in ("pocus", "busi", "ddti"):
        if not (args.realdata / sub).is_dir():
            ap.error(f"{args.realdata / sub} not found (set --realdata or USJEPA_REALDATA)")

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    from usjepa.ingest.cli import main as ingest_main

    shards = out / "shards"
    corpus = out / "datasets.yaml"  # DDTI's cropped images only: its nodule masks are no ultrasound
    corpus.write_text(yaml.safe_dump({"datasets": [
        {"name": "pocus", "root": str(args.realdata / "pocus")}, {"name": "busi", "root": str(args.realdata / "busi")},
        {"name": "ddti", "root": str(args.realdata / "ddti" / "cropped")}]}))
    if not (args.reuse_shards and (shards / "manifest.json").is_file()):
        rc = ingest_main(["run", str(corpus), "--out", str(shards)])
        if rc not in (0, 3):
            raise SystemExit(f"usjepa-ingest failed with status {rc}")
    labelled = {"ddti": ddti_labelled(args.realdata / "ddti", out / "labelled" / "ddti"),
                "pocus": pocus_labelled(args.realdata / "pocus", out / "labelled" / "pocus", preset.frames_per_video)}
    times["ingest + labelled sets"] = time.perf_counter() - t0

    spe = steps_per_epoch(shards, preset.batch_size)
    # Runs sized off the preset get their own folders and files, so that they can share OUT (its shards, its
    # feature cache, the teacher they do not change) with the preset's run without resuming its checkpoints.
    base = PRESETS[args.preset]
    tag1 = f"_{preset.stage1_steps}steps" if preset.stage1_steps != base.stage1_steps else ""
    tag2 = tag1 + (f"_{preset.stage2_steps}steps" if preset.stage2_steps != base.stage2_steps else "") + (
        f"_lr{preset.stage2_lr:g}" if preset.stage2_lr != base.stage2_lr else "")
    teacher_dir = out / ("stage1_teacher" + tag1)
    teacher, times["stage 1 teacher"] = run_training(train_config(preset, 1, shards, preset.stage1_steps, spe),
                                                     teacher_dir)

    encoders = {"random init": f"random:{preset.arch}", "stage-1 teacher": str(teacher)}
    training = {"stage-1 teacher": last_train_record(teacher_dir)}
    for name in preset.students:
        run = out / ("student_" + re.sub(r"[^a-z0-9]+", "_", name).strip("_") + tag2)
        cfg = train_config(preset, 2, shards, preset.stage2_steps, spe)
        cfg["model"]["teacher"] = str(teacher)
        export, times[f"student: {name}"] = run_training(cfg, run, VARIANTS[name])
        encoders[f"student: {name}"] = str(export)
        training[f"student: {name}"] = last_train_record(run)

    t0 = time.perf_counter()
    from usjepa.probe.run import probe_encoders

    chosen = {k: v for k, v in (("lr", args.probe_lr), ("patience", args.probe_patience)) if v is not None}
    suffix = tag2 + "".join(f"_probe_{k}{v:g}" for k, v in chosen.items())  # another probe: other files
    probe_cfg = {"lr_grid": (chosen["lr"],)} if "lr" in chosen else {}
    probe_cfg.update({"patience": chosen["patience"]} if "patience" in chosen else {})
    # the features are extracted once: the split draws reuse them
    probe = probe_encoders(encoders, {d: str(v) for d, v in labelled.items()}, out / f"probe{suffix}",
                           seeds=preset.probe_seeds, split_draws=preset.split_draws, batch_size=32, workers=1,
                           plots=False, probe=probe_cfg or None, cache_dir=out / "feature_cache")
    summary = split_summary(probe, list(labelled))
    # a guess drawn with the test set's class frequencies q_c has expected precision = recall = q_c per class
    chance = {d: 1 / len(probe["datasets"][d]["classes"]) for d in labelled}
    pairs = [("stage-1 teacher", "random init")] + [(e, "stage-1 teacher") for e in encoders if e.startswith("student")]
    comparisons = {f"{a} − {b}": paired(summary, a, b) for a, b in pairs}
    times["probe"] = time.perf_counter() - t0
    times["this invocation"] = time.perf_counter() - t_all
    times["total"] = sum(v for k, v in times.items() if k != "this invocation")

    argv_used = argv if argv is not None else sys.argv[1:]
    res = {
        "benchmark": "small reproduction on real ultrasound (ingest -> MAE teacher -> SALT students -> probe)",
        "command": "python -m benchmarks.reproduce " + " ".join(argv_used),
        "reduced": bool(args.quick or args.stage1_steps or args.stage2_steps or args.stage2_lr or args.students
                        or args.seeds or args.splits),
        "probe_overrides": chosen, "reused_shards": bool(args.reuse_shards),
        "preset": args.preset, "config": asdict(preset), "variants": {k: VARIANTS[k] for k in preset.students},
        "steps_per_epoch": spe, "encoders": encoders, "training": training,
        "summary": summary, "paired": comparisons, "chance_macro_f1": chance,
        "budget": student_budget(preset),
        "probe": {"protocol": probe["protocol"],  # the whole results: OUT/probe*/probe_results.json
                  "datasets": {d: {k: probe["datasets"][d][k] for k in ("counts", "grouping", "leakage",
                                                                         "leakage_any_draw", "duplicates")}
                               for d in probe["datasets"]}},
        "seconds": times, "hardware": hardware(), "date_utc": utc_now(),
    }
    md = (f"# Reproduction ({'reduced' if res['reduced'] else 'full'} `{args.preset}` preset)\n\n"
          f"`{res['command']}` — {hardware_line(res['hardware'])}, {res['date_utc']}, "
          f"{times['total'] / 60:.1f} min in all.\n\n"
          f"Macro-F1 on the test split: mean ± std over {preset.split_draws} grouped split draws (each the mean of "
          f"{preset.probe_seeds} probe seeds); ⚠k/n: collapsed probe seeds "
          "(one class for ≥ 80 % of the test set, or a class F1 of 0). Chance (guessing "
          f"with the test set's class frequencies): " + ", ".join(f"{d} {v:.3f}" for d, v in chance.items()) + ".\n\n"
          + table(summary, training) + "\n\nPaired differences on the same split draws (mean ± std; draws won; "
          "✔: the difference exceeds its spread):"
          "\n\n" + paired_table(comparisons) + "\n")
    names = (f"reproduce{suffix}.json", f"reproduce{suffix}.md")
    (out / names[0]).write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out / names[1]).write_text(md)
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        for f in names:
            shutil.copyfile(out / f, args.results / f)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
