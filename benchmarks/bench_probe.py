"""The probe's two costs, each against its baseline in the same process.

1. Feature extraction, ViT-B/16 features per second: ``usjepa.probe.features.extract_features`` (threads
   preparing images beside the encoder, every core, ``inference_mode``, bf16 where the CPU/GPU runs it
   natively; also timed in fp32 to separate the two) against the extraction path as it was before it
   (``legacy_features`` below, kept verbatim in spirit: a DataLoader over the images with 0 workers on
   ≤ 2 cores, fp32, torch's thread count as the process starts). Same images, same encoder, no cache;
   rounds alternate, the best round of each counts. Also reported: how far the features of the paths are
   apart (fp32 must match the old path; bf16 is compared by cosine), and a cached re-run.
2. Linear-probe training: five seeds side by side (usjepa.probe.linear) vs five plain runs, one after another
   (the Adam phase, one setting). Also timed: the default probe as the table runs it — the lr x C grid, Adam,
   then L-BFGS to each probe's optimum — with and without that L-BFGS phase, to show what it costs.

Baseline of 2., measured in the same process on one thread (as ours runs): the textbook loop per seed —
our probe's initialisation, autograd cross-entropy, ``torch.optim.AdamW``, cosine annealing, minibatches of
32 by index. Both train the same features for the full 150 epochs (patience off, so the work is equal;
both keep the epoch with the lowest validation loss), from the same initialisation and sample order; the
benchmark also reports how far the two sets of kept weights end apart.

    python -m benchmarks.bench_probe --out benchmarks/results
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import hardware, hardware_line, save_result, utc_now
from usjepa.probe.linear import ProbeConfig, _init_linear, train_linear_probes

REPO = Path(__file__).resolve().parents[1]
REALDATA_BUSI = REPO.parent / "shared" / "realdata" / "busi"


class _LegacyInputs(torch.utils.data.Dataset):
    """The pre-change probe input path: decode, ingest's ``preprocess_frame``, resize; one still per item."""

    def __init__(self, paths, cfg, size):
        self.paths, self.cfg, self.size = paths, cfg, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, k):
        from usjepa.ingest.preprocess import preprocess_frame

        img = cv2.imdecode(np.fromfile(self.paths[k], dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if img.ndim == 3 and img.shape[2] == 4:
            img = img[:, :, :3]
        gray, _ = preprocess_frame(img, self.cfg)
        return cv2.resize(gray, (self.size, self.size), interpolation=cv2.INTER_AREA)


def legacy_features(encoder, paths, cfg, batch_size: int = 32) -> np.ndarray:
    n = os.cpu_count() or 1
    loader = torch.utils.data.DataLoader(_LegacyInputs(paths, cfg, encoder.img_size), batch_size=batch_size,
                                         num_workers=0 if n <= 2 else min(8, n // 2))
    return np.concatenate([encoder.pooled_features(x, "mean").cpu().numpy() for x in loader])


def bench_features(data_root: Path | None, n_images: int, rounds: int, arch: str) -> dict:
    from usjepa.ingest.preprocess import PreprocessConfig
    from usjepa.probe.data import load_labelled
    from usjepa.probe.encoders import load_probe_encoder
    from usjepa.probe.features import extract_features, resolve_precision

    tmp = None
    if data_root is None or not data_root.is_dir():
        from usjepa.ingest.synthetic import make_synthetic_corpus

        tmp = tempfile.TemporaryDirectory()
        make_synthetic_corpus(tmp.name, "demo", seed=0)
        data_root = Path(tmp.name) / "syn_breast"
    data = load_labelled(data_root)
    data.items = data.items[:n_images]
    idx = np.arange(len(data.items))
    paths = [it.path for it in data.items]
    cfg = PreprocessConfig()
    enc = load_probe_encoder(f"random:{arch}", device="cpu")
    auto = resolve_precision("auto", enc.device)
    start_threads = torch.get_num_threads()
    timings: dict[str, list[float]] = {"legacy": [], "new_fp32": [], "new_auto": []}
    feats = {}
    for _ in range(rounds):
        for name, fn in (("legacy", lambda: legacy_features(enc, paths, cfg)),
                         ("new_fp32", lambda: extract_features(enc, data, idx, cfg, precision="fp32").features),
                         ("new_auto", lambda: extract_features(enc, data, idx, cfg, precision="auto").features)):
            torch.set_num_threads(start_threads)  # each path starts from the process's own setting
            t0 = time.perf_counter()
            feats[name] = fn()
            timings[name].append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as cache:
        extract_features(enc, data, idx, cfg, cache_dir=cache)
        t0 = time.perf_counter()
        hit = extract_features(enc, data, idx, cfg, cache_dir=cache)
        t_cached = time.perf_counter() - t0
    best = {k: min(v) for k, v in timings.items()}
    fps = {k: len(idx) / v for k, v in best.items()}

    def cosine(a, b):
        return float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))

    if tmp is not None:
        tmp.cleanup()
    return {
        "features": f"{arch} features of {len(idx)} stills from {data_root}",
        "features_per_s": fps, "seconds_best_round": best, "seconds_all_rounds": timings,
        "speedup_new_vs_legacy": fps["new_auto"] / fps["legacy"],
        "speedup_new_fp32_vs_legacy": fps["new_fp32"] / fps["legacy"],
        "auto_precision_here": auto, "torch_threads_at_start": start_threads,
        "max_abs_difference_new_fp32_vs_legacy": float(np.abs(feats["new_fp32"] - feats["legacy"]).max()),
        "min_cosine_new_auto_vs_fp32": cosine(feats["new_auto"], feats["new_fp32"]),
        "cached_rerun_s": t_cached, "cached_rerun_from_cache": hit.from_cache,
    }


def plain_probe(x, y, xv, yv, n_classes: int, seed: int, cfg: ProbeConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w0, b0 = _init_linear(gen, x.shape[1], n_classes)
    w, b = torch.nn.Parameter(w0), torch.nn.Parameter(b0)
    (lr, l2), = cfg.settings()
    opt = torch.optim.Adam([{"params": [w], "weight_decay": l2}, {"params": [b], "weight_decay": 0.0}], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.max_epochs)
    best, best_w = float("inf"), w.detach().clone()
    for _ in range(cfg.max_epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            loss = F.cross_entropy(x[idx] @ w + b, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        with torch.no_grad():
            val = float(F.cross_entropy(xv @ w + b, yv))
        if val < best:
            best, best_w = val, w.detach().clone()
    return best_w


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--n", type=int, default=1444, help="training rows (POCUS's training split)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--feature-data", type=Path, default=REALDATA_BUSI,
                    help="stills to extract features from (default: the shared BUSI sample; synthetic if absent)")
    ap.add_argument("--feature-images", type=int, default=24)
    ap.add_argument("--feature-rounds", type=int, default=3)
    ap.add_argument("--feature-arch", default="vit_base_patch16_224")
    args = ap.parse_args(argv)
    feat = bench_features(args.feature_data, args.feature_images, args.feature_rounds, args.feature_arch)

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(args.classes, args.dim, generator=g)
    y = torch.randint(0, args.classes, (args.n,), generator=g)
    x = centres[y] + 2.0 * torch.randn(args.n, args.dim, generator=g)
    xv, yv = x[:64], y[:64]
    # one setting, no early stopping, no L-BFGS phase: equal work on both sides
    cfg = ProbeConfig(lr_grid=(1e-3,), wd_grid=(1e-3,), patience=10**9, min_epochs=0, polish_iters=0)
    seeds = list(range(args.seeds))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same single thread train_linear_probes uses: compare the method only
    t0 = time.perf_counter()
    plain = [plain_probe(x, y, xv, yv, args.classes, s, cfg) for s in seeds]
    t_plain = time.perf_counter() - t0
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    plain_default_threads = plain_probe(x, y, xv, yv, args.classes, seeds[0], cfg)
    t_plain_default_threads = (time.perf_counter() - t0) * len(seeds)
    del plain_default_threads
    t0 = time.perf_counter()
    ours = train_linear_probes(x, y, xv, yv, args.classes, seeds, cfg)
    t_ours = time.perf_counter() - t0
    diff = max(float((ours.weight[i] - plain[i]).abs().max()) for i in range(len(seeds)))
    # the default probe (grid, early stopping, L-BFGS phase), and the same without the L-BFGS phase
    t0 = time.perf_counter()
    full = train_linear_probes(x, y, xv, yv, args.classes, seeds)
    t_full = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_linear_probes(x, y, xv, yv, args.classes, seeds, ProbeConfig(polish_iters=0))
    t_adam = time.perf_counter() - t0
    grid = ProbeConfig()
    steps = cfg.max_epochs * -(-args.n // cfg.batch_size)
    result = {
        "benchmark": f"linear probe, {args.seeds} seeds x {cfg.max_epochs} epochs, {args.n} x {args.dim}, "
                     f"{args.classes} classes, batch {cfg.batch_size}",
        "command": "python -m benchmarks.bench_probe " + " ".join(argv if argv is not None else sys.argv[1:]),
        "plain_sequential_s": t_plain, "batched_s": t_ours, "speedup": t_plain / t_ours,
        f"plain_sequential_s_{threads}_threads_estimated_from_one_seed": t_plain_default_threads,
        "batched_ms_per_step": 1e3 * t_ours / steps, "plain_ms_per_step_per_seed": 1e3 * t_plain / steps / len(seeds),
        "max_abs_weight_difference_vs_plain": diff,
        "default_probe": {"what": f"{args.seeds} seeds x lr {grid.lr_grid} x C {grid.c_grid}, Adam with early "
                                  f"stopping, then L-BFGS (<= {grid.polish_iters} steps)",
                          "seconds": t_full, "seconds_without_lbfgs": t_adam,
                          "lbfgs_steps_of_chosen_probes": full.polish_steps, "epochs_run": full.epochs_run},
        "feature_extraction": feat,
        "hardware": hardware(), "date_utc": utc_now(),
    }
    hw = hardware_line(result["hardware"])
    fps = feat["features_per_s"]
    rows = [
        f"| {feat['features']}: features/s, new ({feat['auto_precision_here']}) | {fps['new_auto']:.2f} /s | "
        f"{fps['legacy']:.2f} /s | {feat['speedup_new_vs_legacy']:.2f}x | {hw} |",
        f"| same, new in fp32 (features match the old path to "
        f"{feat['max_abs_difference_new_fp32_vs_legacy']:.1e}) | {fps['new_fp32']:.2f} /s | {fps['legacy']:.2f} /s | "
        f"{feat['speedup_new_fp32_vs_legacy']:.2f}x | {hw} |",
        f"| linear probe, {args.seeds} seeds × {cfg.max_epochs} epochs, {args.n}×{args.dim} | {t_ours:.2f} s | "
        f"{t_plain:.2f} s | {t_plain / t_ours:.1f}x | {hw} |",
        f"| default probe ({args.seeds} seeds × {len(grid.settings(args.n))} settings, early stopping, then L-BFGS), "
        f"{args.n}×{args.dim}, vs the same without L-BFGS | {t_full:.2f} s | {t_adam:.2f} s | "
        f"{t_full / t_adam:.2f}x | {hw} |",
    ]
    header = "| benchmark | new | baseline | ratio | hardware |\n|---|---|---|---|---|\n"
    save_result(args.out, "bench_probe", result, header + "\n".join(rows))
    return result


if __name__ == "__main__":
    main()
