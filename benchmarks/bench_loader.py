"""Loader throughput: the DALI pipeline vs the DataLoader + OpenCV baseline vs WebDataset's WebLoader.

Same shards, same augmentations (crop 0.6-1.0 → 224², H/V flips, blur, speckle, contrast at their
DataConfig probabilities; validity grids and block masks included), same worker count, one process run.
The figure is images/s and each loader's ratio to the plain DataLoader + OpenCV chain and to our own
OpenCV backend (``backend="torch"``, the same worker design as the DALI path), measured in this run.

    python -m benchmarks.bench_loader --out benchmarks/results            # 4000 synthetic 320-px frames
    python -m benchmarks.bench_loader --root /path/to/corpus --out DIR    # an ingested corpus

DALI runs on the GPU (mixed decode) when CUDA is available, else on its CPU backend.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import hardware, hardware_line, save_result, utc_now


def _batch_len(b) -> int:
    return b.images.shape[0] if hasattr(b, "images") else b[0].shape[0]


def time_loader(make, min_images: int = 0) -> dict:
    """Passes over the corpus until at least ``min_images`` (a short corpus gets several, each with its own
    restart cost, as a training run pays it); start-up (worker spawn, pipeline build, first batch) is timed
    apart."""
    t0 = time.perf_counter()
    loader = make()
    it = iter(loader)
    first = next(it)
    t1 = time.perf_counter()
    n, passes = 0, 1
    while True:
        for b in it:
            n += _batch_len(b)
        if n >= min_images:
            break
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(passes)
        it, passes = iter(loader), passes + 1
    t2 = time.perf_counter()
    if hasattr(loader, "close"):
        loader.close()
    return {"images": n, "passes": passes, "seconds": t2 - t1, "images_per_s": n / (t2 - t1), "startup_s": t1 - t0,
            "batch_shape": list(first.images.shape if hasattr(first, "images") else first[0].shape)}


def webloader(root: Path, batch_size: int, cfg, mask_cfg, seed: int):
    """WebDataset's own pipeline over the same tars, the same worker code per sample, OpenCV pixels."""
    import cv2
    import webdataset as wds

    from usjepa.kernels.block_masks import sample_block_masks
    from usjepa.shards.augment import MaskDecoder, draw_params, mask_seed, median_in_mask, validity_grid
    from usjepa.shards.baseline import render_opencv
    from usjepa.shards.format import load_manifest, stable_unit_hash

    manifest = load_manifest(root)
    urls = [s["abs_path"] for s in manifest["shards"] if s["split"] == "train"]
    masks = MaskDecoder(cfg.mask_cache)

    def augment(sample):
        mask = masks(sample["mask.png"])
        key = sample["__key__"]
        rng = np.random.default_rng([seed, int(stable_unit_hash(key) * 2**32)])
        p = draw_params(rng, mask.shape, cfg, True)
        if p.alpha != 1.0:
            mu = json.loads(sample["json"]).get("median")  # stored at ingest; older corpora lack it
            p.mu = median_in_mask(sample["jpg"], mask) if mu is None else mu
        scale, bias = p.affine(cfg)
        x = render_opencv(sample["jpg"], p, cfg).astype(np.float32) * np.float32(scale) + np.float32(bias)
        return x[None], validity_grid(mask, p, cfg), key

    def collate(batch):
        imgs, valid, keys = batch
        ctx, tgt = sample_block_masks(np.asarray(valid), mask_cfg, mask_seed(seed, 0, hash(keys[0]) & 0xFFFFFFFF, True))
        return torch.from_numpy(np.asarray(imgs)), torch.from_numpy(np.asarray(valid)), ctx, tgt, keys

    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(256).map(augment)
          .batched(batch_size, collation_fn=lambda xs: tuple(zip(*xs)), partial=False).map(collate))
    cv2.setNumThreads(1)
    return wds.WebLoader(ds, batch_size=None, num_workers=cfg.num_workers)


class _PlainDataset:
    """The straightforward per-sample DataLoader + OpenCV/NumPy chain (the way SPEC §9's "naive" chain is
    written): decode image and mask every time, crop/flip/resize both at full resolution, full-resolution
    speckle noise smoothed with σ_K, the stored median (exact median without one), grid from the 224² mask. Same crop windows, flips and
    severities as the loaders (``draw_params``)."""

    def __init__(self, table, ids, cfg, seed):
        self.reader, self.ids, self.cfg, self.seed = table.reader_view(), ids, cfg, seed

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        import cv2

        from usjepa.shards import corruptions as C
        from usjepa.shards.augment import draw_params, sample_rng

        cfg, s = self.cfg, self.cfg.image_size
        sid = int(self.ids[i])
        jpg, png = self.reader.read(sid)
        img = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_GRAYSCALE)
        mask = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
        rng = sample_rng(self.seed, 0, sid)
        p = draw_params(rng, img.shape, cfg, True)
        y0, x0, h, w = p.crop
        x = cv2.resize(img[y0:y0 + h, x0:x0 + w], (s, s), interpolation=cv2.INTER_AREA).astype(np.float32)
        m = cv2.resize(mask[y0:y0 + h, x0:x0 + w], (s, s), interpolation=cv2.INTER_NEAREST_EXACT)
        if p.vflip:
            x, m = x[::-1], m[::-1]
        if p.hflip:
            x, m = x[:, ::-1], m[:, ::-1]
        x = np.ascontiguousarray(x)
        if p.blur_eps > 0:
            x = C.apply_blur(x, p.blur_eps)
        if p.speckle_eps > 0:
            sp = C.speckle_params(p.speckle_eps, s)
            eta = cv2.GaussianBlur(rng.standard_normal((s, s)).astype(np.float32), (0, 0), sp.grain_px)
            eta *= sp.sigma_noise / eta.std()
            x = np.clip(x * (1.0 + eta), 0, 255)
        if p.alpha != 1.0:
            mu = self.reader.median(sid)  # stored at ingest; older corpora lack it
            if mu is None:
                mu = float(np.median(img[mask > 0])) if (mask > 0).any() else float(np.median(img))
            x = mu + p.alpha * (x - mu)
        x = (x / 255.0 - cfg.mean) / cfg.std
        g = cfg.grid
        valid = (m > 0).reshape(g, cfg.patch_size, g, cfg.patch_size).any(axis=(1, 3))
        return torch.from_numpy(x[None].astype(np.float32)), torch.from_numpy(valid), sid


def plain_loader(root: Path, batch_size: int, cfg, mask_cfg, seed: int):
    from torch.utils.data import DataLoader

    from usjepa.kernels.block_masks import sample_block_masks
    from usjepa.shards.readers import open_sample_table
    from usjepa.shards.sampler import epoch_order

    table = open_sample_table(root, "train")
    ids = epoch_order(table.dataset_sizes, None, seed, 0)

    def collate(items):
        imgs, valid, sids = zip(*items)
        valid = torch.stack(valid)
        ctx, tgt = sample_block_masks(valid.numpy(), mask_cfg, int(sids[0]))
        return torch.stack(imgs), valid, torch.from_numpy(ctx), torch.from_numpy(tgt)

    return DataLoader(_PlainDataset(table, ids, cfg, seed), batch_size=batch_size, num_workers=cfg.num_workers,
                      collate_fn=collate, drop_last=True, worker_init_fn=_one_thread)


def _one_thread(_):
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, help="corpus root (manifest.json); default: synthetic frames")
    ap.add_argument("--frames", type=int, default=4000)
    ap.add_argument("--side", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--only", default="dali,torch,plain,webloader")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    ap.add_argument("--min-images", type=int, default=4000, help="images per loader and round (several passes "
                    "over a smaller corpus)")
    args = ap.parse_args(argv)

    from usjepa.kernels.block_masks import MaskConfig
    from usjepa.shards.augment import DataConfig
    from usjepa.shards.loader import build_loader
    from usjepa.shards.synthetic_shards import write_synthetic_corpus

    tmp = None
    root = args.root
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="usjepa-bench-")
        # runs of 8 frames share a mask, like the frames of a video (80 % of the paper's corpus)
        root = write_synthetic_corpus(tmp.name, {"synthetic": args.frames}, size=(args.side, args.side),
                                      per_shard=500, seed=0, masks_per_video=8)
    # This process only consumes batches (and, for our loaders, applies the per-sample affine); intra-op
    # threads here would spin against the loader workers for the same cores.
    torch.set_num_threads(1)
    cfg = DataConfig(num_workers=args.workers, cap=None)
    mask_cfg = MaskConfig()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    makers = {}
    for name in args.only.split(","):
        if name == "webloader":
            makers[name] = lambda: webloader(root, args.batch_size, cfg, mask_cfg, 0)
        elif name == "plain":
            makers[name] = lambda: plain_loader(root, args.batch_size, cfg, mask_cfg, 0)
        else:
            makers[name] = lambda name=name: build_loader(root, "train", args.batch_size, cfg, mask_cfg, 0, 1,
                                                          device if name == "dali" else "cpu", 0, name)
    # Interleaved rounds: on a shared machine the load drifts, so each round measures every loader once and
    # ratios are taken within a round, then the median over rounds is reported.
    rounds = []
    for k in range(args.rounds):
        rnd = {}
        for name, make in makers.items():
            rnd[name] = time_loader(make, args.min_images)
            print(f"round {k}: {name:10s} {rnd[name]['images_per_s']:8.1f} img/s  ({rnd[name]['images']} images in "
                  f"{rnd[name]['passes']} pass(es), start-up {rnd[name]['startup_s']:.1f} s)", flush=True)
        rounds.append(rnd)
    results = {name: {"images_per_s": float(np.median([r[name]["images_per_s"] for r in rounds])),
                      "rounds_images_per_s": [r[name]["images_per_s"] for r in rounds],
                      "images_per_round": rounds[0][name]["images"],
                      "passes_per_round": rounds[0][name]["passes"],
                      "startup_s": float(np.median([r[name]["startup_s"] for r in rounds])),
                      "batch_shape": rounds[0][name]["batch_shape"]} for name in makers}

    def ratio(name, ref):
        if ref not in makers:
            return None
        return float(np.median([r[name]["images_per_s"] / r[ref]["images_per_s"] for r in rounds]))

    plain = "plain" in makers
    ours = "torch" in makers
    for name, r in results.items():
        r["ratio_vs_plain_dataloader_opencv"] = ratio(name, "plain")
        r["ratio_vs_torch_backend"] = ratio(name, "torch")
    report = {
        "benchmark": "loader",
        "hardware": hardware(),
        "dali_device": "gpu" if device == "cuda" else "cpu",
        "config": {"frames": args.frames if args.root is None else None, "side": args.side,
                   "root": str(args.root) if args.root else "synthetic", "batch_size": args.batch_size,
                   "workers": args.workers, "rounds": args.rounds, "min_images": args.min_images,
                   "augment": {k: v for k, v in cfg.__dict__.items()}},
        "results": results,
        "legend": {"dali": "build_loader(backend='dali')", "torch": "build_loader(backend='torch'): same worker "
                   "design, OpenCV pixels", "plain": "straightforward per-sample DataLoader + OpenCV chain",
                   "webloader": "webdataset.WebLoader over the same tars, OpenCV pixels"},
    }
    report["measured_at"] = utc_now()
    fmt = lambda k, f: f(results[k]) if k in results else "–"
    row = "| " + " | ".join([
        hardware_line(report["hardware"]),
        f"DALI {report['dali_device'].upper()}",
        *(fmt(k, lambda r: f"{r['images_per_s']:.0f}") for k in ("dali", "torch", "plain", "webloader")),
        fmt("dali", lambda r: f"{r['ratio_vs_plain_dataloader_opencv']:.2f}×" if plain else "–"),
        fmt("dali", lambda r: f"{r['ratio_vs_torch_backend']:.2f}×" if ours else "–"),
        fmt("webloader", lambda r: f"{r['ratio_vs_plain_dataloader_opencv']:.2f}×" if plain else "–"),
    ]) + " |"
    header = ("| hardware | DALI device | DALI img/s | torch backend img/s | plain DataLoader+OpenCV img/s | "
              "WebLoader img/s | DALI / plain | DALI / torch backend | WebLoader / plain |\n"
              "|---|---|---|---|---|---|---|---|---|")
    save_result(args.out, "bench_loader", report, header + "\n" + row)
    if tmp is not None:
        tmp.cleanup()
    return report


if __name__ == "__main__":
    main()
