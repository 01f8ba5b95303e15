"""Probe results -> markdown tables (shaped like the paper's Table 2) and PNG curves (Figures 3 and 4).

Numbers are percentages, mean ± std over seeds; in each column the best mean is bold and the second
underlined, as in the paper. A zero spread over several seeds is written ``± 0 (=)`` (not measured, not
"no variance"), and a cell where any seed collapsed to one class is marked ``⚠k/n`` and never ranked.
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


CLASSIFIER_NAMES = {"linear": "linear (ours)", "logreg": "logreg (sklearn)"}
EQUAL_MARK = "(=)"
FLAG_MARK = "⚠"


def cell(summary: dict | None, metric: str = "macro_f1") -> dict | None:
    """A table cell from a classifier summary: mean, std, seeds and how many of them collapsed."""
    if summary is None:
        return None
    n_seeds = len(summary.get("seeds", [])) or 1
    return {**summary[metric], "n_seeds": summary.get("draws", n_seeds), "n_flag": n_seeds,
            "degenerate": int(summary.get("degenerate_seeds", 0))}


def _pm(stat: dict) -> str:
    n = stat.get("n_seeds", 1)
    if n > 1 and stat["std"] == 0.0:
        text = f"{100 * stat['mean']:.1f} ± 0 {EQUAL_MARK}"
    else:
        text = f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"
    if stat.get("degenerate"):
        text += f" {FLAG_MARK}{stat['degenerate']}/{stat.get('n_flag', n)}"
    return text


def _ranked_column(cells: dict[str, dict | None]) -> dict[str, str]:
    """Encoder -> formatted cell, best mean bold, second underlined (only when there are ≥ 3 rows); cells
    with a collapsed seed are never ranked."""
    rankable = {e: s for e, s in cells.items() if s is not None and not s.get("degenerate")}
    means = sorted({round(100 * s["mean"], 1) for s in rankable.values()}, reverse=True)
    out = {}
    for enc, s in cells.items():
        if s is None:
            out[enc] = "–"
            continue
        text, m = _pm(s), round(100 * s["mean"], 1)
        if enc in rankable and len(cells) > 1 and m == means[0]:
            text = f"**{text}**"
        elif enc in rankable and len(cells) > 2 and len(means) > 1 and m == means[1]:
            text = f"<u>{text}</u>"
        out[enc] = text
    return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _grid(encoders: list[str], columns: list[tuple[str, dict]]) -> list[str]:
    """Rows = encoders, one column per (title, {encoder: cell}), each column ranked."""
    ranked = [(title, _ranked_column(cells)) for title, cells in columns]
    rows = [[enc] + [col[enc] for _, col in ranked] for enc in encoders]
    return _table(["Model"] + [t for t, _ in ranked], rows)


def _footnotes(res: dict) -> list[str]:
    text = "\n".join(_all_cells(res))
    notes = []
    if EQUAL_MARK in text:
        notes.append(f"{EQUAL_MARK}: every seed (or split draw) gave the same score, so the spread is not measured "
                     f"(logreg on the full training set has no seed spread: L-BFGS is deterministic).")
    if FLAG_MARK in text:
        notes.append(f"{FLAG_MARK}k/n: k of the n seeds (all draws) predicted one class for ≥ "
                     f"{100 * res['protocol'].get('degenerate_share', 0.8):.0f} % of the test set or never got a "
                     f"class right (its F1 0) — a collapsed probe, not a result; such cells are never bold or "
                     f"underlined.")
    return notes


def _all_cells(res: dict):
    for d in res["results"].values():
        for r in d.values():
            for clf in res["protocol"]["classifiers"]:
                if clf in r:
                    yield _pm(cell(r[clf]))


def _braces(values) -> str:
    return "{" + ", ".join(f"{v:g}" for v in values) + "}"


def _protocol_text(proto: dict) -> str:
    p = proto["probe"]
    parts = []
    if "linear" in proto["classifiers"]:
        grid = (f"lr {_braces(p['lr_grid'])} × λ {_braces(p['wd_grid'])}" if p.get("wd_grid") is not None
                else f"lr {_braces(p['lr_grid'])} × λ = 1/(C·N), C {_braces(p['c_grid'])}")
        parts.append(f"**linear** — ours, Table 6: a linear layer per seed (Adam + L2 on the weights, {grid}, "
                     f"batch {p['batch_size']}, cosine, ≤ {p['max_epochs']} epochs, "
                     f"early stopping on validation loss with patience {p['patience']}, no epoch before "
                     f"{p['min_epochs']} kept"
                     + (f"; then L-BFGS to the optimum (≤ {p['polish_iters']} steps)" if p.get("polish_iters") else "")
                     + "; the setting chosen per seed by the rule logreg uses)")
    if "logreg" in proto["classifiers"]:
        grid = ", ".join(f"{c:g}" for c in proto.get("logreg_c_grid", []))
        parts.append(f"**logreg** — scikit-learn's multinomial logistic regression (L-BFGS), C from {{{grid}}} "
                     f"by validation macro F1 (settings predicting one class on validation last; ties: "
                     f"validation loss, then the smaller C)")
    norm = ("features standardised with the training split's mean and std" if proto.get("normalise", True)
            else "raw features (no standardisation)")
    draws = proto.get("split_draws", 1)
    spread = (f"mean ± std over {draws} grouped split draws (each the mean over {len(proto['seeds'])} seed(s); "
              f"few-shot and robustness: the first draw, over seeds)" if draws > 1
              else f"mean ± std over {len(proto['seeds'])} seed(s)")
    return (f"Frozen encoders, {proto['pooling']}-pooled features, {norm}; " + "; ".join(parts)
            + f". Test-set macro F1 %, {spread}.")


def markdown_report(res: dict) -> str:
    encoders = list(res["encoders"])
    datasets = list(res["datasets"])
    clfs = res["protocol"]["classifiers"]
    r = res["results"]

    def col(d, clf, *keys, metric="macro_f1"):
        return {e: cell(_get(r[d][e], clf, *keys), metric) for e in encoders}

    def title(d, clf):
        return f"{d} · {clf}" if len(clfs) > 1 else d

    lines = ["# Linear probe", "", _protocol_text(res["protocol"]), ""]
    lines += _grid(encoders, [(title(d, c), col(d, c)) for d in datasets for c in clfs])
    if len(encoders) > 1 and res["protocol"].get("split_draws", 1) > 1:
        lines += ["", "Paired macro-F1 differences on the same split draws (mean ± std over draws; an encoder "
                  "wins only where the difference exceeds its spread):", ""]
        lines += [f"- {d} · {c}: {p['verdict']}" for d in datasets for c in clfs
                  for p in res.get("paired", {}).get(d, {}).get(c, [])]
    lines += ["", "Accuracy %:", ""]
    lines += _grid(encoders, [(title(d, c), col(d, c, metric="accuracy")) for d in datasets for c in clfs])
    for d in datasets:
        info = res["datasets"][d]
        counts, frames = info["counts"], info.get("frames", info["counts"])
        sizes = ", ".join(f"{s} {sum(frames[s].values())}" for s in ("train", "val", "test"))
        leak = info["leakage"]
        skipped = info.get("skipped", [])
        lines += ["", f"## {d}", "",
                  f"`{info['root']}` — {len(info['classes'])} classes, "
                  f"{sum(sum(c.values()) for c in counts.values())} labelled files, frames: {sizes}. "
                  f"Split: {info['split_source']}; grouping: {info['grouping']}.", "",
                  f"Leakage check: {leak['sources']} sources, {leak['groups']} groups; sources found in two "
                  f"splits: {leak['sources_in_two_splits']}, groups found in two splits: "
                  f"{leak['groups_in_two_splits']}, duplicate-image groups found in two splits: "
                  f"{leak.get('duplicates_in_two_splits', 0)}.", "",
                  _duplicates_line(info.get("duplicates") or {}), "",
                  f"Skipped: {len(skipped)} frame(s)/file(s)" + (":" if skipped else ".")]
        for s in skipped[:10]:
            where = s["path"] + (f" frame {s['frame']}" if s.get("frame") is not None else "")
            lines.append(f"- `{where}`: {s['reason']}")
        if len(skipped) > 10:
            lines.append(f"- … and {len(skipped) - 10} more (all in probe_results.json)")
        for c in clfs:
            name = CLASSIFIER_NAMES[c]
            lines += ["", f"Per-class F1 %, {name}:", ""]
            lines += _grid(encoders, [(k, {e: _class_cell(r[d][e].get(c), k) for e in encoders})
                                      for k in info["classes"]])
            if any("fewshot" in (r[d][e].get(c) or {}) for e in encoders):
                fracs = list(next(r[d][e][c]["fewshot"] for e in encoders if "fewshot" in r[d][e].get(c, {})))
                lines += ["", f"Few-shot macro F1 %, {name} (fraction of training frames, stratified):", ""]
                lines += _grid(encoders, [(f"{100 * float(f):g} %", col(d, c, "fewshot", f)) for f in fracs])
            if any("robustness" in (r[d][e].get(c) or {}) for e in encoders):
                first = next(r[d][e][c]["robustness"] for e in encoders if "robustness" in r[d][e].get(c, {}))
                cols = [("clean", col(d, c))]
                cols += [(f"{kind} ε={eps}", col(d, c, "robustness", kind, eps))
                         for kind, levels in first.items() for eps in levels]
                lines += ["", f"Robustness, macro F1 % on the corrupted test set, {name} (trained on clean "
                          f"data):", ""]
                lines += _grid(encoders, cols)
    notes = _footnotes(res)
    if notes:
        lines += [""] + notes
    lines += ["", "Encoders:", ""]
    lines += [f"- **{e}**: `{info['spec']}` — {info['description']}" for e, info in res["encoders"].items()]
    return "\n".join(lines) + "\n"


def _duplicates_line(dup: dict) -> str:
    if not dup:
        return "Duplicate images: not checked."
    text = (f"Duplicate images (dHash, ≤ {dup['near_bits']} of 64 bits apart): {dup['clusters']} group(s) among "
            f"{dup['stills_hashed']} stills, {dup['files_in_clusters']} files, {dup['exact_clusters']} identical, "
            f"{dup['clusters_with_two_labels']} carrying two labels; each group is kept in one split.")
    return text + "".join(f" E.g. {' = '.join(e)}." for e in dup["examples"][:2])


def _class_cell(summary: dict | None, cls: str) -> dict | None:
    if summary is None:
        return None
    return {**summary["per_class_f1"][cls], "n_seeds": summary.get("draws", len(summary["seeds"])),
            "n_flag": len(summary["seeds"]), "degenerate": int(summary.get("degenerate_seeds", 0))}


LINESTYLES = {"linear": "-", "logreg": "--"}


def _curves(res: dict, dataset: str, part: str):
    """(label, classifier, results) for every encoder × classifier that has ``part`` (fewshot/robustness)."""
    clfs = res["protocol"]["classifiers"]
    for enc, rr in res["results"][dataset].items():
        for c in clfs:
            if (rr.get(c) or {}).get(part):
                yield (f"{enc} · {c}" if len(clfs) > 1 else enc), c, rr[c]


def plot_fewshot(res: dict, dataset: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for label, clf, rr in _curves(res, dataset, "fewshot"):
        fs = rr["fewshot"]
        x = [100 * float(f) for f in fs]
        m = [100 * fs[f]["macro_f1"]["mean"] for f in fs]
        s = [100 * fs[f]["macro_f1"]["std"] for f in fs]
        line, = ax.plot(x, m, marker="o", linestyle=LINESTYLES[clf], label=label)
        ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.15,
                        color=line.get_color())
    ax.set_xscale("log")
    ax.set_xticks([1, 5, 10, 50, 100], ["1", "5", "10", "50", "100"])
    ax.set_xlabel("training labels (%)")
    ax.set_ylabel("macro F1 (%)")
    ax.set_title(f"Few-shot probe — {dataset}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_robustness(res: dict, dataset: str, path: Path) -> Path:
    curves = list(_curves(res, dataset, "robustness"))
    kinds = list(curves[0][2]["robustness"]) if curves else []
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(4 * max(1, len(kinds)), 3.4), dpi=120, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for label, clf, rr in curves:
            clean, levels = rr["macro_f1"], rr["robustness"][kind]
            x = [0.0] + [float(e) for e in levels]
            m = [100 * clean["mean"]] + [100 * levels[e]["macro_f1"]["mean"] for e in levels]
            s = [100 * clean["std"]] + [100 * levels[e]["macro_f1"]["std"] for e in levels]
            ax.errorbar(x, m, yerr=s, marker="o", capsize=3, linestyle=LINESTYLES[clf], label=label)
        ax.set_title(kind)
        ax.set_xlabel("severity ε (0 = clean)")
        ax.set_xticks([0, 1, 2, 3])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("macro F1 (%)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"Robustness to corruption — {dataset}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
