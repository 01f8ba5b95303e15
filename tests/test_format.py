"""The shard format: writer-made DALI index, atomic shards, safe paths, metadata round trip."""

import json
import os
import shutil
import subprocess

import cv2
import numpy as np
import pytest
import webdataset as wds

from usjepa.shards import format as F


def _write_shard(root, n=4, dataset="ds one", split="train"):
    rng = np.random.default_rng(0)
    meta = F.SampleMeta(dataset, "lung", "dir with space/clip (1).mp4", 0, "clip", (60, 80), split, "A")
    with F.ShardWriter(root, dataset, split, 0) as w:
        for i in range(n):
            img = rng.integers(0, 255, (60, 80), dtype=np.uint8)
            jpg = cv2.imencode(".jpg", img)[1].tobytes()
            png = cv2.imencode(".png", (img > 100).astype(np.uint8) * 255, [cv2.IMWRITE_PNG_BILEVEL, 1])[1].tobytes()
            w.write(F.sample_key(dataset, meta.source, i), jpg, png, meta)
    return root / F.shard_name(dataset, split, 0)


def test_index_matches_dali_wds2idx_and_offsets_read_members(tmp_path):
    tar = _write_shard(tmp_path)
    idx_path = F.index_path_for(tar)
    if shutil.which("wds2idx"):
        subprocess.run(["wds2idx", str(tar), str(tmp_path / "ref.idx")], check=True, capture_output=True)
        assert (tmp_path / "ref.idx").read_text() == idx_path.read_text()
    idx = F.read_index(idx_path, os.path.getsize(tar))
    streamed = dict(F.iter_tar_samples(tar))
    assert list(streamed) == idx.keys
    with open(tar, "rb") as f:
        for i, key in enumerate(idx.keys):
            for ext in F.SAMPLE_EXTS:
                assert F.read_member(f, idx.offsets[ext][i], idx.sizes[ext][i]) == streamed[key][ext]
    keys = [s["__key__"] for s in wds.WebDataset(str(tar), shardshuffle=False)]
    assert keys == idx.keys
    assert F.SampleMeta.from_json(streamed[idx.keys[0]]["json"]).source == "dir with space/clip (1).mp4"


def test_identical_input_gives_byte_identical_shards_of_plain_ustar_members(tmp_path):
    import tarfile

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, second = _write_shard(tmp_path / "a"), _write_shard(tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    assert F.index_path_for(first).read_bytes() == F.index_path_for(second).read_bytes()
    with tarfile.open(first) as tf:
        members = tf.getmembers()
    # fixed metadata (no PAX header for a float mtime): each member's data starts 512 bytes after its header
    assert {(m.mtime, m.mode, m.uname, m.gname, m.offset_data - m.offset) for m in members} == {
        (0, 0o444, "usjepa", "usjepa", 512)}
    assert [m.name.split(".", 1)[1] for m in members[:3]] == sorted(F.SAMPLE_EXTS)  # webdataset's member order


def test_truncated_tar_is_caught_by_index_and_stream(tmp_path):
    tar = _write_shard(tmp_path)
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    with pytest.raises(F.ShardFormatError, match="past the tar"):
        F.read_index(F.index_path_for(tar), os.path.getsize(tar))
    with pytest.raises(F.ShardFormatError):
        list(F.iter_tar_samples(tar))


def test_failed_writer_leaves_no_final_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with F.ShardWriter(tmp_path, "d", "train", 0) as w:
            w.write("k1", b"x", b"y", F.SampleMeta("d", "a", "s", 0, "g", (1, 1), "train"))
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_keys_are_stable_and_dot_free_and_splits_grouped():
    k = F.sample_key("my.data set", "a/b.c.mp4", 7)
    assert "." not in k and k == F.sample_key("my.data set", "a/b.c.mp4", 7)
    assert k != F.sample_key("my.data set", "a/b.c.mp4", 8)
    splits = [F.split_of_group(f"video{i}") for i in range(4000)]
    assert 0.035 < splits.count("val") / len(splits) < 0.065
    assert F.split_of_group("video1") == F.split_of_group("video1")


@pytest.mark.parametrize("name", ["/etc/passwd.jpg", "../x.jpg", "a/../../x.jpg"])
def test_unsafe_member_names_refused(name):
    with pytest.raises(F.ShardFormatError):
        F.split_member_name(name)


def test_manifest_paths_resolved_inside_root(tmp_path):
    F.write_json_atomic(tmp_path / F.MANIFEST_NAME, {
        "format_version": F.FORMAT_VERSION, "datasets": {},
        "shards": [{"path": "../evil.tar", "index": "a.idx", "dataset": "d", "split": "train", "samples": 1}]})
    with pytest.raises(F.ShardFormatError, match="escapes"):
        F.load_manifest(tmp_path)
    F.write_json_atomic(tmp_path / F.MANIFEST_NAME, {"format_version": 99, "datasets": {}, "shards": []})
    with pytest.raises(F.ShardFormatError, match="format_version"):
        F.load_manifest(tmp_path)


def test_lenient_index_drops_and_counts_bad_lines_strict_names_them(tmp_path):
    tar = _write_shard(tmp_path, n=4)
    idx_path = F.index_path_for(tar)
    lines = idx_path.read_text().splitlines()
    lines[2] = " ".join(lines[2].split()[:8])  # sample 2 loses its third member
    lines[3] = lines[3].replace("jpg ", "jpg x", 1)  # sample 3: an offset that is not a number
    idx_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(F.ShardFormatError, match=r":3: sample .* lacks"):
        F.read_index(idx_path)
    ix = F.read_index(idx_path, strict=False)
    assert ix.dropped == 2 and len(ix) == 2
    with open(tar, "rb") as f:  # the kept samples still read correctly by offset
        meta = F.SampleMeta.from_json(F.read_member(f, ix.offsets["json"][1], ix.sizes["json"][1]))
    assert meta.dataset == "ds one"


def test_sample_meta_median_round_trips_and_is_optional():
    m = F.SampleMeta("d", "a", "s", 0, "g", (4, 5), "train", median=87.5)
    assert F.SampleMeta.from_json(m.to_json()).median == 87.5
    old = json.loads(F.SampleMeta("d", "a", "s", 0, "g", (4, 5), "train").to_json())
    old.pop("median")  # a corpus written before the field existed
    assert F.SampleMeta.from_json(json.dumps(old).encode()).median is None
