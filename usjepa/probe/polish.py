"""The probe's finishing phase: full-batch L-BFGS on each probe's own regularised objective, all at once.

Why: a linear probe with an L2 penalty is a strictly convex problem, and logistic regression (the
reference) is its exact optimum. Minibatch Adam with early stopping gets near it but not onto it — after
150 epochs at lr 1e-2 the probe still predicted another class than the optimum for up to 1-8 % of the test
images at C ≤ 0.1 and 4-18 % at C = 1 (synthetic stills, DDTI; at lr 1e-3 up to 37 %), which on a 9-frame
POCUS test split or a 57-image one is several macro-F1 points. From the weights Adam kept, this phase runs to the
optimum (max |gradient| ≤ ``tol``), so the probe's score is a property of the features and the chosen
strength, not of where the minibatch noise left it; the Adam phase is the warm start.

Batched: probe q of data group b has parameters ``W[b, :, q, :]``, ``bias[b, q]``; a data group is one
training matrix ``x[b]`` (one for every probe, or one per seed when each seed standardises its own few-shot
subset). Every probe has its own L-BFGS history, curvature scaling and Armijo backtracking step, and stops
on its own; the arithmetic is element-wise or per-probe reductions, so a probe ends where it would alone.
The forward and backward passes are one ``bmm`` each over all probes. float64 throughout: the last digits
decide the argmax of near-tied logits.
"""

from __future__ import annotations

import torch

HISTORY = 10  # (s, y) pairs kept per probe, as scikit-learn's L-BFGS (maxcor=10)
ARMIJO = 1e-4
MAX_HALVINGS = 40


def _objective(theta, x, y, l2, d, c):
    """Mean cross-entropy + λ/2 |W|² and its gradient, per probe. ``theta`` [B, Q, D*C + C]; x [B, n, D];
    y [B, n]; l2 [B, Q]."""
    bsz, q = theta.shape[:2]
    w = theta[..., :d * c].reshape(bsz, q, d, c)
    b = theta[..., d * c:]
    logits = torch.bmm(x, w.permute(0, 2, 1, 3).reshape(bsz, d, q * c)).view(bsz, -1, q, c) + b.unsqueeze(1)
    lse = logits.logsumexp(-1)  # [B, n, Q]
    idx = y.view(bsz, -1, 1, 1).expand(-1, -1, q, 1)
    n = x.shape[1]
    f = (lse - logits.gather(-1, idx).squeeze(-1)).mean(1) + 0.5 * l2 * (w * w).sum((-2, -1))
    p = (logits - lse.unsqueeze(-1)).exp_()
    p.scatter_add_(-1, idx, torch.full_like(p[..., :1], -1.0)).div_(n)  # d mean CE / d logits
    gw = torch.bmm(x.transpose(1, 2), p.reshape(bsz, n, q * c)).view(bsz, d, q, c).permute(0, 2, 1, 3)
    g = torch.cat([(gw + l2[..., None, None] * w).reshape(bsz, q, d * c), p.sum(1)], -1)
    return f, g


def polish(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor, l2: torch.Tensor,
           tol: float = 1e-7, max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimise every probe's objective from (``weight`` [B, D, Q, C], ``bias`` [B, Q, C]) on its data group
    (``x`` [B, n, D], ``y`` [B, n]) with its λ (``l2`` [B, Q]). Returns the weights, the biases (same shapes,
    float64) and the L-BFGS steps each probe took [B, Q] (``max_iter`` means it stopped on the budget)."""
    bsz, d, q, c = weight.shape
    x, l2 = x.double(), l2.double()
    theta = torch.cat([weight.double().permute(0, 2, 1, 3).reshape(bsz, q, d * c), bias.double()], -1)
    f, g = _objective(theta, x, y, l2, d, c)
    steps = torch.zeros(bsz, q, dtype=torch.int64)
    active = g.abs().amax(-1) > tol
    hist: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (s, y, rho); rho 0 = pair unused
    h0 = 1.0 / (0.25 + l2)  # first step: the inverse of the cross-entropy Hessian's diagonal bound (+ λ)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        # two-loop recursion, per probe
        r = g.clone()
        alphas = []
        for s_k, y_k, rho_k in reversed(hist):
            a = rho_k * (s_k * r).sum(-1)
            r -= a.unsqueeze(-1) * y_k
            alphas.append(a)
        if hist:
            s_k, y_k, rho_k = hist[-1]
            yy = (y_k * y_k).sum(-1)
            gamma = torch.where((rho_k > 0) & (yy > 0), 1.0 / (rho_k * yy).clamp_min(1e-300), h0)
        else:
            gamma = h0
        r *= gamma.unsqueeze(-1)
        for (s_k, y_k, rho_k), a in zip(hist, reversed(alphas)):
            r += (a - rho_k * (y_k * r).sum(-1)).unsqueeze(-1) * s_k
        direction = -r
        slope = (g * direction).sum(-1)
        uphill = slope >= 0  # stale curvature: restart that probe from the gradient
        if bool(uphill.any()):
            direction = torch.where(uphill.unsqueeze(-1), -h0.unsqueeze(-1) * g, direction)
            slope = torch.where(uphill, (g * direction).sum(-1), slope)
            hist = [(s_k, y_k, torch.where(uphill, 0.0, rho_k)) for s_k, y_k, rho_k in hist]
        direction = direction * active.unsqueeze(-1)
        # Armijo backtracking with a step per probe
        t = torch.ones_like(f)
        for _ in range(MAX_HALVINGS):
            f_new, g_new = _objective(theta + t.unsqueeze(-1) * direction, x, y, l2, d, c)
            ok = (f_new <= f + ARMIJO * t * slope) | ~active
            if bool(ok.all()):
                break
            t = torch.where(ok, t, 0.5 * t)
        moved = ok & active
        s_new = t.unsqueeze(-1) * direction * moved.unsqueeze(-1)
        y_new = torch.where(moved.unsqueeze(-1), g_new - g, torch.zeros_like(g))
        sy = (s_new * y_new).sum(-1)
        hist.append((s_new, y_new, torch.where(sy > 1e-300, 1.0 / sy.clamp_min(1e-300), 0.0)))
        hist = hist[-HISTORY:]
        theta = theta + s_new
        f = torch.where(moved, f_new, f)
        g = torch.where(moved.unsqueeze(-1), g_new, g)
        steps += active.long()
        # done: gradient small, or no step that decreases the objective (it is at float64's floor)
        active &= (g.abs().amax(-1) > tol) & ok
    w = theta[..., :d * c].reshape(bsz, q, d, c).permute(0, 2, 1, 3).contiguous()
    return w, theta[..., d * c:].contiguous(), steps
