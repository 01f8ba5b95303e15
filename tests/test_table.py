"""The corpus table (table.npz): equal to a fresh parse of the manifest and indexes, built for old corpora,
rebuilt when stale, shared by memory map with forked and spawned processes, safe when processes race."""

from __future__ import annotations

import json
import multiprocessing as mp
import pickle
from pathlib import Path

import numpy as np
import pytest

from usjepa.ingest.cli import main as ingest_main
from usjepa.shards import format as F
from usjepa.shards.readers import build_corpus_table, open_sample_table
from usjepa.shards.synthetic_shards import write_synthetic_corpus

COLUMNS = ("jpg_offset", "jpg_size", "mask_offset", "mask_size", "meta_offset", "meta_size")


def reference(root: Path, split: str) -> list[tuple]:
    """What the table must hold, from the manifest and every index parsed here: (shard path, key, byte ranges)
    of each usable sample in dataset, shard, tar order; shards gone, samples past a tar's end or lacking a
    member are left out."""
    m = F.load_manifest(root)
    rows = []
    for s in sorted((s for s in m["shards"] if s["split"] == split), key=lambda s: (s["dataset"], s["path"])):
        tar = Path(s["abs_path"])
        if not tar.is_file():
            continue
        ix = F.read_index(s["abs_index"], strict=False)
        for j, key in enumerate(ix.keys):
            ranges = [int(d[e][j]) for e in F.SAMPLE_EXTS for d in (ix.offsets, ix.sizes)]  # COLUMNS' order
            if max(ranges[k] + ranges[k + 1] for k in (0, 2, 4)) <= tar.stat().st_size:
                rows.append((str(tar), key, *ranges))
    return rows


def rows_of(table) -> list[tuple]:
    cols = [np.asarray(getattr(table, c)) for c in COLUMNS]
    shard = np.asarray(table.shard)
    return [(table.shard_paths[shard[i]], table.key(i), *(int(c[i]) for c in cols)) for i in range(len(table))]


def corpus(root: Path) -> Path:
    return write_synthetic_corpus(root, {"beta": 40, "alpha": 28}, size=(48, 64), per_shard=8, seed=3,
                                  masks_per_video=3, val={"alpha": 12})


def damage(root: Path, index_too: bool) -> None:
    """A shard gone, a tar cut in half and (``index_too``) an index line that lost its mask member."""
    tars = sorted(root.glob("beta-train-*.tar"))
    tars[3].unlink()
    data = tars[1].read_bytes()
    tars[1].write_bytes(data[: len(data) // 2])
    if not index_too:
        return
    idx = F.index_path_for(tars[2])
    lines = idx.read_text().splitlines()
    parts = lines[3].split()
    lines[3] = " ".join(x for j in range(0, len(parts), 4) if parts[j] != "mask.png" for x in parts[j : j + 4])
    idx.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("when", ["before_build", "after_build"])
def test_table_equals_a_fresh_parse_also_with_damaged_shards(tmp_path, when, caplog):
    root = corpus(tmp_path)
    assert (root / F.TABLE_NAME).is_file()  # written with the corpus, as usjepa-ingest does
    if when == "before_build":
        (root / F.TABLE_NAME).unlink()
    # before_build: all three found while building; after_build: the cut tar and the gone shard found at open
    damage(root, index_too=when == "before_build")
    for split in ("train", "val"):
        table = open_sample_table(root, split)
        assert rows_of(table) == reference(root, split)
        names = sorted({s["dataset"] for s in F.load_manifest(root)["shards"] if s["split"] == split})
        assert table.dataset_names == names and sum(table.dataset_sizes) == len(table)
    sk = open_sample_table(root, "train").skipped
    assert sk["missing_shard"] == 1 and sk["missing_member"] == (when == "before_build") and 2 <= sk["truncated"] <= 5
    if when == "after_build":  # the table was not rebuilt: the cuts are applied on the mapped rows
        assert "building" not in caplog.text


def test_old_corpus_without_table_opens_and_index_builds_it(tmp_path, caplog):
    root = corpus(tmp_path)
    (root / F.TABLE_NAME).unlink()  # ingested before tables existed
    expected = reference(root, "train")
    assert rows_of(open_sample_table(root, "train")) == expected  # built once, at first open
    assert "building" in caplog.text and (root / F.TABLE_NAME).is_file()
    caplog.clear()
    open_sample_table(root, "train")
    assert "building" not in caplog.text  # the second open maps it
    (root / F.TABLE_NAME).unlink()
    assert ingest_main(["index", str(root)]) == 0
    assert rows_of(open_sample_table(root, "train")) == expected
    assert not list(root.glob("*.tmp"))
    assert ingest_main(["index", str(tmp_path / "nowhere")]) == 1


def test_stale_or_damaged_table_is_rebuilt_and_a_worker_refuses_a_table_rebuilt_under_it(tmp_path, caplog):
    root = corpus(tmp_path)
    table = open_sample_table(root, "train")
    state = pickle.dumps(table)
    # the manifest changes (a shard dropped from it): the table describes another corpus
    m = json.loads((root / F.MANIFEST_NAME).read_text())
    m["shards"] = [s for s in m["shards"] if s["path"] != "beta-train-000000.tar"]
    F.write_json_atomic(root / F.MANIFEST_NAME, m)
    caplog.set_level("INFO")
    fresh = open_sample_table(root, "train")
    assert "another manifest" in caplog.text
    assert len(fresh) == len(table) - 8 and rows_of(fresh) == reference(root, "train")
    with pytest.raises(F.ShardFormatError, match="rebuilt"):
        pickle.loads(state)  # a worker of the old loader must not read other samples under the same ids
    # an index rewritten under an unchanged manifest
    idx = root / "alpha-train-000000.idx"
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # its first sample line removed
    caplog.clear()
    assert rows_of(open_sample_table(root, "train")) == reference(root, "train")
    assert "changed since the table was built" in caplog.text
    # a table file that is not one
    (root / F.TABLE_NAME).write_bytes(b"PK\x03\x04 not a zip")
    assert rows_of(open_sample_table(root, "train")) == reference(root, "train")


def _read_in_child(reader_or_table_bytes: bytes, ids: list[int]):
    reader = pickle.loads(reader_or_table_bytes)
    out = [reader.read(i) for i in ids]
    reader.close()
    return out


def test_reader_pickles_small_and_a_spawned_process_maps_the_same_rows(tmp_path):
    root = corpus(tmp_path)
    for val_from_train in (0.0, 0.3):
        table = open_sample_table(root, "train", val_from_train)
        reader = table.reader_view()
        raw = pickle.dumps(reader)
        assert len(raw) < 64 * 1024 and len(pickle.dumps(table)) < 64 * 1024
        ids = [0, len(table) // 2, len(table) - 1]
        with mp.get_context("spawn").Pool(1) as pool:
            got = pool.apply_async(_read_in_child, (raw, ids)).get(timeout=120)
        assert got == [reader.read(i) for i in ids]
        again = pickle.loads(pickle.dumps(table))
        assert rows_of(again) == rows_of(table) and again.dataset_sizes == table.dataset_sizes
        reader.close()


def _open_keys(root: str) -> list[str]:
    t = open_sample_table(root, "train")
    return [t.key(i) for i in range(len(t))]


def test_processes_racing_to_build_get_the_same_table(tmp_path):
    root = corpus(tmp_path)
    (root / F.TABLE_NAME).unlink()
    with mp.get_context("fork").Pool(4) as pool:
        results = pool.map_async(_open_keys, [str(root)] * 4).get(timeout=120)
    assert all(r == results[0] for r in results) and len(results[0]) == 40 + 28
    assert not list(root.glob("*.tmp")) and (root / F.TABLE_NAME).is_file()


def test_build_corpus_table_refuses_an_escaping_manifest_path(tmp_path):
    root = corpus(tmp_path / "c")
    m = json.loads((root / F.MANIFEST_NAME).read_text())
    m["shards"][0]["path"] = "../outside.tar"
    F.write_json_atomic(root / F.MANIFEST_NAME, m)
    with pytest.raises(F.ShardFormatError, match="escapes"):
        build_corpus_table(root)


def test_parallel_build_writes_the_same_table(tmp_path):
    root = write_synthetic_corpus(tmp_path, {"a": 40, "b": 30}, size=(16, 16), per_shard=1, seed=1,
                                  masks_per_video=4)  # 70 shards: enough for two build processes
    serial = F.map_table(build_corpus_table(root, tmp_path / "serial.npz", workers=1))
    parallel = F.map_table(build_corpus_table(root, tmp_path / "parallel.npz", workers=2))
    assert serial[1] == parallel[1]  # the same info (shards, splits, skips)
    for name, col in serial[2].items():
        np.testing.assert_array_equal(col, parallel[2][name])


def test_a_table_naming_a_path_outside_the_root_is_refused(tmp_path):
    root = corpus(tmp_path / "c")
    info, _, cols = F.map_table(root / F.TABLE_NAME)
    info["shards"][0]["path"] = "../../elsewhere.tar"  # tampered, the manifest's hash left as it was
    F.write_table(root / F.TABLE_NAME, info, {k: np.array(v) for k, v in cols.items()})
    with pytest.raises(F.ShardFormatError, match="escapes"):
        open_sample_table(root, "train")
