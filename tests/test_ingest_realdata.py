"""usjepa-ingest over ../shared/realdata (POCUS videos + BUSI stills at once); skips when absent."""

from __future__ import annotations

import csv

from usjepa.ingest.cli import EXIT_OK, main
from usjepa.ingest.verify import verify_corpus
from usjepa.shards.format import load_manifest


def test_realdata_frame_counts_and_verify(realdata, tmp_path):
    out = tmp_path / "shards"
    # stride 4 keeps the test short; every frame is still decoded, so the count check is exact
    rc = main(["run", str(realdata / "pocus"), str(realdata / "busi"), "--out", str(out), "--workers", "2",
               "--stride", "4", "--quiet"])
    assert rc == EXIT_OK
    m = load_manifest(out)
    with open(realdata / "pocus" / "MANIFEST.csv") as f:
        rows = list(csv.DictReader(f))
    pocus, busi = m["datasets"]["pocus"], m["datasets"]["busi"]
    assert pocus["sources"] == len(rows)
    assert pocus["decoded_frames"] + pocus["decoded_frames_in_skipped_files"] == sum(int(r["frames"]) for r in rows)
    for name, d in m["datasets"].items():
        written = d["frames"]["train"] + d["frames"]["val"]
        assert written == (d["decoded_frames"] - d["strided_frames"] - d["duplicate_frames_dropped"]
                           - sum(d["rejected_frames"].values()))
        assert written == sum(s["samples"] for s in m["shards"] if s["dataset"] == name)
    n_images = sum(1 for p in (realdata / "busi").rglob("*.png") if not p.name.endswith("_mask.png"))
    assert busi["sources"] == n_images == busi["frames"]["train"] + busi["frames"]["val"]
    assert busi["excluded_files"] == n_images  # the lesion masks are not ingested as frames
    assert m["skipped"] == []
    assert verify_corpus(out) == []
