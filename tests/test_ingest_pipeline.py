"""usjepa-ingest end to end on real files: bad input, manifest, verify, parts + merge, workers, shuffle."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from usjepa.ingest.cli import EXIT_FAILED, EXIT_OK, EXIT_SKIPPED, build_parser, main
from usjepa.ingest.readers import open_frames
from usjepa.ingest.synthetic import make_synthetic_corpus
from usjepa.ingest.verify import verify_corpus
from usjepa.shards.corruptions import masked_median
from usjepa.shards.format import SampleMeta, iter_tar_samples, load_manifest

BAD = {  # file (inside syn_lung/alines) -> words its manifest reason must contain
    "zero.png": "0 bytes",
    "truncated.mp4": "cannot open",
    "not_an_image.jpg": "not a decodable",
    "black.avi": "no usable frame",
    "folder.png": "not a regular file",
    "dangling.png": "broken symbolic link",
}
GOOD_ODD_NAME = "scan (copy 1).v2 final.png"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The tiny synthetic corpus plus one file of each kind of bad input and a good file with an odd name."""
    root = tmp_path_factory.mktemp("raw")
    yaml_path = make_synthetic_corpus(root, preset="tiny", seed=0)
    lung = root / "syn_lung" / "alines"
    mp4 = next((root / "syn_lung").rglob("*.mp4"))
    data = mp4.read_bytes()
    (lung / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (lung / "zero.png").write_bytes(b"")
    (lung / "not_an_image.jpg").write_text("<html>not a jpeg</html>\n")
    (lung / "folder.png").mkdir()
    (lung / "dangling.png").symlink_to(lung / "gone.png")
    vw = cv2.VideoWriter(str(lung / "black.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (160, 120))
    rng = np.random.default_rng(1)
    for _ in range(5):  # "black" with a little sensor noise, so that no frame is an exact duplicate
        vw.write(rng.integers(0, 3, (120, 160, 3), dtype=np.uint8))
    vw.release()
    still = next((root / "syn_breast").rglob("*.png"))
    shutil.copy(still, root / "syn_breast" / "cyst" / GOOD_ODD_NAME)
    return yaml_path


def _samples(root: Path) -> dict[str, tuple[str, str, SampleMeta]]:
    """key -> (sha1 of JPEG, sha1 of PNG, metadata) over every shard of a corpus."""
    out = {}
    for s in load_manifest(root)["shards"]:
        for key, m in iter_tar_samples(s["abs_path"]):
            assert key not in out, f"{key} twice"
            out[key] = (hashlib.sha1(m["jpg"]).hexdigest(), hashlib.sha1(m["mask.png"]).hexdigest(),
                        SampleMeta.from_json(m["json"]))
    return out


def _expected_frames(yaml_path: Path) -> set[tuple[str, int]]:
    """(dataset/source, frame) of every good frame, read independently of the pipeline."""
    root = yaml_path.parent
    want = set()
    for ds in ("syn_breast", "syn_lung", "syn_liver"):
        for p in sorted((root / ds).rglob("*")):
            rel = p.relative_to(root / ds).as_posix()
            if p.name in BAD or p.is_dir() or p.is_symlink():
                continue
            want |= {(f"{ds}/{rel}", i) for i, _ in open_frames(p)}
    return want


@pytest.fixture(scope="module")
def ingested(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    rc = main([str(corpus), "--out", str(out), "--workers", "1", "--shard-size", "40KB", "--quiet"])
    return rc, out


def test_bad_input_is_skipped_and_reported(corpus, ingested, capsys):
    rc, out = ingested
    assert rc == EXIT_SKIPPED
    m = json.loads((out / "manifest.json").read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in m["skipped"]}
    assert set(reasons) == set(BAD)
    for name, words in BAD.items():
        assert words in reasons[name], (name, reasons[name])
    assert m["datasets"]["syn_lung"]["skipped"] == len(BAD)
    got = {(f"{meta.dataset}/{meta.source}", meta.frame) for _, _, meta in _samples(out).values()}
    assert got == _expected_frames(corpus)  # every good frame, exactly once, nothing from the bad files
    assert ("syn_breast/cyst/" + GOOD_ODD_NAME, 0) in got
    d = m["datasets"]["syn_lung"]
    assert d["frames"]["train"] + d["frames"]["val"] == (d["decoded_frames"] - d["duplicate_frames_dropped"]
                                                          - sum(d["rejected_frames"].values()))
    assert d["decoded_frames_in_skipped_files"] == 5  # the all-black video's frames, all rejected


def test_manifest_shards_are_homogeneous_and_verify(ingested):
    _, out = ingested
    m = load_manifest(out)
    assert m["format_version"] == 1 and m["split"]["rule"] == "sha1(group)"
    assert len(m["shards"]) > 3  # small --shard-size: several shards per dataset
    for s in m["shards"]:
        assert s["path"].startswith(s["dataset"] + "-" + s["split"] + "-")
        metas = [SampleMeta.from_json(mm["json"]) for _, mm in iter_tar_samples(s["abs_path"])]
        assert {x.dataset for x in metas} == {s["dataset"]} and {x.split for x in metas} == {s["split"]}
    assert verify_corpus(out) == []
    assert main(["verify", str(out)]) == EXIT_OK


def test_each_sample_stores_its_masked_median(ingested):
    """The contrast augmentation's centre μ is measured once, at ingest, on the frame inside its USrc mask."""
    _, out = ingested
    for s in load_manifest(out)["shards"][:3]:
        for _, m in iter_tar_samples(s["abs_path"]):
            img = cv2.imdecode(np.frombuffer(m["jpg"], np.uint8), cv2.IMREAD_GRAYSCALE)
            mask = cv2.imdecode(np.frombuffer(m["mask.png"], np.uint8), cv2.IMREAD_GRAYSCALE) > 0
            median = SampleMeta.from_json(m["json"]).median
            assert median is not None and abs(median - masked_median(img, mask)) <= 2.0  # JPEG: a level or two


def test_verify_catches_tampering(ingested, tmp_path):
    _, out = ingested
    bad = tmp_path / "copy"
    shutil.copytree(out, bad)
    m = load_manifest(bad)
    tar = Path(m["shards"][0]["abs_path"])
    raw = bytearray(tar.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    tar.write_bytes(bytes(raw))
    idx = Path(m["shards"][1]["abs_index"])
    idx.write_text("\n".join(idx.read_text().splitlines()[:-1]) + "\n")  # drop a sample line
    problems = verify_corpus(bad)
    assert any("sha256" in p for p in problems) and any(m["shards"][1]["path"] in p for p in problems)
    assert main(["verify", str(bad)]) == EXIT_FAILED


def test_shuffled_within_dataset_and_deterministic(corpus, ingested, tmp_path):
    _, out = ingested
    order = []
    for s in load_manifest(out)["shards"]:
        if s["dataset"] == "syn_lung" and s["split"] == "train":
            order += [(SampleMeta.from_json(m["json"]).source, SampleMeta.from_json(m["json"]).frame)
                      for _, m in iter_tar_samples(s["abs_path"])]
    assert order != sorted(order)  # frames of a clip are spread, not in file order
    out2 = tmp_path / "seed1"
    assert main([str(corpus), "--out", str(out2), "--workers", "1", "--shard-size", "40KB", "--seed", "1",
                 "--quiet"]) == EXIT_SKIPPED
    a, b = _samples(out), _samples(out2)
    assert a == b  # same samples, byte for byte
    sha = lambda root: [s["sha256"] for s in load_manifest(root)["shards"]]  # noqa: E731
    assert sha(out) != sha(out2)  # in another order


def test_parts_and_merge_equal_one_run_and_two_workers(corpus, ingested, tmp_path):
    _, out = ingested
    parts = tmp_path / "parts"
    for i in range(2):
        if i == 1:  # part 0 still writing in the shared folder: part 1 must not clean up its temporary files
            (parts / "syn_lung-train-000004.tar.tmp").write_bytes(b"part 0 at work")
        rc = main(["run", str(corpus), "--out", str(parts), "--part", f"{i}/2", "--workers", "1",
                   "--shard-size", "40KB", "--quiet"])
        assert rc in (EXIT_OK, EXIT_SKIPPED)
    (parts / "syn_lung-train-000004.tar.tmp").unlink()
    assert not (parts / "manifest.json").exists()
    assert main(["merge", str(parts)]) == EXIT_OK
    merged = json.loads((parts / "manifest.json").read_text())
    assert verify_corpus(parts) == []
    assert _samples(parts) == _samples(out)
    assert len(merged["skipped"]) == len(BAD)
    one = json.loads((out / "manifest.json").read_text())
    for name, d in one["datasets"].items():
        assert merged["datasets"][name]["frames"] == d["frames"]
    # a part missing: merge refuses
    (parts / "manifest.json").unlink()
    (parts / "manifest.part-1-of-2.json").rename(tmp_path / "elsewhere.json")
    assert main(["merge", str(parts)]) == EXIT_FAILED
    # two spawned workers (main() called in-process) write byte-identical shards to one in-process worker
    two = tmp_path / "two"
    assert main([str(corpus), "--out", str(two), "--workers", "2", "--shard-size", "40KB", "--quiet"]) == EXIT_SKIPPED
    assert [(s["path"], s["sha256"]) for s in load_manifest(two)["shards"]] == \
           [(s["path"], s["sha256"]) for s in load_manifest(out)["shards"]]


def test_rerun_is_idempotent_and_refuses_other_options(corpus, ingested, capsys):
    _, out = ingested
    before = (out / "manifest.json").read_bytes()
    assert main([str(corpus), "--out", str(out), "--workers", "1", "--shard-size", "40KB", "--quiet"]) == EXIT_SKIPPED
    assert "already complete" in capsys.readouterr().out
    assert (out / "manifest.json").read_bytes() == before
    assert main([str(corpus), "--out", str(out), "--quality", "80", "--quiet"]) == EXIT_FAILED
    assert "other inputs or options" in capsys.readouterr().err


def test_contact_sheet(ingested, tmp_path):
    _, out = ingested
    png = tmp_path / "sheet.png"
    assert main(["contact-sheet", str(out), "--out", str(png), "-n", "6", "--cols", "3", "--cell", "96"]) == EXIT_OK
    img = cv2.imread(str(png))
    assert img.shape == (2 * (96 + 14), 3 * 96, 3)
    green = (img[:, :, 1] == 255) & (img[:, :, 0] == 0) & (img[:, :, 2] == 0)
    assert green.sum() > 50  # the mask outlines are drawn


def test_every_option_is_explained(capsys):
    ap = build_parser()
    sub = next(a for a in ap._actions if a.dest == "command")
    assert set(sub.choices) == {"run", "merge", "index", "verify", "contact-sheet"}
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help and len(action.help) > 10, (name, action.dest)
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for opt in ("--workers", "--part", "--stride", "--shard-size", "--max-side", "--quality", "--seed", "--exclude"):
        assert opt in text
    assert "exit status" in text


def test_one_mask_per_clip_or_per_chunk(tmp_path, monkeypatch):
    from usjepa.ingest import pipeline
    from usjepa.ingest.preprocess import PreprocessConfig
    from usjepa.ingest.sources import Source

    rng = np.random.default_rng(0)
    path = tmp_path / "clip.avi"
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (96, 64))
    for _ in range(10):
        f = np.zeros((64, 96, 3), np.uint8)
        f[8:56, 16:80] = rng.integers(40, 255, (48, 64, 1), dtype=np.uint8)
        vw.write(f)
    vw.release()
    calls = []
    real = pipeline.compute_usrc_mask
    monkeypatch.setattr(pipeline, "compute_usrc_mask", lambda frames, cfg: calls.append(len(frames)) or real(frames, cfg))
    src = Source("d", "clip.avi", path, "video", "d:clip.avi", None)
    out = list(pipeline._frames_of_source(src, PreprocessConfig(), 1, pipeline._SourceStats()))
    assert [i for i, *_ in out] == list(range(10)) and calls == [10]  # one mask from all frames of the clip
    calls.clear()
    monkeypatch.setattr(pipeline, "MASK_CHUNK_FRAMES", 4)
    out = list(pipeline._frames_of_source(src, PreprocessConfig(), 1, pipeline._SourceStats()))
    assert len(out) == 10 and calls == [4, 4, 2]


def test_source_failing_midway_leaves_nothing_in_the_spill(tmp_path, monkeypatch):
    from usjepa.ingest import pipeline
    from usjepa.ingest.preprocess import PreprocessConfig
    from usjepa.ingest.sources import Source

    rng = np.random.default_rng(0)
    clip, still = tmp_path / "clip.avi", tmp_path / "still.png"
    vw = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (96, 64))
    for _ in range(6):
        vw.write(rng.integers(40, 255, (64, 96, 3), dtype=np.uint8))
    vw.release()
    cv2.imwrite(str(still), rng.integers(40, 255, (64, 96), dtype=np.uint8))
    real, calls = pipeline.encode_sample, []

    def encode_failing_on_third(gray, mask, cfg):  # fault injection: the codec fails midway through the clip
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk hiccup")
        return real(gray, mask, cfg)

    monkeypatch.setattr(pipeline, "encode_sample", encode_failing_on_third)
    task = pipeline.Task("d-t", "d", "lung", (Source("d", "clip.avi", clip, "video", "d:clip", None),
                                               Source("d", "still.png", still, "still", "d:still", None)))
    s = pipeline.process_task(task, PreprocessConfig(), 1, 0.05, tmp_path / "work")
    assert [k["reason"] for k in s["skipped"]] == ["RuntimeError: disk hiccup"]
    rows = json.loads((tmp_path / "work" / "tasks" / "d-t" / "summary.json").read_text())["samples"]
    assert len(rows) == 1 and rows[0][2] == 0  # only the still, at the start of the spill
    spill = (tmp_path / "work" / "tasks" / "d-t" / "spill.bin").read_bytes()
    assert len(spill) == sum(rows[0][3:])
    assert s["totals"]["decoded_in_skipped"] >= 3 and s["totals"]["decoded"] == 1
