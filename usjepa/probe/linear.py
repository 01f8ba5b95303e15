"""Linear probes on frozen features (paper Table 6), trained for all seeds at once.

Features are standardised first (``standardise_stats``): each dimension z-scored with the mean and std of the
training split's features, as MAE's linear probe does with a non-affine BatchNorm in front of the head (for
a frozen encoder the two are the same map). Without it, an encoder whose features have a large offset or
scale is ranked by how well AdamW copes with the conditioning, not by what the features hold.

One probe per seed: AdamW (lr 1e-3, wd 1e-4), batch 32, cross-entropy, cosine annealing over at most 150
epochs, early stopping on validation loss with patience 15, restoring the best epoch's weights.

The seeds train side by side as one batched linear layer ``W[S, D, C]``: each seed has its own
initialisation, its own sample order (both drawn from that seed's generator) and its own early stopping.
AdamW and weight decay act element-wise and the summed loss separates by seed, so this is the same
computation as S independent runs — a seed's result does not depend on which other seeds run beside it —
done with S times fewer Python-level steps. The feature matrix is one tensor; minibatches are index
gathers; the cross-entropy gradient is taken in closed form (no autograd graph) and AdamW is the fused
kernel, on one CPU thread. ``benchmarks/bench_probe.py`` measures it against five plain autograd runs
(same weights to 1e-7, about 4x faster on a 2-core CPU).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ProbeConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    max_epochs: int = 150
    patience: int = 15


def standardise_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of training features ``[..., N, D]``; a constant dimension gets std 1 (it
    carries nothing, and dividing by ~0 would blow it up)."""
    xd = x.double()
    mean = xd.mean(-2)
    std = xd.std(-2, unbiased=False) if x.shape[-2] > 1 else torch.ones_like(mean)
    std = torch.where(std > 1e-12 * (1 + mean.abs()), std, torch.ones_like(std))
    return mean.float(), std.float()


@dataclass
class TrainedProbes:
    weight: torch.Tensor  # [S, D, C], the best epoch of each seed
    bias: torch.Tensor  # [S, C]
    seeds: list[int]
    best_epoch: list[int]  # 1-based epoch whose weights were kept
    epochs_run: list[int]  # epochs until early stopping (or max_epochs)
    best_val_loss: list[float]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features [N, D] -> [S, N, C] (a standardisation is folded into the weights)."""
        return torch.matmul(x.unsqueeze(0), self.weight) + self.bias.unsqueeze(1)

    def predict(self, x: torch.Tensor) -> np.ndarray:
        """Raw features [N, D] -> predicted classes [S, N]."""
        with torch.no_grad():
            return self.logits(torch.as_tensor(x)).argmax(-1).cpu().numpy()

    def seed_info(self, i: int) -> dict:
        return {"best_epoch": self.best_epoch[i], "epochs_run": self.epochs_run[i],
                "best_val_loss": self.best_val_loss[i]}


def _init_linear(gen: torch.Generator, d: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's linear-probe head init: weights ~ N(0, 0.01²) truncated at ±2σ, bias 0. Small on purpose:
    early stopping can keep an early epoch, and with ``nn.Linear``'s U(±1/sqrt(D)) the kept weights are then
    mostly the random init (near-chance predictions); from ~0 they are the first steps of the gradient."""
    w = torch.nn.init.trunc_normal_(torch.empty(c, d), std=0.01, a=-0.02, b=0.02, generator=gen)
    return w.t().contiguous(), torch.zeros(c)


def cross_entropy_grads(xb: torch.Tensor, yb: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """Gradients of ``sum_s mean_b CE(xb[s] @ W[s] + b[s], yb[s])`` w.r.t. W and b, in closed form.

    d CE / d logits = softmax - onehot; without autograd's graph this step is ~1.6x faster on CPU
    (``test_probe_protocol`` checks it against autograd).
    """
    logits = torch.baddbmm(bias.unsqueeze(1), xb, weight)  # [S, b, C]
    g = logits.softmax(-1)
    g.scatter_add_(2, yb.unsqueeze(-1), torch.full_like(g[..., :1], -1.0))
    g.div_(xb.shape[1])
    return torch.bmm(xb.transpose(1, 2), g), g.sum(1)


def _adamw(params, cfg: ProbeConfig) -> torch.optim.AdamW:
    try:  # the fused kernel is the fastest on CPU and GPU where this torch has it
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@contextmanager
def one_cpu_thread():
    """Probe steps are tiny ops: intra-op threads only add synchronisation, and on a busy machine a lot of
    it (measured on the 2-core CI box under load: 2 threads 10-17x slower than 1). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_linear_probes(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                        n_classes: int, seeds: list[int], cfg: ProbeConfig = ProbeConfig(),
                        subsets: list[np.ndarray] | None = None, normalise: bool = True) -> TrainedProbes:
    """Train one linear probe per seed; ``subsets[s]`` (equal lengths) restricts seed s to those rows.

    ``normalise``: standardise with the mean and std of the rows each seed trains on (its few-shot subset, or
    the whole training split), train, then fold the map into the kept weights, so the returned probes score
    raw features: ``W' = W / std``, ``b' = b - (mean / std) @ W``."""
    if x_train.ndim != 2 or x_val.ndim != 2:
        raise ValueError("features must be [N, D] matrices")
    mean = std = None
    if normalise:
        if subsets is None:
            mean, std = standardise_stats(x_train)
            x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
        else:
            rows = torch.as_tensor(np.stack(subsets), dtype=torch.int64)
            mean, std = standardise_stats(x_train[rows])  # [S, D] each
            x_train = (x_train.unsqueeze(0) - mean.unsqueeze(1)) / std.unsqueeze(1)  # [S, N, D]
            x_val = (x_val.unsqueeze(0) - mean.unsqueeze(1)) / std.unsqueeze(1)
    with one_cpu_thread():
        probes = _train(x_train, y_train, x_val, y_val, n_classes, seeds, cfg, subsets)
    if normalise:
        mean = mean.expand(len(seeds), -1) if mean.ndim == 1 else mean
        std = std.expand(len(seeds), -1) if std.ndim == 1 else std
        w = probes.weight / std.unsqueeze(-1)
        probes.bias = probes.bias - torch.bmm(mean.unsqueeze(1), w).squeeze(1)
        probes.weight = w
    return probes


def _train(x_train, y_train, x_val, y_val, n_classes, seeds, cfg, subsets) -> TrainedProbes:
    """``x_train`` / ``x_val``: [N, D] shared by all seeds, or [S, N, D] one (standardised) copy per seed."""
    s_count, d = len(seeds), x_train.shape[-1]
    per_seed = x_train.ndim == 3
    seed_rows = torch.arange(s_count).unsqueeze(1)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    inits = [_init_linear(g, d, n_classes) for g in gens]
    weight = torch.nn.Parameter(torch.stack([w for w, _ in inits]))
    bias = torch.nn.Parameter(torch.stack([b for _, b in inits]))
    if subsets is None:
        rows = torch.arange(x_train.shape[-2]).expand(s_count, -1)
    else:
        if len(subsets) != s_count or len({len(s) for s in subsets}) != 1:
            raise ValueError("one subset per seed, all of the same length")
        rows = torch.as_tensor(np.stack(subsets), dtype=torch.int64)
    n = rows.shape[1]
    if n == 0:
        raise ValueError("empty training set")

    opt = _adamw([weight, bias], cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.max_epochs)
    best_w, best_b = weight.detach().clone(), bias.detach().clone()
    best_loss = torch.full((s_count,), float("inf"))
    best_epoch = [0] * s_count
    epochs_run = [cfg.max_epochs] * s_count
    since_best = torch.zeros(s_count, dtype=torch.int64)
    stopped = torch.zeros(s_count, dtype=torch.bool)
    y_val_rep = y_val.repeat(s_count)

    for epoch in range(1, cfg.max_epochs + 1):
        order = torch.stack([rows[i, torch.randperm(n, generator=gens[i])] for i in range(s_count)])
        with torch.no_grad():
            for start in range(0, n, cfg.batch_size):
                idx = order[:, start:start + cfg.batch_size]  # [S, b]
                xb = x_train[seed_rows, idx] if per_seed else x_train[idx]  # [S, b, D]
                weight.grad, bias.grad = cross_entropy_grads(xb, y_train[idx], weight, bias)
                opt.step()
        sched.step()
        with torch.no_grad():
            val_logits = torch.matmul(x_val if per_seed else x_val.unsqueeze(0), weight) + bias.unsqueeze(1)
            val_loss = F.cross_entropy(val_logits.reshape(-1, n_classes), y_val_rep,
                                       reduction="none").view(s_count, -1).mean(1)
            improved = (val_loss < best_loss) & ~stopped
            if improved.any():
                best_w[improved] = weight[improved]
                best_b[improved] = bias[improved]
                best_loss = torch.where(improved, val_loss, best_loss)
                for i in improved.nonzero().flatten().tolist():
                    best_epoch[i] = epoch
            since_best = torch.where(improved, torch.zeros_like(since_best), since_best + 1)
            newly = (since_best >= cfg.patience) & ~stopped
            for i in newly.nonzero().flatten().tolist():
                epochs_run[i] = epoch
            stopped |= newly
        if bool(stopped.all()):
            break
    return TrainedProbes(weight=best_w, bias=best_b, seeds=list(seeds), best_epoch=best_epoch,
                         epochs_run=epochs_run, best_val_loss=best_loss.tolist())
