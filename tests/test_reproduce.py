"""benchmarks/reproduce.py: the labelled sets it writes (grouped by patient / by video) and its size knobs."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from benchmarks import reproduce
from usjepa.probe.data import load_labelled


def fake_image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((64, 64), value, np.uint8)
    img[16:48, 16:48] = 255 - value
    # texture of its own: the same square at another brightness would be one picture to the duplicate check
    img = cv2.GaussianBlur(img + np.random.default_rng(value).integers(0, 40, img.shape, dtype=np.uint8), (7, 7), 2)
    cv2.imwrite(str(path), img)


def test_ddti_labels_group_by_patient_and_skip_unlabelled(tmp_path):
    src = tmp_path / "ddti"
    rows = []
    for p in range(1, 13):  # 12 patients, two TI-RADS classes, two nodules for some
        label = "3" if p % 2 else "4a"
        fake_image(src / "cropped" / f"{p}_1.png", 10 * p)
        rows.append((f"{p}_1.jpg_{p}(1)", label))
        if p % 3 == 0:
            fake_image(src / "cropped" / f"{p}_2(1).png", 5 * p)
            fake_image(src / "cropped" / f"{p}_2(2).png", 6 * p)
            rows += [(f"{p}_2.jpg_{p}(1)", label), (f"{p}_2.jpg_{p}(2)", label)]
    rows.append(("99_1.jpg_99(1)", ""))  # no category: left out
    with open(src / "diagnosis.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = reproduce.ddti_labelled(src, tmp_path / "labelled")
    written = list(csv.DictReader(open(out / "labels.csv")))
    assert len(written) == 12 + 2 * 4 and {r["label"] for r in written} == {"TI-RADS 3", "TI-RADS 4a"}
    assert {r["group"] for r in written if r["path"].startswith("images/6_")} == {"patient6"}
    data = load_labelled(out)
    by_group: dict[str, set] = {}
    for it in data.items:
        by_group.setdefault(it.group, set()).add(it.split)
    assert all(len(s) == 1 for s in by_group.values())  # a patient never straddles splits


def test_pocus_frames_group_by_video_and_drop_classes_with_few_sources(tmp_path):
    src = tmp_path / "pocus"
    manifest = []
    for k in range(7):
        cls = ["covid", "regular", "viral"][min(k // 3, 2)]  # covid x3, regular x3, viral x1 (left out)
        rel = f"videos/{cls}_{k}.avi"
        (src / "videos").mkdir(parents=True, exist_ok=True)
        w = cv2.VideoWriter(str(src / rel), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64))
        for t in range(9):
            w.write(np.full((64, 64, 3), 20 * k + t, np.uint8))
        w.release()
        manifest.append({"path": rel, "class": cls})
    with open(src / "MANIFEST.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["path", "class"])
        wr.writeheader()
        wr.writerows(manifest)
    fake_image(src / "images" / "covid_still.png", 99)  # a still: left out
    manifest.append({"path": "images/covid_still.png", "class": "covid"})
    with open(src / "MANIFEST.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["path", "class"])
        wr.writeheader()
        wr.writerows(manifest)
    out = reproduce.pocus_labelled(src, tmp_path / "labelled", frames_per_video=4)
    written = list(csv.DictReader(open(out / "labels.csv")))
    assert {r["label"] for r in written} == {"covid", "regular"}
    assert len(written) == 6 * 4 and len({r["group"] for r in written}) == 6
    assert all((out / r["path"]).is_file() for r in written)


def test_size_knobs_and_configs():
    spe = 50
    cfg = reproduce.train_config(reproduce.PRESETS["cpu"], 2, Path("shards"), 120, spe)
    assert cfg["train"]["max_steps"] == 120 and cfg["optim"]["epochs"] == 3 and cfg["optim"]["lr_scale"] == "none"
    # the schedules end at the 120th step, not at the 150 of three whole epochs
    assert cfg["optim"]["schedule_epochs"] == pytest.approx(2.4) and cfg["optim"]["warmup_epochs"] == pytest.approx(0.24)
    assert cfg["model"]["arch"] == "vit_tiny6_patch16_224" and cfg["optim"]["lr_peak"] == 5e-4
    assert cfg["model"]["decoder"]["masking"] == "multiblock"  # SALT's stage 1
    assert set(reproduce.QUICK["students"]) <= set(reproduce.VARIANTS)
    for name, preset in reproduce.PRESETS.items():  # SALT's allocation: each student >= the teacher's images
        assert reproduce.student_budget(preset)["student_to_teacher"] >= 1, name
        assert preset.split_draws >= 10, name
    quick = replace(reproduce.PRESETS["cpu"], **reproduce.QUICK)
    assert reproduce.student_budget(quick)["student_to_teacher"] >= 1
    from usjepa.config import load_config

    written = reproduce.train_config(quick, 1, Path("shards"), quick.stage1_steps, 7)
    with_overrides = [f"{sec}.{k}={json.dumps(v)}" for sec in ("optim",) for k, v in written["optim"].items()]
    assert load_config(None, with_overrides + ["stage=1"]).optim.schedule_epochs == pytest.approx(120 / 7)
    with pytest.raises(SystemExit):
        reproduce.main(["--students", "usrc sideways", "--out", "unused"])


def _probe(per_draw: dict) -> dict:
    """A probe_encoders result over split draws: {encoder: (per-draw linear F1s, draw ids, degenerate)}."""
    return {"results": {"ddti": {enc: {"linear": {"per_draw": v, "draw_ids": ids,
                                                  "macro_f1": {"mean": float(np.mean(v)),
                                                               "std": float(np.std(v, ddof=1))},
                                                  "probe_seed_std": 0.01, "degenerate_seeds": deg,
                                                  "seeds": [{}] * (2 * len(v))},
                                       "feature_dim": 96}
                                 for enc, (v, ids, deg) in per_draw.items()}}}


def test_split_draws_summary_and_paired_differences():
    probe = _probe({"random init": ([0.11, 0.30, 0.20], [0, 1, 2], 0),
                    "stage-1 teacher": ([0.21, 0.25, 0.30], [0, 1, 2], 1),
                    "student": ([0.31, 0.40], [0, 2], 0)})  # draw 1 left out for it
    summary = reproduce.split_summary(probe, ["ddti"])
    teacher = summary["ddti"]["stage-1 teacher"]["linear"]
    assert teacher["per_split"] == pytest.approx([0.21, 0.25, 0.30])
    assert teacher["mean"] == pytest.approx(0.76 / 3)
    assert teacher["std"] == pytest.approx(np.std([0.21, 0.25, 0.30], ddof=1))
    assert teacher["degenerate_seeds"] == 1 and teacher["seeds"] == 6
    assert "feature_dim" not in summary["ddti"]["random init"]  # only classifier entries are summarised
    diff = reproduce.paired(summary, "stage-1 teacher", "random init")["ddti"]["linear"]
    assert diff["mean"] == pytest.approx(np.mean([0.10, -0.05, 0.10])) and (diff["wins"], diff["draws"]) == (2, 3)
    assert not diff["decided"]  # +0.05 ± 0.087: within its spread
    student = reproduce.paired(summary, "student", "stage-1 teacher")["ddti"]["linear"]
    assert (student["draws"], student["wins"]) == (2, 2) and student["mean"] == pytest.approx(0.10)
    assert student["decided"]  # +0.10 ± 0 on the two shared draws
    md = reproduce.table(summary, {"stage-1 teacher": {"loss": 0.9, "loss_oracle_image_mean": 0.95}})
    assert "0.253 ± 0.045 ⚠1/6" in md and "| 0.9000 | 0.9500 | – | – | – |" in md
    pt = reproduce.paired_table({"student − stage-1 teacher": {"ddti": {"linear": student}},
                                 "stage-1 teacher − random init": {"ddti": {"linear": diff}}})
    assert "(2/2) ✔" in pt and "(2/3) |" in pt
