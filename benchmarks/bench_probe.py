"""Linear-probe training: five seeds side by side (usjepa.probe.linear) vs five plain runs, one after another.

Baseline, measured in the same process on one thread (as ours runs): the textbook loop per seed — ``nn.Linear``-style parameters,
autograd cross-entropy, ``torch.optim.AdamW``, cosine annealing, minibatches of 32 by index. Both train
the same features for the full 150 epochs (patience off, so the work is equal; both keep the epoch with
the lowest validation loss), from the same initialisation and sample order; the benchmark also reports how
far the two sets of kept weights end apart.

    python -m benchmarks.bench_probe --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import hardware, hardware_line, save_result, utc_now
from usjepa.probe.linear import ProbeConfig, _init_linear, train_linear_probes

REPO = Path(__file__).resolve().parents[1]


def plain_probe(x, y, xv, yv, n_classes: int, seed: int, cfg: ProbeConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w0, b0 = _init_linear(gen, x.shape[1], n_classes)
    w, b = torch.nn.Parameter(w0), torch.nn.Parameter(b0)
    opt = torch.optim.AdamW([w, b], lr=cfg.lr, weight_decay=cfg.weight_decay)
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
    args = ap.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(args.classes, args.dim, generator=g)
    y = torch.randint(0, args.classes, (args.n,), generator=g)
    x = centres[y] + 2.0 * torch.randn(args.n, args.dim, generator=g)
    xv, yv = x[:64], y[:64]
    cfg = ProbeConfig(patience=10**9)  # no early stopping: equal work on both sides
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
    steps = cfg.max_epochs * -(-args.n // cfg.batch_size)
    result = {
        "benchmark": f"linear probe, {args.seeds} seeds x {cfg.max_epochs} epochs, {args.n} x {args.dim}, "
                     f"{args.classes} classes, batch {cfg.batch_size}",
        "command": "python -m benchmarks.bench_probe " + " ".join(argv if argv is not None else sys.argv[1:]),
        "plain_sequential_s": t_plain, "batched_s": t_ours, "speedup": t_plain / t_ours,
        f"plain_sequential_s_{threads}_threads_estimated_from_one_seed": t_plain_default_threads,
        "batched_ms_per_step": 1e3 * t_ours / steps, "plain_ms_per_step_per_seed": 1e3 * t_plain / steps / len(seeds),
        "max_abs_weight_difference_vs_plain": diff,
        "hardware": hardware(), "date_utc": utc_now(),
    }
    row = (f"| linear probe, {args.seeds} seeds × {cfg.max_epochs} epochs, {args.n}×{args.dim} | {t_ours:.2f} s | "
           f"{t_plain:.2f} s | {t_plain / t_ours:.1f}x | {hardware_line(result['hardware'])} |")
    header = "| benchmark | batched seeds | plain, sequential | ratio | hardware |\n|---|---|---|---|---|\n"
    save_result(args.out, "bench_probe", result, header + row)
    return result


if __name__ == "__main__":
    main()
