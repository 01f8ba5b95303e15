"""The streaming loader on tiny real shards: DALI (CPU backend) and the DataLoader + OpenCV baseline."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from usjepa.shards.augment import DataConfig
from usjepa.shards.corruptions import corrupt, speckle_params
from usjepa.shards.format import read_member
from usjepa.shards.loader import Batch, build_loader
from usjepa.shards.readers import open_sample_table
from usjepa.shards.sampler import epoch_order
from usjepa.shards.synthetic_shards import write_synthetic_corpus

MEAN, STD = DataConfig.mean, DataConfig.std
NO_PHOTO = {"blur_p": 0.0, "speckle_p": 0.0, "contrast_p": 0.0}


def to_gray(images: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: [B, 1, S, S] → float gray levels 0..255, [B, S, S]."""
    return ((images[:, 0] * STD + MEAN) * 255.0).numpy()


def collect(loader, limit=None) -> list[Batch]:
    out = []
    for b in loader:
        out.append(b)
        if limit is not None and len(out) == limit:
            break
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_synthetic_corpus(tmp_path_factory.mktemp("tex"), {"alpha": 40, "beta": 24}, size=(120, 160),
                                  per_shard=16, seed=2, masks_per_video=4)


@pytest.fixture(scope="module")
def flat_corpus(tmp_path_factory) -> Path:
    return write_synthetic_corpus(tmp_path_factory.mktemp("flat"), {"rects": 32}, size=(120, 160), per_shard=16,
                                  seed=1, flat=True)


def test_backends_give_the_same_batches(corpus):
    batches = {}
    for backend in ("dali", "torch"):
        loader = build_loader(corpus, "train", 8, {"num_workers": 1, "cap": 30}, None, 0, 1, "cpu", 5, backend)
        assert len(loader) == loader.batches_per_epoch == (30 + 24) // 8
        batches[backend] = collect(loader, 2)
        loader.close()
    for a, b in zip(batches["dali"], batches["torch"]):
        assert a.images.shape == b.images.shape == (8, 1, 224, 224)
        assert a.images.dtype == b.images.dtype == torch.float32
        assert a.valid.dtype == b.valid.dtype == torch.bool and a.valid.shape == (8, 14, 14)
        assert a.ctx_idx.dtype == torch.int64 and a.tgt_idx.shape[:2] == (4, 8)
        # per-image lengths: rows padded with -1 after their real indices, up to the batch's longest mask
        assert (a.ctx_len >= 10).all() and a.ctx_len.max() == a.ctx_idx.shape[1] and a.tgt_len.shape == (4, 8)
        assert ((a.ctx_idx >= 0) == (torch.arange(a.ctx_idx.shape[1]) < a.ctx_len[:, None])).all()
        # same worker code: same samples, augmentation parameters, validity grids and block masks
        assert a.keys == b.keys
        assert torch.equal(a.valid, b.valid)
        assert torch.equal(a.ctx_idx, b.ctx_idx) and torch.equal(a.tgt_idx, b.tgt_idx)
        # pixels differ only by the resize filters' rounding: well under one gray level on average
        diff = np.abs(to_gray(a.images) - to_gray(b.images))
        assert diff.mean() < 1.0, diff.mean()
        assert abs(float(a.images.std() - b.images.std())) < 0.02


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_mask_co_transform_is_exact(flat_corpus, backend):
    """White rectangles on black: the validity grid must equal the grid read off the augmented pixels."""
    loader = build_loader(flat_corpus, "train", 16, {"num_workers": 1, **NO_PHOTO}, None, 0, 1, "cpu", 3, backend)
    n_batches, n_partial = 0, 0
    for b in loader:
        pix = to_gray(b.images) > 127.5
        from_pixels = pix.reshape(-1, 14, 16, 14, 16).any(axis=(2, 4))
        np.testing.assert_array_equal(from_pixels, b.valid.numpy())
        n_batches += 1
        n_partial += int((~b.valid.reshape(16, -1).all(1) & b.valid.reshape(16, -1).any(1)).sum())
    loader.close()
    assert n_batches == 2
    assert n_partial >= 24  # the rectangles really cross the crops: most grids are partly valid


def test_ranks_get_equal_batches_and_disjoint_samples(corpus):
    keys, lens = [], []
    for rank in range(2):
        loader = build_loader(corpus, "train", 4, {"num_workers": 1, "cap": None, **NO_PHOTO}, None, rank, 2, "cpu",
                              0, "torch")
        lens.append(len(loader))
        keys.append([k for b in loader for k in b.keys])
    assert lens[0] == lens[1] == 64 // 8
    assert len(keys[0]) == len(keys[1])
    all_keys = keys[0] + keys[1]
    assert len(set(all_keys)) == 64  # every sample exactly once across the ranks


def test_resume_with_another_world_size_continues_the_key_sequence(corpus):
    cfg = {"num_workers": 1, "cap": None, **NO_PHOTO}
    table = open_sample_table(corpus, "train")
    expected = [table.key(i) for i in epoch_order(table.dataset_sizes, None, 7, 0)]
    loader = build_loader(corpus, "train", 4, cfg, None, 0, 1, "cpu", 7, "dali")
    seen = [k for b in collect(loader, 3) for k in b.keys]  # stop mid-epoch, as a checkpoint would
    state = loader.state_dict()
    assert state == {"seed": 7, "epoch": 0, "consumed": 12}
    # the same loader object continues where it stopped (the pass left mid-way is ended, the workers kept)
    nxt = [k for b in collect(loader, 1) for k in b.keys]
    assert nxt == expected[12:16]
    loader.close()
    # a fresh job with two ranks and batch 6 continues the same global order after the saved state
    ranks = [build_loader(corpus, "train", 6, cfg, None, r, 2, "cpu", 7, "torch") for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    per_rank = [[b.keys for b in r] for r in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == (64 - 12) // 12
    resumed = [k for step in zip(*per_rank) for keys in step for k in keys]
    assert seen + resumed == expected[: len(seen) + len(resumed)]


def test_validation_loader_is_deterministic(corpus):
    runs = []
    val = build_loader(_val_corpus(corpus), "val", 8, {"num_workers": 1}, None, 0, 1, "cpu", 0, "dali")
    for epoch in (0, 1):  # two epochs through the same pipeline: the same batches
        val.set_epoch(epoch)
        assert len(val) == 3  # 20 samples padded to whole batches
        runs.append(collect(val))
        assert len(runs[-1]) == 3
    val.close()
    for a, b in zip(*runs):
        assert a.keys == b.keys
        assert torch.equal(a.images, b.images)  # no random augmentation
        assert torch.equal(a.ctx_idx, b.ctx_idx) and torch.equal(a.tgt_idx, b.tgt_idx)  # fixed-seed masks


_VAL_CACHE: dict = {}


def _val_corpus(corpus: Path) -> Path:
    if corpus not in _VAL_CACHE:
        _VAL_CACHE[corpus] = write_synthetic_corpus(corpus.parent / (corpus.name + "_val"), {"alpha": 20},
                                                    split="val", size=(120, 160), per_shard=16, seed=4)
    return _VAL_CACHE[corpus]


def test_truncated_shard_and_missing_member_are_skipped_and_counted(tmp_path, caplog):
    root = write_synthetic_corpus(tmp_path, {"d": 64}, size=(96, 128), per_shard=16, seed=5)
    tars = sorted(root.glob("d-train-*.tar"))
    tars[3].unlink()  # shard listed in the manifest but gone
    # shard 1: tar cut in half → its later samples are dropped at load time
    data = tars[1].read_bytes()
    tars[1].write_bytes(data[: len(data) // 2])
    # shard 2: one index line loses its mask member
    idx = tars[2].with_suffix(".idx")
    lines = idx.read_text().splitlines()
    parts = lines[3].split()
    keep = [parts[j : j + 4] for j in range(0, len(parts), 4) if parts[j] != "mask.png"]
    lines[3] = " ".join(x for g in keep for x in g)
    idx.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        loader = build_loader(root, "train", 4, {"num_workers": 1, "cap": None}, None, 0, 1, "cpu", 0, "torch")
    sk = loader.skipped
    assert sk["missing_shard"] == 1
    assert sk["missing_member"] == 1
    assert 6 <= sk["truncated"] <= 10
    n_ok = 48 - sk["missing_member"] - sk["truncated"]
    assert len(loader.table) == n_ok
    assert "truncated" in caplog.text
    keys = [k for b in loader for k in b.keys]
    assert len(keys) == (n_ok // 4) * 4 and len(set(keys)) == len(keys)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_shard_damaged_after_start_is_replaced_counted_and_never_hangs(tmp_path, backend):
    root = write_synthetic_corpus(tmp_path, {"d": 32}, size=(96, 128), per_shard=16, seed=6)
    loaders = [build_loader(root, "train", 4, {"num_workers": 1, "cap": None}, None, r, 2, "cpu", 0, backend)
               for r in range(2)]
    tar = sorted(root.glob("d-train-*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[:2048])  # damaged after the tables were built
    counts = []
    for loader in loaders:
        batches = collect(loader)
        counts.append(len(batches))
        assert all(len(b) == 4 and b.images.shape[0] == 4 for b in batches)
        assert torch.isfinite(torch.stack([b.images for b in batches])).all()
        loader.close()
    assert counts == [4, 4]  # both ranks still agree on the batch count
    replaced = sum(loader.read_errors for loader in loaders)
    assert 14 <= replaced <= 16  # all of shard 0 (up to the one sample whose bytes lie in the first 2 KiB)
    assert loaders[0].skipped["unreadable"] == loaders[0].read_errors


def _clean_frames(root: Path, keys: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    table = open_sample_table(root, "train")
    where = {table.key(i): i for i in range(len(table))}
    out = {}
    for k in keys:
        i = where[k]
        with open(table.shard_paths[table.shard[i]], "rb") as f:
            jpg = read_member(f, table.jpg_offset[i], table.jpg_size[i])
            png = read_member(f, table.mask_offset[i], table.mask_size[i])
        out[k] = (cv2.imdecode(np.frombuffer(jpg, np.uint8), 0), cv2.imdecode(np.frombuffer(png, np.uint8), 0) > 0)
    return out


@pytest.fixture(scope="module")
def corpus224(tmp_path_factory) -> Path:
    return write_synthetic_corpus(tmp_path_factory.mktemp("c224"), {"s": 16}, size=(224, 224), per_shard=16, seed=8)


@pytest.mark.parametrize("kind,eps", [("blur", 2.0), ("contrast", 2.0), ("speckle", 2.0)])
def test_dali_augmentation_matches_corrupt_statistics(corpus224, kind, eps):
    """Full-frame crop, no flips, one corruption at a fixed ε: the DALI output equals ``corrupt`` (blur,
    contrast) or has its statistics (speckle: the relative noise std)."""
    cfg = DataConfig(num_workers=1, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_p=0.0, vflip_p=0.0,
                     cap=None, **{**NO_PHOTO, f"{kind}_p": 1.0, f"{kind}_eps": (eps, eps)})
    loader = build_loader(corpus224, "train", 8, cfg, None, 0, 1, "cpu", 0, "dali")
    batch = next(iter(loader))
    loader.close()
    got = to_gray(batch.images)
    clean = _clean_frames(corpus224, batch.keys)
    rng = np.random.default_rng(0)
    rel_dali, rel_ref = [], []
    for k, key in enumerate(batch.keys):
        img, mask = clean[key]
        ref = corrupt(img.astype(np.float32), kind, eps, mask=mask, rng=rng)
        if kind == "blur":
            assert np.abs(got[k] - ref).mean() < 0.6
        elif kind == "contrast":
            inside = mask
            # centre μ from a 1/4-scale decode vs the exact median: (1 - α)·Δμ, a few gray levels at most
            assert np.abs(got[k] - ref)[inside].mean() < 5.0
            ratio = got[k][inside].std() / img[inside].std()
            assert abs(ratio - 0.5) < 0.02
        else:
            bright = img > 40
            rel_dali.append((got[k][bright] / img[bright] - 1.0))
            rel_ref.append((ref[bright] / img[bright] - 1.0))
    if kind == "speckle":
        sd_dali, sd_ref = np.concatenate(rel_dali).std(), np.concatenate(rel_ref).std()
        assert abs(sd_dali / sd_ref - 1.0) < 0.1, (sd_dali, sd_ref)
        assert abs(sd_ref / speckle_params(eps).std_corr - 1.0) < 0.1


def test_fast_validity_grid_equals_the_dense_nearest_neighbour_mask():
    from usjepa.shards.augment import draw_params, validity_grid, validity_grid_dense
    from usjepa.shards.synthetic_shards import sector_mask

    cfg = DataConfig()
    rng = np.random.default_rng(0)
    for t in range(200):
        h, w = (int(v) for v in rng.integers(16, 480, 2))  # up- and down-scaling crops, odd sizes
        mask = sector_mask(h, w, rng) if t % 2 else rng.random((h, w)) < 0.003  # sparse: single pixels count
        p = draw_params(rng, (h, w), cfg, train=True)
        np.testing.assert_array_equal(validity_grid(mask, p, cfg), validity_grid_dense(mask, p, cfg))


def test_data_config_refuses_unknown_keys_and_bad_ranges():
    with pytest.raises(ValueError, match="unknown"):
        DataConfig.from_dict({"blurr_p": 0.5})
    with pytest.raises(ValueError):
        DataConfig(blur_eps=(2.0, 1.0))
    with pytest.raises(ValueError):
        DataConfig(hflip_p=1.5)
    assert DataConfig.from_dict({"blur_eps": [0.5, 1.0]}).blur_eps == (0.5, 1.0)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_jpeg_corrupt_inside_its_markers_is_replaced_without_losing_the_batch(tmp_path, backend):
    root = write_synthetic_corpus(tmp_path, {"d": 24}, size=(96, 128), per_shard=24, seed=9)
    table = open_sample_table(root, "train")
    bad = 5
    off, size = int(table.jpg_offset[bad]), int(table.jpg_size[bad])
    with open(table.shard_paths[0], "r+b") as f:  # garbage between intact SOI and EOI markers
        f.seek(off + 200)
        f.write(np.random.default_rng(0).integers(0, 256, size - 400, dtype=np.uint8).tobytes())
    loader = build_loader(root, "train", 4, {"num_workers": 1, "cap": None}, None, 0, 1, "cpu", 0, backend)
    batches = collect(loader)
    loader.close()
    assert len(batches) == 6 and all(b.images.shape[0] == 4 for b in batches)
    keys = [k for b in batches for k in b.keys]
    assert table.key(bad) not in keys  # replaced by another sample of its batch
    assert sum(int(b.replaced.sum()) for b in batches) == 1
    assert loader.read_errors == 1


def test_worker_output_packing_round_trips(corpus):
    """What a DALI worker sends (``batch_to_dali``: JPEGs and gains as lists, the rest batch-shaped) and what the
    loader unpacks (``records_to_torch``, fields viewed in place) carry the prepared batch unchanged; the pixel
    parameters and blur taps match the sample parameters."""
    from usjepa.kernels.block_masks import MaskConfig
    from usjepa.shards.augment import MaskDecoder, prepare_batch
    from usjepa.shards.corruptions import blur_kernel
    from usjepa.shards.dali_pipeline import PARAMS, batch_to_dali
    from usjepa.shards.loader import records_to_torch

    cfg = DataConfig(num_workers=1, blur_p=0.5, speckle_p=0.5, contrast_p=0.5, speckle_on="worker")
    reader = open_sample_table(corpus, "train").reader_view()
    pb = prepare_batch(np.arange(8), reader, MaskDecoder(), cfg, MaskConfig(), 0, 1, 123, True)
    jpg, params, taps, records, gain = batch_to_dali(pb, with_gains=True)
    assert len(jpg) == len(gain) == 8 and params.shape == (8, len(PARAMS)) and records.shape[0] == 8
    assert taps.shape[0] == 8 and taps.dtype == np.float32 and records.shape[1] % 8 == 0
    assert len(batch_to_dali(pb, with_gains=False)) == 4
    got = records_to_torch(torch.from_numpy(records.copy()), torch.device("cpu"), cfg.grid)
    assert torch.equal(got["valid"], torch.from_numpy(pb.valid))
    assert torch.equal(got["ctx"], torch.from_numpy(pb.ctx_idx)) and torch.equal(got["tgt"], torch.from_numpy(pb.tgt_idx))
    assert torch.equal(got["sid"], torch.from_numpy(pb.ids)) and torch.equal(got["replaced"], torch.from_numpy(pb.replaced))
    assert torch.equal(got["scale"], torch.from_numpy(pb.scale)) and torch.equal(got["bias"], torch.from_numpy(pb.bias))
    at = {n: i for i, n in enumerate(PARAMS)}
    assert any(p.blur_eps > 0.5 for p in pb.params) and any(p.blur_eps == 0 for p in pb.params)
    for k, p in enumerate(pb.params):
        start, end = p.roi()
        np.testing.assert_array_equal(params[k][[at["roi_y0"], at["roi_x0"]]], start)
        np.testing.assert_array_equal(params[k][[at["roi_y1"], at["roi_x1"]]], end)
        assert bool(params[k][at["do_speckle"]]) == (p.speckle_field is not None)
        if p.speckle_field is not None:
            np.testing.assert_array_equal(gain[k][:, :, 0], 1.0 + p.speckle_field)
        assert bool(params[k][at["do_blur"]]) == (p.blur_eps > 0 and blur_kernel(p.blur_eps).shape[0] > 1)
        if params[k][at["do_blur"]]:  # the separable taps, centred and zero-padded, are the 2-D kernel's factors
            k2 = blur_kernel(p.blur_eps)
            pad = (taps.shape[1] - k2.shape[0]) // 2
            np.testing.assert_array_equal(taps[k, :pad], 0) if pad else None
            np.testing.assert_allclose(np.outer(taps[k], taps[k])[pad:pad + len(k2), pad:pad + len(k2)], k2, rtol=1e-6)


def test_contrast_centre_is_the_stored_median_else_measured(tmp_path, corpus):
    """μ comes from the metadata written at ingest; a corpus without it gets μ from the pixels instead."""
    from usjepa.shards import format as F
    from usjepa.shards.augment import MaskDecoder, contrast_centre, median_in_mask
    from usjepa.shards.corruptions import masked_median
    reader = open_sample_table(corpus, "train").reader_view()
    jpg, png = reader.read(3)
    mask = MaskDecoder()(png)
    stored = reader.median(3)
    assert stored is not None and contrast_centre(reader, 3, jpg, mask) == stored
    decoded = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert abs(stored - masked_median(decoded, mask)) <= 2.0  # JPEG moves the median by a gray level or two
    # a corpus written before the median existed, and one whose metadata member is damaged
    old_meta = F.SampleMeta("old", "a", "s", 0, "g", mask.shape, "train")
    for name, meta in (("old", old_meta.to_json()), ("damaged", b"\xff{" * (len(old_meta.to_json()) // 2))):
        root = tmp_path / name
        root.mkdir()
        with F.ShardWriter(root, "old", "train", 0) as w:
            w.write("old_k0", jpg, png, old_meta)
        tar = root / F.shard_name("old", "train", 0)
        ix = F.read_index(F.index_path_for(tar))
        with open(tar, "r+b") as f:
            f.seek(int(ix.offsets[F.META_EXT][0]))
            f.write(meta)
        _write_manifest(root, [tar])
        old = open_sample_table(root, "train").reader_view()
        assert old.median(0) is None
        assert contrast_centre(old, 0, jpg, mask) == median_in_mask(jpg, mask)
        old.close()


def _write_manifest(root: Path, tars: list[Path]) -> None:
    """A manifest over ``tars`` (one dataset, train split) as usjepa-ingest writes it."""
    from usjepa.shards import format as F

    shards = [{"path": t.name, "index": F.index_path_for(t).name, "dataset": "old", "split": "train",
               "samples": int(open(F.index_path_for(t)).readline().split()[1]), "bytes": t.stat().st_size,
               "sha256": ""} for t in tars]
    F.write_json_atomic(root / F.MANIFEST_NAME, {"format_version": F.FORMAT_VERSION, "datasets": {}, "shards": shards})
