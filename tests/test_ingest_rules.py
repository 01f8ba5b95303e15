"""Ingest rules of issue 12 on real-format files made here: truncated videos per container, the pixel
budget, the *_mask* exclusion, labels (folder | none | regex | csv), patient groups for videos, group counts
and the validation guarantee, merge refusing mismatched parts, contact sheet --sort coverage / --diff."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from usjepa.ingest.cli import EXIT_FAILED, EXIT_OK, EXIT_SKIPPED, main
from usjepa.ingest.readers import SourceUnreadable, open_frames
from usjepa.ingest.sources import MIN_GROUPS_FOR_VAL, DatasetSpec, assign_splits, list_sources, load_dataset_list
from usjepa.shards.format import load_manifest


def _scan_frames(n: int, h: int = 96, w: int = 128, seed: int = 0) -> list[np.ndarray]:
    """A moving smooth texture (compresses like video, not like noise)."""
    rng = np.random.default_rng(seed)
    base = np.clip(cv2.GaussianBlur(rng.integers(0, 255, (h, w)).astype(np.uint8), (0, 0), 2) * 2, 0, 255)
    return [np.roll(base, 3 * i, axis=1).astype(np.uint8) for i in range(n)]


def _write_video(path: Path, fourcc: str, n: int = 40) -> Path:
    frames = _scan_frames(n)
    h, w = frames[0].shape
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 25.0, (w, h))
    assert vw.isOpened(), f"OpenCV cannot write {path.suffix} here"
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR))
    vw.release()
    return path


def _write_gif(path: Path, n: int = 10) -> Path:
    anim = cv2.Animation()
    anim.frames = [cv2.cvtColor(f, cv2.COLOR_GRAY2BGR) for f in _scan_frames(n)]
    anim.durations = [100] * n
    if not cv2.imwriteanimation(str(path), anim):
        pytest.skip("this OpenCV cannot write GIF")
    return path


CONTAINERS = {".avi": "MJPG", ".mp4": "mp4v", ".mov": "mp4v", ".mpeg": "mpg1", ".gif": None}


def _make(path: Path) -> Path:
    fourcc = CONTAINERS[path.suffix]
    if fourcc is None:
        return _write_gif(path)
    return _write_video(path, "PIM1" if path.suffix == ".mpeg" else fourcc)


@pytest.mark.parametrize("ext", list(CONTAINERS))
@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_video_is_skipped_per_container(tmp_path, ext, cut):
    whole = _make(tmp_path / f"whole{ext}")
    n = len(list(open_frames(whole)))
    assert n >= 10  # the complete file reads in full and raises nothing
    data = whole.read_bytes()
    cut_file = tmp_path / f"cut{ext}"
    cut_file.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(SourceUnreadable, match="truncated|cannot open"):
        list(open_frames(cut_file))


def test_truncated_videos_are_reported_in_the_manifest_and_complete_ones_kept(tmp_path):
    root = tmp_path / "clips"
    root.mkdir()
    for ext in CONTAINERS:
        whole = _make(root / f"ok{ext}")
        data = whole.read_bytes()
        (root / f"half{ext}").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert main(["run", str(root), "--out", str(out), "--workers", "1", "--quiet"]) == EXIT_SKIPPED
    m = load_manifest(out)
    assert sorted(s["path"] for s in m["skipped"]) == sorted(f"half{e}" for e in CONTAINERS)
    assert m["datasets"]["clips"]["sources"] == len(CONTAINERS)  # every complete file was ingested


def test_pixel_budget_decodes_jpeg_reduced_and_refuses_other_formats(tmp_path):
    img = cv2.cvtColor(_scan_frames(1, 400, 600)[0], cv2.COLOR_GRAY2BGR)
    cv2.imwrite(str(tmp_path / "big.jpg"), img)
    cv2.imwrite(str(tmp_path / "big.png"), img)
    (_, full), = list(open_frames(tmp_path / "big.jpg"))
    assert full.shape[:2] == (400, 600)
    (_, small), = list(open_frames(tmp_path / "big.jpg", max_pixels=400 * 600 // 4))
    assert small.shape[:2] == (200, 300)  # reduced by 2 while decoding
    (_, smaller), = list(open_frames(tmp_path / "big.jpg", max_pixels=400 * 600 // 5))
    assert smaller.shape[:2] == (100, 150)  # the next factor that fits the budget
    with pytest.raises(SourceUnreadable, match="pixel budget"):
        list(open_frames(tmp_path / "big.png", max_pixels=100_000))
    with pytest.raises(SourceUnreadable, match="pixel budget"):
        list(open_frames(tmp_path / "big.jpg", max_pixels=1000))  # beyond 1/8


def test_pixel_budget_through_the_cli(tmp_path):
    root = tmp_path / "stills"
    root.mkdir()
    cv2.imwrite(str(root / "big.png"), _scan_frames(1, 400, 600)[0])
    cv2.imwrite(str(root / "small.png"), _scan_frames(1, 40, 60)[0])
    out = tmp_path / "out"
    assert main(["run", str(root), "--out", str(out), "--workers", "1", "--quiet", "--max-pixels", "100000"]) == EXIT_SKIPPED
    m = load_manifest(out)
    assert [s["path"] for s in m["skipped"]] == ["big.png"] and "pixel budget" in m["skipped"][0]["reason"]


def test_every_mask_variant_is_excluded_and_listed(tmp_path):
    root = tmp_path / "busi" / "benign"
    root.mkdir(parents=True)
    img = _scan_frames(1, 40, 60)[0]
    for name in ("benign (4).png", "benign (4)_mask.png", "benign (4)_mask_1.png", "benign (4)_mask_2.png",
                 "benign_masked (5).png"):
        cv2.imwrite(str(root / name), img)
    listing = list_sources([DatasetSpec("busi", tmp_path / "busi")])
    assert sorted(s.rel for s in listing.sources) == ["benign/benign (4).png", "benign/benign_masked (5).png"]
    assert listing.excluded["busi"] == 3
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "busi"), "--out", str(out), "--workers", "1", "--quiet"]) == EXIT_OK
    m = load_manifest(out)
    assert m["exclude"] == ["*_mask.*", "*_mask_[0-9]*.*", "mask/", "masks/"] and m["datasets"]["busi"]["excluded_files"] == 3


def _write_list(tmp_path: Path, entry: dict) -> Path:
    p = tmp_path / "datasets.json"
    p.write_text(json.dumps({"datasets": [entry]}))
    return p


def test_labels_regex_and_csv(tmp_path):
    root = tmp_path / "pocus"
    (root / "videos").mkdir(parents=True)
    for name in ("Cov_a.avi", "Pneu_b.avi", "other.avi"):
        _write_video(root / "videos" / name, "MJPG", n=4)
    specs = load_dataset_list(_write_list(tmp_path, {"name": "pocus", "root": "pocus", "labels": r"regex:^(Cov|Pneu)_"}))
    labels = {s.rel: s.label for s in list_sources(specs).sources}
    assert labels == {"videos/Cov_a.avi": "Cov", "videos/Pneu_b.avi": "Pneu", "videos/other.avi": None}
    (tmp_path / "labels.csv").write_text("path,label\nvideos/Cov_a.avi,covid\nvideos/other.avi,healthy\n")
    specs = load_dataset_list(_write_list(tmp_path, {"name": "pocus", "root": "pocus", "labels": "csv:labels.csv"}))
    labels = {s.rel: s.label for s in list_sources(specs).sources}
    assert labels == {"videos/Cov_a.avi": "covid", "videos/Pneu_b.avi": None, "videos/other.avi": "healthy"}
    for bad in ("regex:(", "csv:missing.csv", "folders", "csv:"):
        with pytest.raises(ValueError, match="labels"):
            load_dataset_list(_write_list(tmp_path, {"name": "pocus", "root": "pocus", "labels": bad}))
    (tmp_path / "nolabel.csv").write_text("path,class\nvideos/Cov_a.avi,covid\n")
    specs = load_dataset_list(_write_list(tmp_path, {"name": "pocus", "root": "pocus", "labels": "csv:nolabel.csv"}))
    with pytest.raises(ValueError, match="missing column"):
        list_sources(specs)


def test_group_pattern_groups_videos_and_the_manifest_counts_groups(tmp_path):
    root = tmp_path / "clips"
    root.mkdir()
    for p in range(3):
        for c in range(2):
            _write_video(root / f"pat{p}_clip{c}.avi", "MJPG", n=3)
    specs = load_dataset_list(_write_list(tmp_path, {"name": "clips", "root": "clips", "group_pattern": r"^(pat\d+)_"}))
    listing = list_sources(specs)
    assert {s.group for s in listing.sources} == {"clips:pat0", "clips:pat1", "clips:pat2"}
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "datasets.json"), "--out", str(out), "--workers", "1", "--quiet"]) == EXIT_OK
    m = load_manifest(out)
    g = m["datasets"]["clips"]["groups"]
    assert g["train"] + g["val"] == 3
    # a patient's clips share a split: every sample of one group is in one split
    from usjepa.shards.format import iter_tar_samples

    split_of = {}
    for s in m["shards"]:
        for _, sample in iter_tar_samples(s["abs_path"]):
            meta = json.loads(sample["json"])
            assert split_of.setdefault(meta["group"], meta["split"]) == meta["split"]


def test_a_dataset_with_20_groups_validates_on_at_least_one(tmp_path):
    # find group names that all hash into train, then check one of them is moved to val
    from usjepa.shards.format import split_of_group

    names = [f"p{i}" for i in range(400) if split_of_group(f"ds:p{i}") == "train"][:MIN_GROUPS_FOR_VAL]
    root = tmp_path / "ds"
    root.mkdir()
    for k, name in enumerate(names):  # distinct images: copies of one image would share one split
        cv2.imwrite(str(root / f"{name}.png"), _scan_frames(1, 32, 32, seed=k)[0])
    listing = assign_splits(list_sources([DatasetSpec("ds", root, group_pattern=r"^(p\d+)")]))
    assert sum(s.split == "val" for s in listing.sources) == 1
    fewer = assign_splits(list_sources([DatasetSpec("ds", root, group_pattern=r"^(p\d+)", exclude=("p1*",))]))
    if len({s.group for s in fewer.sources}) < MIN_GROUPS_FOR_VAL:
        assert all(s.split == "train" for s in fewer.sources)  # below 20 groups the hash rule alone decides


def test_merge_refuses_parts_with_different_sources_or_settings(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root, n in ((a, 4), (b, 5)):
        root.mkdir()
        for i in range(n):
            cv2.imwrite(str(root / f"img{i}.png"), _scan_frames(1, 32, 32, seed=i)[0])
    same = tmp_path / "same"
    for i in (0, 1):
        assert main(["run", str(a), "--out", str(same), "--part", f"{i}/2", "--workers", "1", "--quiet"]) == EXIT_OK
    assert main(["merge", str(same)]) == EXIT_OK
    # part 1 made from another folder under the same dataset name: a different source list
    mixed = tmp_path / "mixed"
    for name, folder in (("la.json", "a"), ("lb.json", "b")):
        (tmp_path / name).write_text(json.dumps({"datasets": [{"name": "ds", "root": folder}]}))
    assert main(["run", str(tmp_path / "la.json"), "--out", str(mixed), "--part", "0/2", "--workers", "1", "--quiet"]) == EXIT_OK
    assert main(["run", str(tmp_path / "lb.json"), "--out", str(mixed), "--part", "1/2", "--workers", "1", "--quiet"]) == EXIT_OK
    assert main(["merge", str(mixed)]) == EXIT_FAILED
    # same sources, another setting
    other = tmp_path / "other"
    assert main(["run", str(a), "--out", str(other), "--part", "0/2", "--workers", "1", "--quiet"]) == EXIT_OK
    assert main(["run", str(a), "--out", str(other), "--part", "1/2", "--workers", "1", "--quiet", "--stride", "2"]) == EXIT_OK
    assert main(["merge", str(other)]) == EXIT_FAILED


def test_contact_sheet_sort_coverage_and_diff(tmp_path, monkeypatch):
    from usjepa.ingest import contact_sheet, pipeline

    root = tmp_path / "imgs"
    root.mkdir()
    for i, frac in enumerate((1.0, 0.5, 0.25)):  # scan regions covering all, half and a quarter of the frame
        img = np.zeros((64, 64), np.uint8)
        img[:, : int(64 * frac)] = _scan_frames(1, 64, int(64 * frac), seed=i)[0]
        cv2.imwrite(str(root / f"f{i}.png"), img)
    new = tmp_path / "new"
    assert main(["run", str(root), "--out", str(new), "--workers", "1", "--quiet"]) == EXIT_OK
    captions = []
    real_tile = contact_sheet._tile
    monkeypatch.setattr(contact_sheet, "_tile", lambda img, mask, cell, caption, old_mask=None:
                        captions.append((caption, old_mask is not None)) or real_tile(img, mask, cell, caption, old_mask))
    assert main(["contact-sheet", str(new), "--out", str(tmp_path / "cov.png"), "--sort", "coverage"]) == EXIT_OK
    assert [c.split("#")[0].split()[-1] for c, _ in captions] == ["f2.png", "f1.png", "f0.png"]  # worst coverage first
    # an "old" corpus whose mask was the whole frame: the biggest change (f2) comes first, old outline drawn
    old = tmp_path / "old"
    monkeypatch.setattr(pipeline, "compute_usrc_mask", lambda frames, cfg: np.ones(frames.shape[1:], bool))
    assert main(["run", str(root), "--out", str(old), "--workers", "1", "--quiet"]) == EXIT_OK
    captions.clear()
    assert main(["contact-sheet", str(new), "--out", str(tmp_path / "diff.png"), "--diff", str(old)]) == EXIT_OK
    assert [c.split("#")[0].split()[-1] for c, _ in captions] == ["f2.png", "f1.png", "f0.png"] and all(o for _, o in captions)
    assert cv2.imread(str(tmp_path / "diff.png")) is not None
