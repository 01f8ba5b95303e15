"""The reference classifier beside our linear probe: scikit-learn's multinomial logistic regression.

On the same cached features and split as ``linear.py``: features standardised with the training split's
statistics (``StandardScaler``), ``LogisticRegression`` (L-BFGS, multinomial for ≥ 3 classes; for 2 classes
the binomial model is the same thing), and ``C`` (inverse L2 strength) chosen from the grid both
classifiers share by the rule both share (``select.py``: best validation macro F1 among the C that predict
more than one class, ties by validation log-loss, then the smaller C). L-BFGS is deterministic, so on the
full training set every seed gives the same model; seeds differ only where their training rows differ
(few-shot subsets). It is the yardstick: when our probe and this one disagree by more than a few points on
the same features, one of them is not converged or not tuned.

Converged to ``TOL`` (scikit-learn's default 1e-4 stops early: on 768-d features its predictions differed
from the optimum's on up to 2 % of test images at C = 1 and 5 % at C = 10), so that the reference is the
optimum the probe is held to, not a point on the way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from usjepa.probe.metrics import macro_f1
from usjepa.probe.select import C_GRID, choose, one_class

TOL = 1e-6  # L-BFGS stops when max |gradient of the mean loss| ≤ TOL
MAX_ITER = 5000


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
    fits, f1s, losses, flat = [], [], [], []
    for c in C_GRID:
        clf = LogisticRegression(C=c, solver="lbfgs", tol=TOL, max_iter=MAX_ITER, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a ConvergenceWarning at the weakest penalty: judged on val
            clf.fit(xt, y_tr)
        pred = clf.predict(xv)
        fits.append(clf)
        f1s.append(macro_f1(y_va, pred, n_classes))
        losses.append(log_loss(y_va, clf.predict_proba(xv), labels=clf.classes_))
        flat.append(one_class(pred))
    k = choose(f1s, losses, flat, [1.0 / c for c in C_GRID])
    return (scaler, fits[k]), C_GRID[k], f1s[k]


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
