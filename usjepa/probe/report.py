"""Probe results -> markdown tables (shaped like the paper's Table 2) and PNG curves (Figures 3 and 4).

Numbers are percentages, mean ± std over seeds; in each column the best mean is bold and the second
underlined, as in the paper.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402


def _get(d: dict, *keys):
    """Nested lookup that gives None where an encoder lacks a result."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _pm(stat: dict) -> str:
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def _ranked_column(cells: dict[str, dict | None]) -> dict[str, str]:
    """Encoder -> formatted cell, best mean bold, second underlined (only when there are ≥ 3 rows)."""
    means = sorted({round(100 * s["mean"], 1) for s in cells.values() if s is not None}, reverse=True)
    out = {}
    for enc, s in cells.items():
        if s is None:
            out[enc] = "–"
            continue
        text, m = _pm(s), round(100 * s["mean"], 1)
        if len(cells) > 1 and means and m == means[0]:
            text = f"**{text}**"
        elif len(cells) > 2 and len(means) > 1 and m == means[1]:
            text = f"<u>{text}</u>"
        out[enc] = text
    return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _grid(encoders: list[str], columns: list[tuple[str, dict]]) -> list[str]:
    """Rows = encoders, one column per (title, {encoder: stat}), each column ranked."""
    ranked = [(title, _ranked_column(cells)) for title, cells in columns]
    rows = [[enc] + [col[enc] for _, col in ranked] for enc in encoders]
    return _table(["Model"] + [t for t, _ in ranked], rows)


def markdown_report(res: dict) -> str:
    encoders = list(res["encoders"])
    datasets = list(res["datasets"])
    r = res["results"]
    proto = res["protocol"]
    n_seeds = len(proto["seeds"])
    lines = [
        "# Linear probe",
        "",
        f"Frozen encoders, {proto['pooling']}-pooled features, a linear layer trained per seed "
        f"(AdamW lr {proto['probe']['lr']:g}, wd {proto['probe']['weight_decay']:g}, batch "
        f"{proto['probe']['batch_size']}, cosine, ≤ {proto['probe']['max_epochs']} epochs, early stopping on "
        f"validation loss with patience {proto['probe']['patience']}). Test-set macro F1 %, mean ± std over "
        f"{n_seeds} seed(s).",
        "",
    ]
    lines += _grid(encoders, [(d, {e: r[d][e]["linear"]["macro_f1"] for e in encoders}) for d in datasets])
    lines += ["", "Accuracy %:", ""]
    lines += _grid(encoders, [(d, {e: r[d][e]["linear"]["accuracy"] for e in encoders}) for d in datasets])
    for d in datasets:
        info = res["datasets"][d]
        counts = info["counts"]
        sizes = ", ".join(f"{s} {sum(counts[s].values())}" for s in ("train", "val", "test"))
        lines += ["", f"## {d}", "", f"`{info['root']}` — {len(info['classes'])} classes, {sizes} "
                  f"(split: {info['split_source']}).", "", "Per-class F1 %:", ""]
        lines += _grid(encoders, [(c, {e: r[d][e]["linear"]["per_class_f1"][c] for e in encoders})
                                  for c in info["classes"]])
        if any("fewshot" in r[d][e] for e in encoders):
            fracs = list(next(r[d][e]["fewshot"] for e in encoders if "fewshot" in r[d][e]))
            lines += ["", "Few-shot macro F1 % (fraction of training labels, stratified):", ""]
            lines += _grid(encoders, [(f"{100 * float(f):g} %", {e: _get(r[d][e], "fewshot", f, "macro_f1")
                                                               for e in encoders}) for f in fracs])
        if any("robustness" in r[d][e] for e in encoders):
            first = next(r[d][e]["robustness"] for e in encoders if "robustness" in r[d][e])
            cols = [("clean", {e: r[d][e]["linear"]["macro_f1"] for e in encoders})]
            for kind, levels in first.items():
                for eps in levels:
                    cols.append((f"{kind} ε={eps}", {e: _get(r[d][e], "robustness", kind, eps, "macro_f1")
                                                     for e in encoders}))
            lines += ["", "Robustness, macro F1 % on the corrupted test set (probe trained on clean data):", ""]
            lines += _grid(encoders, cols)
    lines += ["", "Encoders:", ""]
    lines += [f"- **{e}**: `{info['spec']}` — {info['description']}" for e, info in res["encoders"].items()]
    return "\n".join(lines) + "\n"


def plot_fewshot(res: dict, dataset: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for enc, rr in res["results"][dataset].items():
        fs = rr.get("fewshot")
        if not fs:
            continue
        x = [100 * float(f) for f in fs]
        m = [100 * fs[f]["macro_f1"]["mean"] for f in fs]
        s = [100 * fs[f]["macro_f1"]["std"] for f in fs]
        ax.plot(x, m, marker="o", label=enc)
        ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.2)
    ax.set_xscale("log")
    ax.set_xticks([1, 5, 10, 50, 100], ["1", "5", "10", "50", "100"])
    ax.set_xlabel("training labels (%)")
    ax.set_ylabel("macro F1 (%)")
    ax.set_title(f"Few-shot linear probe — {dataset}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_robustness(res: dict, dataset: str, path: Path) -> Path:
    per_enc = {e: rr for e, rr in res["results"][dataset].items() if rr.get("robustness")}
    kinds = list(next(iter(per_enc.values()))["robustness"]) if per_enc else []
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(4 * max(1, len(kinds)), 3.4), dpi=120, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for enc, rr in per_enc.items():
            clean = rr["linear"]["macro_f1"]
            levels = rr["robustness"][kind]
            x = [0.0] + [float(e) for e in levels]
            m = [100 * clean["mean"]] + [100 * levels[e]["macro_f1"]["mean"] for e in levels]
            s = [100 * clean["std"]] + [100 * levels[e]["macro_f1"]["std"] for e in levels]
            ax.errorbar(x, m, yerr=s, marker="o", capsize=3, label=enc)
        ax.set_title(kind)
        ax.set_xlabel("severity ε (0 = clean)")
        ax.set_xticks([0, 1, 2, 3])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("macro F1 (%)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"Robustness to corruption — {dataset}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
