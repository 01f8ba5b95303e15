"""usjepa-probe on every labelled input it reads, made here as real files: class folders of videos and
volumes (K frames each), file-name labels, CSV frames, labelled shards written by usjepa-ingest,
UltraBench's processed layout, symlinks, and bad input (skipped and counted, exit 3; clear errors, exit 2)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from usjepa.exit_codes import SKIPPED, USAGE
from usjepa.probe.cli import main as probe_main
from usjepa.probe.data import LabelledDataError, TooFewSamplesError, load_labelled
from usjepa.probe.run import probe_encoders

ARCH = "vit_test_tiny"
QUICK = {"max_epochs": 10, "patience": 3}
CLASSES = ("lesion", "layers", "plain")


def scan(cls: str, rng: np.random.Generator, h: int = 96, w: int = 128) -> np.ndarray:
    """A fan-shaped gray scan with speckle; 'lesion' has a dark disc, 'layers' bright bands."""
    yy, xx = np.mgrid[:h, :w]
    ang = np.degrees(np.arctan2(xx - w / 2, yy + 10))
    r = np.hypot(xx - w / 2, yy + 10)
    fan = (np.abs(ang) < 35) & (r > 16) & (r < h + 5)
    img = rng.gamma(2.0, 40.0, size=(h, w)).clip(0, 255)
    if cls == "lesion":
        cv2.circle(img, (int(rng.integers(50, 80)), int(rng.integers(40, 70))), 12, 15.0, -1)
    elif cls == "layers":
        for y0 in rng.integers(30, 85, size=3):
            img[y0:y0 + 4] = 235.0
    return np.where(fan, img, 0).astype(np.uint8)


def write_video(path: Path, cls: str, n_frames: int, rng) -> Path:
    frames = [cv2.cvtColor(scan(cls, rng), cv2.COLOR_GRAY2BGR) for _ in range(n_frames)]
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(f)
    writer.release()
    return path


def write_volume(path: Path, cls: str, n_slices: int, rng) -> Path:
    import nibabel as nib

    vol = np.stack([scan(cls, rng) for _ in range(n_slices)], axis=-1)
    nib.save(nib.Nifti1Image(vol, affine=np.eye(4)), str(path))
    return path


def write_stills(root: Path, per_class: int, rng, prefix: bool = False) -> Path:
    for cls in CLASSES:
        d = root if prefix else root / cls
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            cv2.imwrite(str(d / f"{cls}_{k}.png"), scan(cls, rng))
    return root


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """3 classes x (3 videos of 7 frames + 1 volume of 5 slices), in class folders."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    for cls in CLASSES:
        (root / cls).mkdir()
        for k in range(3):
            write_video(root / cls / f"{cls}_clip{k}.avi", cls, 7, rng)
        write_volume(root / cls / f"{cls}_vol.nii.gz", cls, 5, rng)
    return root


def test_videos_and_volumes_in_class_folders_give_k_evenly_spaced_frames(clips, tmp_path):
    data = load_labelled(clips, frames_per_video=4)
    assert len(data.items) == 12 and {it.kind for it in data.items} == {"video", "volume"}
    assert data.leakage["sources_in_two_splits"] == 0 and data.leakage["groups_in_two_splits"] == 0
    res = probe_encoders({"r": f"random:{ARCH}"}, clips, tmp_path / "out", seeds=2, probe=QUICK, device="cpu",
                         frames_per_video=4, plots=False)
    r = res["results"]["clips0"]["r"] if "clips0" in res["results"] else next(iter(res["results"].values()))["r"]
    frames = r["frames"]
    assert sum(sum(c.values()) for c in frames.values()) == 12 * 4  # 7-frame videos and 5-slice volumes: 4 each
    assert r["skipped"] == [] and res["skipped_frames"] == 0
    again = probe_encoders({"r": f"random:{ARCH}"}, clips, tmp_path / "out", seeds=2, probe=QUICK, device="cpu",
                           frames_per_video=2, plots=False)
    r2 = next(iter(again["results"].values()))["r"]
    assert not r2["features_from_cache"]  # frames per video is part of the cache key
    assert sum(sum(c.values()) for c in r2["frames"].values()) == 12 * 2


def test_frames_follow_ingest_preprocessing(clips):
    """A video frame as the probe sees it is exactly ingest's frame (same functions, same USrc mask)."""
    from usjepa.ingest.preprocess import PreprocessConfig, compute_usrc_mask, finish_frame, prepare_frame
    from usjepa.ingest.readers import open_frames
    from usjepa.probe.features import frames_of_item

    cfg = PreprocessConfig()
    item = next(it for it in load_labelled(clips).items if it.kind == "video")
    got = frames_of_item(item, cfg, frames_per_video=3)
    prepared = [(i, *prepare_frame(f, cfg)) for i, f in open_frames(item.path)]
    mask = compute_usrc_mask(np.stack([g for _, g, _ in prepared]), cfg)
    want = {i: finish_frame(g, c, mask, cfg) for i, g, c in prepared}
    assert [i for i, _, _ in got.frames] == [0, 3, 6]
    for i, gray, m in got.frames:
        assert np.array_equal(gray, want[i]) and np.array_equal(m, mask)


def test_labels_from_file_name_pattern_and_video_groups(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "pocus_like"
    (root / "videos").mkdir(parents=True)
    for cls, prefix in zip(CLASSES, ("Cov", "Pneu", "Reg")):
        for k in range(3):
            write_video(root / "videos" / f"{prefix}_case{k}.avi", cls, 5, rng)
    write_video(root / "videos" / "Vir_only_one.avi", "plain", 5, rng)  # not matched: left out
    data = load_labelled(root, label_pattern=r"^(Cov|Pneu|Reg)", frames_per_video=3)
    assert data.classes == ["Cov", "Pneu", "Reg"] and len(data.items) == 9
    with pytest.raises(TooFewSamplesError, match="'Vir'"):  # a class with one video cannot be split
        load_labelled(root, label_pattern=r"^(Cov|Pneu|Reg|Vir)")
    with pytest.raises(LabelledDataError, match="not a valid regular expression"):
        load_labelled(root, label_pattern=r"^(Cov")


def test_csv_frames_of_one_video_never_straddle_splits(clips, tmp_path):
    import csv

    rows = [{"path": it.rel, "label": it.label, "frame": f} for it in load_labelled(clips).items for f in (0, 2)]
    with open(clips / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "frame"])
        w.writeheader()
        w.writerows(rows)
    try:
        data = load_labelled(clips)
        assert len(data.items) == 12 and all(it.frames == (0, 2) for it in data.items)  # rows of a file merged
        assert data.leakage["sources_in_two_splits"] == 0
        # a CSV that puts frames of one video into two splits is refused, naming the source
        bad = [dict(r, split="train") for r in rows]
        bad[1]["split"] = "test"
        with open(clips / "labels.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["path", "label", "frame", "split"])
            w.writeheader()
            w.writerows(bad)
        with pytest.raises(LabelledDataError, match="must all be in one split"):
            load_labelled(clips)
    finally:
        (clips / "labels.csv").unlink()


def test_labelled_shards_from_ingest(tmp_path):
    from usjepa.ingest.cli import main as ingest_main

    rng = np.random.default_rng(2)
    raw = tmp_path / "labelled"
    write_stills(raw, 4, rng)
    for cls in CLASSES:
        write_video(raw / cls / f"{cls}_clip.avi", cls, 6, rng)
    assert ingest_main([str(raw), "--out", str(tmp_path / "shards")]) in (0, 3)
    data = load_labelled(tmp_path / "shards", frames_per_video=3)
    assert data.classes == list(sorted(CLASSES)) and {it.kind for it in data.items} == {"shard"}
    clips = [it for it in data.items if it.rel.endswith(".avi")]
    assert len(clips) == 3 and all(len(it.shard_frames) == 3 for it in clips)
    assert data.leakage["sources_in_two_splits"] == 0
    res = probe_encoders({"r": f"random:{ARCH}"}, {"shards": tmp_path / "shards"}, tmp_path / "out", seeds=1,
                         probe=QUICK, device="cpu", frames_per_video=3, plots=False)
    assert sum(sum(c.values()) for c in res["results"]["shards"]["r"]["frames"].values()) == 12 + 3 * 3
    # two datasets in one manifest: the same folder name is two classes, named by dataset
    other = write_stills(tmp_path / "other", 3, rng)
    assert ingest_main([str(raw), str(other), "--out", str(tmp_path / "two")]) in (0, 3)
    two = load_labelled(tmp_path / "two", frames_per_video=3)
    assert set(two.classes) == {f"{d}/{c}" for d in ("labelled", "other") for c in CLASSES}


def test_ultrabench_layout_keeps_test_and_carves_val_by_source(tmp_path):
    """``ultrabench <task> RAW OUT`` writes OUT/<task>_v<version>/{train_val,test}.json with records
    {source, image, scan_mask, pathology, label}."""
    rng = np.random.default_rng(3)
    task = tmp_path / "ub" / "pocus_v1.0.0"
    (task / "images").mkdir(parents=True)
    (task / "masks" / "scan").mkdir(parents=True)
    train_val, test = [], []
    for label, cls in enumerate(CLASSES):
        for v in range(5):
            for k in range(2):
                stem = f"{cls}_video{v}_{k}"
                img = scan(cls, rng)
                cv2.imwrite(str(task / "images" / f"{stem}.png"), cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
                cv2.imwrite(str(task / "masks" / "scan" / f"{stem}.png"), (img > 0).astype(np.uint8))
                rec = {"source": f"{cls}_video{v}.mp4", "image": f"images/{stem}.png",
                       "scan_mask": f"masks/scan/{stem}.png", "pathology": cls, "label": label}
                (test if v == 4 else train_val).append(rec)
    (task / "train_val.json").write_text(json.dumps(train_val))
    (task / "test.json").write_text(json.dumps(test))
    data = load_labelled(tmp_path / "ub")  # the OUT folder: its one <task>_v<version>/ is found
    assert data.classes == ["0:lesion", "1:layers", "2:plain"]
    tests = {it.rel for it in data.items if it.split == "test"}
    assert tests == {r["image"] for r in test}  # UltraBench's test split is kept
    assert data.leakage["sources_in_two_splits"] == 0 and data.leakage["sources"] == 15
    assert all(it.scan_mask is not None for it in data.items)
    res = probe_encoders({"r": f"random:{ARCH}"}, {"ub": tmp_path / "ub"}, tmp_path / "out", seeds=1,
                         probe=QUICK, device="cpu", plots=False)
    assert res["skipped_frames"] == 0


def test_symlinked_folders_and_files_work(tmp_path):
    rng = np.random.default_rng(4)
    real = write_stills(tmp_path / "real", 4, rng)
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(real / "lesion", data / "lesion")  # a symlinked class folder
    (data / "layers").mkdir()
    for p in (real / "layers").iterdir():
        os.symlink(p, data / "layers" / p.name)  # symlinked files
    shutil.copytree(real / "plain", data / "plain")
    ds = load_labelled(data)
    assert len(ds.items) == 12 and all(str(it.path).startswith(str(data)) for it in ds.items)
    res = probe_encoders({"r": f"random:{ARCH}"}, data, tmp_path / "out", seeds=1, probe=QUICK, device="cpu",
                         plots=False)
    assert res["skipped_frames"] == 0


def test_bad_frames_are_skipped_and_counted_and_exit_3(tmp_path, capsys):
    rng = np.random.default_rng(5)
    data = write_stills(tmp_path / "data", 8, rng)
    cv2.imwrite(str(data / "plain" / "black.png"), np.full((96, 128), 2, np.uint8))  # near-black frame
    (data / "lesion" / "empty.png").write_bytes(b"")  # unreadable
    (data / "layers" / "garbage.jpg").write_bytes(b"not a jpeg at all")
    rc = probe_main(["--data", str(data), "--encoder", f"random:{ARCH}", "--out", str(tmp_path / "o"),
                     "--seeds", "1", "--max-epochs", "5", "-q", "--device", "cpu", "--no-plots"])
    assert rc == SKIPPED
    res = json.loads((tmp_path / "o" / "probe_results.json").read_text())
    skipped = {s["path"]: s["reason"] for s in res["datasets"]["data"]["skipped"]}
    assert set(skipped) == {"plain/black.png", "lesion/empty.png", "layers/garbage.jpg"}
    assert "black" in skipped["plain/black.png"]
    md = (tmp_path / "o" / "probe_table.md").read_text()
    assert "Skipped: 3 frame(s)/file(s)" in md and "plain/black.png" in md
    assert "3 file(s)/frame(s) skipped" in capsys.readouterr().err


def test_clear_errors_exit_2_in_one_line(tmp_path, capsys):
    import torch

    from usjepa.models.loading import export_encoder_safetensors
    from usjepa.models.vit import build_vit

    rng = np.random.default_rng(6)
    data = write_stills(tmp_path / "data", 4, rng)
    common = ["--out", str(tmp_path / "o"), "--seeds", "1", "-q", "--device", "cpu", "--no-plots"]
    # an encoder file of the wrong shape for the architecture asked
    torch.manual_seed(0)
    wrong = export_encoder_safetensors(build_vit("vit_test_tiny"), tmp_path / "tiny.safetensors")
    assert probe_main(["--data", str(data), "--encoder", str(wrong), "--arch", "vit_test_small"] + common) == USAGE
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("usjepa-probe: error: cannot load encoder")
    assert "Traceback" not in err
    # one class only
    one = tmp_path / "one"
    shutil.copytree(data / "plain", one / "plain")
    assert probe_main(["--data", str(one), "--encoder", f"random:{ARCH}"] + common) == USAGE
    assert "at least two classes" in capsys.readouterr().err
    # a class too small to split: named
    small = tmp_path / "small"
    shutil.copytree(data, small)
    for p in sorted((small / "lesion").iterdir())[1:]:
        p.unlink()
    assert probe_main(["--data", str(small), "--encoder", f"random:{ARCH}"] + common) == USAGE
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("usjepa-probe: error:")]
    assert len(errors) == 1 and "class 'lesion'" in errors[0] and "Traceback" not in err
