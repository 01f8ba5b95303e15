"""The reference classifier beside our linear probe: scikit-learn's multinomial logistic regression.

On the same cached features and split as ``linear.py``: features standardised with the training split's
statistics (``StandardScaler``), ``LogisticRegression`` (L-BFGS, multinomial for ≥ 3 classes; for 2 classes
the binomial model is the same thing), and ``C`` (inverse L2 strength) chosen from a log grid by macro F1 on
the validation split (ties: lower validation log-loss, then the smaller ``C``). L-BFGS is deterministic,
so on the full training set every seed gives the same model; seeds differ only where their training rows
differ (few-shot subsets). It is the yardstick: when our probe and this one disagree by more than a few
points on the same features, one of them is not converged or not tuned.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from usjepa.probe.metrics import macro_f1

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
MAX_ITER = 1000


@dataclass
class LogRegProbes:
    models: list  # one fitted (scaler, LogisticRegression) per seed
    seeds: list[int]
    chosen_c: list[float]
    val_macro_f1: list[float]

    def predict(self, x) -> np.ndarray:
        """Raw features [N, D] -> predicted classes [S, N]."""
        x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return np.stack([clf.predict(scaler.transform(x)) for scaler, clf in self.models])

    def seed_info(self, i: int) -> dict:
        return {"C": self.chosen_c[i], "val_macro_f1": self.val_macro_f1[i]}


def _fit_one(x_tr, y_tr, x_va, y_va, n_classes: int, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_tr)
    xt, xv = scaler.transform(x_tr), scaler.transform(x_va)
    best = None
    for c in C_GRID:
        clf = LogisticRegression(C=c, solver="lbfgs", max_iter=MAX_ITER, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning at the weakest regularisation: judged on val
            clf.fit(xt, y_tr)
        f1 = macro_f1(y_va, clf.predict(xv), n_classes)
        loss = log_loss(y_va, clf.predict_proba(xv), labels=clf.classes_)
        rank = (-f1, loss, c)
        if best is None or rank < best[0]:
            best = (rank, clf, c, f1)
    _, clf, c, f1 = best
    return (scaler, clf), c, f1


def train_logreg_probes(x_train, y_train, x_val, y_val, n_classes: int, seeds: list[int],
                        subsets: list[np.ndarray] | None = None) -> LogRegProbes:
    """One model per seed (``subsets[s]``: that seed's training rows); identical inputs are fitted once."""
    to_np = (lambda a: a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a))
    x_tr, y_tr, x_va, y_va = map(to_np, (x_train, y_train, x_val, y_val))
    x_tr, x_va = x_tr.astype(np.float64), x_va.astype(np.float64)
    fitted: dict[bytes, tuple] = {}
    models, cs, f1s = [], [], []
    for k, seed in enumerate(seeds):
        rows = np.arange(len(x_tr)) if subsets is None else np.asarray(subsets[k])
        memo = rows.tobytes()
        if memo not in fitted:  # L-BFGS is deterministic: same rows, same model
            fitted[memo] = _fit_one(x_tr[rows], y_tr[rows], x_va, y_va, n_classes, int(seed))
        model, c, f1 = fitted[memo]
        models.append(model)
        cs.append(c)
        f1s.append(f1)
    return LogRegProbes(models=models, seeds=list(seeds), chosen_c=cs, val_macro_f1=f1s)
