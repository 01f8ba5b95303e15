"""Linear probes on frozen features (paper Table 6), trained for all seeds at once.

Features are standardised first (``standardise_stats``): each dimension z-scored with the mean and std of the
training split's features, as MAE's linear probe does with a non-affine BatchNorm in front of the head (for
a frozen encoder the two are the same map). Without it, an encoder whose features have a large offset or
scale is ranked by how well the optimiser copes with the conditioning, not by what the features hold.

One probe per seed and setting of a small grid: Adam with an L2 penalty on the weights (``BatchedAdam``: why
not AdamW's decoupled decay), lr x λ from ``ProbeConfig``'s grids — λ = 1/(C·N) for logistic regression's C
grid (``select.py``), so the two classifiers search the same strengths —, batch 32, cross-entropy, cosine
annealing over at most 150 epochs, early stopping on validation loss with patience 15 that keeps no epoch
before ``min_epochs`` (a validation set of a dozen videos once stopped probes at epoch 1-2, near the init),
the best epoch's weights restored. Then a full-batch L-BFGS phase (``polish.py``) takes every probe from
those weights to the optimum of its own objective: the problem is convex, and minibatch noise left the
Adam weights predicting another class than the optimum for up to 1-18 % of test images. Finally each seed keeps
the setting the shared rule picks on the validation split (``select.choose``: best macro F1 among settings
that predict more than one class, ties by validation loss, then the stronger penalty), exactly as
logistic regression's C is chosen (``logreg.py``). The hyperparameters are chosen on held-out data, as the
MAE and I-JEPA linear probes do. With the L-BFGS phase the kept model no longer depends on the seed, the lr
or the epoch early stopping kept (they only set where L-BFGS starts); the probe then predicts what logistic
regression predicts at the same C, up to ties in the last digits.

All (setting, seed) probes train side by side as one batched linear layer ``W[P, D, C]``: each seed has its
own initialisation and its own sample order (both drawn from that seed's generator, shared by its grid
settings) and its own early stopping. The optimiser acts element-wise and the summed loss separates by
probe, so this is the same computation as P independent runs — a seed's result does not depend on which
other seeds run beside it — done with P times fewer Python-level steps. The feature matrix is one tensor;
minibatches are index gathers; the cross-entropy gradient is taken in closed form (no autograd graph), on
one CPU thread. ``benchmarks/bench_probe.py`` measures it against plain autograd runs with torch's Adam.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from usjepa.probe.metrics import macro_f1
from usjepa.probe.polish import polish
from usjepa.probe.select import C_GRID, choose, l2_of_c, one_class


class ProbeSettingsError(ValueError):
    """Probe settings that cannot run (an empty or negative grid, zero epochs, no split draws)."""


@dataclass(frozen=True)
class ProbeConfig:
    """``lr_grid`` x the penalty grid: the settings tried, each seed keeping the one the shared rule picks on
    the validation split (``select.choose``). The penalty is λ of ``λ/2 |W|²`` added to the mean
    cross-entropy (weights only): by default λ = 1/(C·N) for each C of ``c_grid`` (logistic regression's
    grid; N training rows, 2/(C·N) with two classes), so both classifiers search the same strengths;
    ``wd_grid`` gives λ values directly instead. ``min_epochs``: no epoch before it can be kept or start the
    patience count, so a tiny, noisy validation set cannot stop a probe at its first epochs (near the ~0
    init, which predicts the majority class). ``polish_iters``: the L-BFGS steps at most that take each
    probe from the Adam phase's weights to its optimum (max |gradient| ≤ ``polish_tol``); 0 keeps the Adam
    weights as they are."""

    lr_grid: tuple[float, ...] = (1e-3, 1e-2)
    c_grid: tuple[float, ...] = C_GRID
    wd_grid: tuple[float, ...] | None = None  # explicit λ values instead of c_grid
    batch_size: int = 32
    max_epochs: int = 150
    min_epochs: int = 30
    patience: int = 15
    polish_iters: int = 500
    polish_tol: float = 1e-7

    def __post_init__(self):
        object.__setattr__(self, "lr_grid", tuple(float(v) for v in self.lr_grid))
        object.__setattr__(self, "c_grid", tuple(float(v) for v in self.c_grid))
        if self.wd_grid is not None:
            object.__setattr__(self, "wd_grid", tuple(float(v) for v in self.wd_grid))
        penalties = self.wd_grid if self.wd_grid is not None else self.c_grid
        if (not self.lr_grid or not penalties or min(self.lr_grid) <= 0 or min(penalties) < 0
                or (self.wd_grid is None and min(self.c_grid) <= 0)):
            raise ProbeSettingsError(f"probe lr grid and C grid must be positive and wd grid non-negative, got "
                                     f"lr {self.lr_grid}, C {self.c_grid}, wd {self.wd_grid}")
        if self.max_epochs < 1 or self.patience < 1 or self.batch_size < 1 or self.polish_iters < 0:
            raise ProbeSettingsError("probe max_epochs, patience and batch_size must be >= 1, polish_iters >= 0")

    def settings(self, n_rows: int | None = None, n_classes: int = 3) -> list[tuple[float, float]]:
        """(lr, λ) of every grid point, in grid order (lr-major); λ from ``c_grid`` needs ``n_rows``."""
        if self.wd_grid is not None:
            return [(lr, wd) for lr in self.lr_grid for wd in self.wd_grid]
        if n_rows is None:
            raise ValueError("λ = 1/(C N) needs the number of training rows N")
        return [(lr, l2_of_c(c, n_rows, n_classes)) for lr in self.lr_grid for c in self.c_grid]

    def c_of_settings(self) -> list[float | None]:
        """Logistic regression's C of every grid point (None for explicit λ values)."""
        per_lr = [None] * len(self.wd_grid) if self.wd_grid is not None else list(self.c_grid)
        return per_lr * len(self.lr_grid)

    @property
    def first_kept_epoch(self) -> int:
        return max(1, min(self.min_epochs, self.max_epochs))


def standardise_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (float64) of training features ``[..., N, D]``; a constant dimension gets
    std 1 (it carries nothing, and dividing by ~0 would blow it up)."""
    xd = x.double()
    mean = xd.mean(-2)
    std = xd.std(-2, unbiased=False) if x.shape[-2] > 1 else torch.ones_like(mean)
    std = torch.where(std > 1e-12 * (1 + mean.abs()), std, torch.ones_like(std))
    return mean, std


@dataclass
class TrainedProbes:
    weight: torch.Tensor  # [S, D, C], each seed at its chosen setting (float64 after the L-BFGS phase)
    bias: torch.Tensor  # [S, C]
    seeds: list[int]
    best_epoch: list[int]  # 1-based Adam epoch whose weights were kept (the L-BFGS phase starts there)
    epochs_run: list[int]  # epochs until early stopping (or max_epochs)
    best_val_loss: list[float]  # validation loss of the weights returned
    lr: list[float] = field(default_factory=list)  # the (lr, λ) each seed chose on the validation split
    weight_decay: list[float] = field(default_factory=list)
    val_macro_f1: list[float] = field(default_factory=list)
    c: list[float | None] = field(default_factory=list)  # logistic regression's C of the chosen λ
    polish_steps: list[int] = field(default_factory=list)  # L-BFGS steps of the chosen probe

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features [N, D] -> [S, N, C] (a standardisation is folded into the weights)."""
        return torch.matmul(x.to(self.weight.dtype).unsqueeze(0), self.weight) + self.bias.unsqueeze(1)

    def predict(self, x: torch.Tensor) -> np.ndarray:
        """Raw features [N, D] -> predicted classes [S, N]."""
        with torch.no_grad():
            return self.logits(torch.as_tensor(x)).argmax(-1).cpu().numpy()

    def seed_info(self, i: int) -> dict:
        info = {"best_epoch": self.best_epoch[i], "epochs_run": self.epochs_run[i],
                "best_val_loss": self.best_val_loss[i]}
        if self.lr:
            info.update(lr=self.lr[i], weight_decay=self.weight_decay[i], val_macro_f1=self.val_macro_f1[i])
        if self.c:
            info.update(C=self.c[i], polish_steps=self.polish_steps[i])
        return info


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


class BatchedAdam:
    """Adam with an L2 penalty on the weights (torch's ``Adam(weight_decay=λ)`` maths: ``g += λ p`` before
    the bias-corrected moments; biases unpenalised) over a stack of independent probes, each with its own lr
    and λ (``[P]``); parameters are ``[P, ...]``. Element-wise, so probe p moves exactly as it would alone.

    Why coupled L2 and not AdamW's decoupled decay: on small labelled sets the probe needs strong
    regularisation (logistic regression picks C = 0.01-0.1 on standardised features), and decoupled decay
    under Adam's per-weight normalisation never reached it: with wd up to 100 the probe stayed 4-5 macro-F1
    points under logreg on synthetic stills (64-d); with the penalty, converged, it predicts what logreg
    predicts at C = 1 / (λ N) (98-100 % of test images) — the same objective."""

    def __init__(self, params: list[torch.Tensor], lr: torch.Tensor, l2: torch.Tensor, decayed=(0,),
                 betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.base_lr, self.l2, self.decayed = params, lr, l2, set(decayed)
        self.betas, self.eps, self.t = betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def step(self, grads: list[torch.Tensor], lr_factor: float) -> None:
        b1, b2 = self.betas
        self.t += 1
        lr = self.base_lr * lr_factor
        bc1, bc2 = 1 - b1 ** self.t, math.sqrt(1 - b2 ** self.t)
        for k, (p, g, m, v) in enumerate(zip(self.params, grads, self.m, self.v)):
            shape = (-1,) + (1,) * (p.ndim - 1)
            if k in self.decayed:
                g = g + self.l2.view(shape) * p
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.sub_((lr / bc1).view(shape) * m / (v.sqrt() / bc2 + self.eps))


def cosine_factor(epoch: int, max_epochs: int) -> float:
    """The lr factor of 1-based ``epoch``: cosine from 1 at the first epoch towards 0 after the last
    (``CosineAnnealingLR(T_max=max_epochs)`` stepped once per epoch)."""
    return 0.5 * (1 + math.cos(math.pi * (epoch - 1) / max_epochs))


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
    """Train one linear probe per seed and grid setting (Adam, then L-BFGS to the optimum); each seed keeps
    the setting the shared rule picks on the validation split. ``subsets[s]`` (equal lengths) restricts
    seed s to those rows.

    ``normalise``: standardise with the mean and std of the rows each seed trains on (its few-shot subset, or
    the whole training split), train, then fold the map into the kept weights, so the returned probes score
    raw features: ``W' = W / std``, ``b' = b - (mean / std) @ W``."""
    if x_train.ndim != 2 or x_val.ndim != 2:
        raise ValueError("features must be [N, D] matrices")
    mean = std = None
    x_train, x_val = x_train.double(), x_val.double()
    if normalise:
        if subsets is None:
            mean, std = standardise_stats(x_train)
            x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
        else:
            rows = torch.as_tensor(np.stack(subsets), dtype=torch.int64)
            mean, std = standardise_stats(x_train[rows])  # [S, D] each
            x_train = (x_train.unsqueeze(0) - mean.unsqueeze(1)) / std.unsqueeze(1)  # [S, N, D]
            x_val = (x_val.unsqueeze(0) - mean.unsqueeze(1)) / std.unsqueeze(1)
    n_rows = x_train.shape[-2] if subsets is None else len(subsets[0])
    settings = cfg.settings(n_rows, n_classes)
    with one_cpu_thread():
        grid = _train(x_train.float(), y_train, x_val.float(), y_val, n_classes, seeds, cfg, subsets, settings)
        if cfg.polish_iters:
            _polish_grid(grid, x_train, y_train, subsets, settings, cfg)
        probes = _choose_on_val(grid, x_val, y_val, n_classes, len(seeds), cfg, settings)
    if normalise:
        mean = mean.expand(len(seeds), -1) if mean.ndim == 1 else mean
        std = std.expand(len(seeds), -1) if std.ndim == 1 else std
        dtype = probes.weight.dtype
        w = probes.weight.double() / std.unsqueeze(-1)
        probes.bias = (probes.bias.double() - torch.bmm(mean.unsqueeze(1), w).squeeze(1)).to(dtype)
        probes.weight = w.to(dtype)
    return probes


def _polish_grid(grid: TrainedProbes, x_train, y_train, subsets, settings, cfg: ProbeConfig) -> None:
    """Every (setting, seed) probe of ``grid`` (setting-major: probe ``g * S + s``) from its Adam weights to
    the optimum of its objective, in place (float64). One data group when every probe trains on the same
    rows, else one per seed (its own rows, its own standardisation); the probes of a group are polished side
    by side."""
    p_count, d, c = grid.weight.shape
    s_count = p_count // len(settings)
    l2 = torch.tensor([wd for _, wd in settings], dtype=torch.float64).repeat_interleave(s_count)
    y_train = torch.as_tensor(y_train)
    if subsets is None and x_train.ndim == 2:  # one data group of all P probes
        w, b, steps = polish(grid.weight.permute(1, 0, 2).unsqueeze(0), grid.bias.unsqueeze(0), x_train.unsqueeze(0),
                             y_train.unsqueeze(0), l2.unsqueeze(0), cfg.polish_tol, cfg.polish_iters)
        grid.weight, grid.bias, grid.polish_steps = w[0].permute(1, 0, 2).contiguous(), b[0], steps[0].tolist()
        return
    rows = (torch.arange(x_train.shape[-2]).expand(s_count, -1) if subsets is None
            else torch.as_tensor(np.stack(subsets), dtype=torch.int64))
    xs = x_train[torch.arange(s_count).unsqueeze(1), rows] if x_train.ndim == 3 else x_train[rows]  # [S, n, D]
    # probe g * S + s -> data group s, slot g
    w0 = grid.weight.view(-1, s_count, d, c).permute(1, 2, 0, 3)  # [S, D, G, C]
    b0 = grid.bias.view(-1, s_count, c).transpose(0, 1)  # [S, G, C]
    w, b, steps = polish(w0, b0, xs, y_train[rows], l2.view(-1, s_count).t(), cfg.polish_tol, cfg.polish_iters)
    grid.weight = w.permute(2, 0, 1, 3).reshape(p_count, d, c).contiguous()
    grid.bias = b.transpose(0, 1).reshape(p_count, c).contiguous()
    grid.polish_steps = steps.t().reshape(-1).tolist()


def _choose_on_val(grid: TrainedProbes, x_val, y_val, n_classes: int, s_count: int, cfg: ProbeConfig,
                   settings: list[tuple[float, float]]) -> TrainedProbes:
    """Grid probes (setting-major: probe g * S + s) -> per seed s the setting the shared rule picks on the
    validation split (``select.choose``: best macro F1 among settings that predict more than one class, then
    the lower validation loss, then the stronger penalty; MAE / I-JEPA pick the probe's optimiser settings
    on held-out data, and ``logreg`` picks its C by the same rule)."""
    with torch.no_grad():
        xv = x_val if x_val.ndim == 3 else x_val.unsqueeze(0)
        xv = xv[torch.arange(len(grid.seeds)) % xv.shape[0]] if xv.shape[0] > 1 else xv
        logits = torch.matmul(xv.to(grid.weight.dtype), grid.weight) + grid.bias.unsqueeze(1)
        yv_t = torch.as_tensor(y_val)
        losses = F.cross_entropy(logits.transpose(1, 2), yv_t.expand(logits.shape[0], -1),
                                 reduction="none").mean(1).tolist()
        preds = logits.argmax(-1).numpy()
    yv = yv_t.numpy()
    f1 = [macro_f1(yv, p, n_classes) for p in preds]
    flat = [one_class(p) for p in preds]
    strength = [wd for _, wd in settings]
    chosen = []
    for s in range(s_count):
        ps = [g * s_count + s for g in range(len(settings))]
        chosen.append(ps[choose([f1[p] for p in ps], [losses[p] for p in ps], [flat[p] for p in ps], strength)])
    pick = torch.tensor(chosen)
    c_of = cfg.c_of_settings()
    return TrainedProbes(weight=grid.weight[pick].clone(), bias=grid.bias[pick].clone(),
                         seeds=grid.seeds[:s_count], best_epoch=[grid.best_epoch[p] for p in chosen],
                         epochs_run=[grid.epochs_run[p] for p in chosen],
                         best_val_loss=[losses[p] for p in chosen],
                         lr=[settings[p // s_count][0] for p in chosen],
                         weight_decay=[settings[p // s_count][1] for p in chosen],
                         val_macro_f1=[f1[p] for p in chosen],
                         c=[c_of[p // s_count] for p in chosen],
                         polish_steps=[grid.polish_steps[p] if grid.polish_steps else 0 for p in chosen])


def _train(x_train, y_train, x_val, y_val, n_classes, seeds, cfg, subsets, settings) -> TrainedProbes:
    """Every (setting, seed) probe side by side: probe ``g * S + s`` trains seed s (its init and sample order)
    at grid setting g. ``x_train`` / ``x_val``: [N, D] shared by all seeds, or [S, N, D] one (standardised)
    copy per seed. Returns all ``G * S`` probes, in that order."""
    s_count, d = len(seeds), x_train.shape[-1]
    p_count = len(settings) * s_count
    per_seed = x_train.ndim == 3
    seed_of = torch.arange(p_count) % s_count  # probe -> its seed's row
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    inits = [_init_linear(g, d, n_classes) for g in gens]
    weight = torch.stack([w for w, _ in inits])[seed_of].contiguous()
    bias = torch.stack([b for _, b in inits])[seed_of].contiguous()
    if subsets is None:
        rows = torch.arange(x_train.shape[-2]).expand(s_count, -1)
    else:
        if len(subsets) != s_count or len({len(s) for s in subsets}) != 1:
            raise ValueError("one subset per seed, all of the same length")
        rows = torch.as_tensor(np.stack(subsets), dtype=torch.int64)
    n = rows.shape[1]
    if n == 0:
        raise ValueError("empty training set")

    lr = torch.tensor([lr for lr, _ in settings]).repeat_interleave(s_count)
    wd = torch.tensor([wd for _, wd in settings]).repeat_interleave(s_count)
    opt = BatchedAdam([weight, bias], lr, wd)
    best_w, best_b = weight.clone(), bias.clone()
    best_loss = torch.full((p_count,), float("inf"))
    best_epoch = [0] * p_count
    epochs_run = [cfg.max_epochs] * p_count
    since_best = torch.zeros(p_count, dtype=torch.int64)
    stopped = torch.zeros(p_count, dtype=torch.bool)
    y_val_rep = y_val.repeat(p_count)
    x_val_p = x_val[seed_of] if per_seed else x_val.unsqueeze(0)
    first_kept = cfg.first_kept_epoch

    for epoch in range(1, cfg.max_epochs + 1):
        order = torch.stack([rows[i, torch.randperm(n, generator=gens[i])] for i in range(s_count)])[seed_of]
        lr_factor = cosine_factor(epoch, cfg.max_epochs)
        with torch.no_grad():
            for start in range(0, n, cfg.batch_size):
                idx = order[:, start:start + cfg.batch_size]  # [P, b]
                xb = x_train[seed_of.unsqueeze(1), idx] if per_seed else x_train[idx]  # [P, b, D]
                opt.step(list(cross_entropy_grads(xb, y_train[idx], weight, bias)), lr_factor)
            if epoch < first_kept:  # too early to keep or to count patience from
                continue
            val_logits = torch.matmul(x_val_p, weight) + bias.unsqueeze(1)
            val_loss = F.cross_entropy(val_logits.reshape(-1, n_classes), y_val_rep,
                                       reduction="none").view(p_count, -1).mean(1)
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
    return TrainedProbes(weight=best_w, bias=best_b, seeds=[int(seeds[i]) for i in seed_of.tolist()],
                         best_epoch=best_epoch, epochs_run=epochs_run, best_val_loss=best_loss.tolist())
