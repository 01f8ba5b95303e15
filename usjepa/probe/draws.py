"""Error bars over grouped split draws and paired comparisons of encoders on the same draws.

On a small test set (~90 patients' images, a handful of videos) which groups happen to be held out moves a
score by 5-10 points, more than the gaps between encoders; the spread over probe seeds, which share one
split, misses it. So the probe repeats over several grouped split draws (``load_labelled(split_seed=k)``;
the features are extracted once and reused) and reports the mean ± std of the per-draw scores. Two encoders
are compared on the same draws: the paired difference removes the variance the draws give both, and an
encoder is said to win only when the mean paired difference exceeds its own spread (std over draws).
"""

from __future__ import annotations

import numpy as np

from usjepa.probe.metrics import mean_std


def summarise_draws(per_draw: list[dict], classes: list[str], draw_ids: list[int] | None = None) -> dict:
    """Per-draw classifier summaries (``run._summarise``: mean over seeds) -> mean ± std over draws.

    ``per_draw`` / ``per_draw_accuracy`` keep each draw's seed mean and ``draw_ids`` which draw it was (the
    paired comparisons match draws by id);
    ``probe_seed_std`` is the mean within-draw spread over seeds, for contrast."""
    f1 = [d["macro_f1"]["mean"] for d in per_draw]
    acc = [d["accuracy"]["mean"] for d in per_draw]
    draw_ids = list(range(len(per_draw))) if draw_ids is None else list(draw_ids)
    seeds = [{**s, "split_draw": k} for k, d in zip(draw_ids, per_draw) for s in d["seeds"]]
    return {
        "macro_f1": mean_std(f1), "accuracy": mean_std(acc),
        "per_class_f1": {c: mean_std([d["per_class_f1"][c]["mean"] for d in per_draw]) for c in classes},
        "degenerate_seeds": sum(d["degenerate_seeds"] for d in per_draw),
        "draws": len(per_draw), "draw_ids": draw_ids, "per_draw": f1, "per_draw_accuracy": acc,
        "probe_seed_std": float(np.mean([d["macro_f1"]["std"] for d in per_draw])),
        "seeds": seeds,
    }


def paired_difference(a: list[float], b: list[float]) -> dict:
    """a - b draw by draw: mean ± std of the differences, draws a won, and ``decided``: whether the mean
    difference exceeds its spread (|mean| > std, with at least two draws)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores need the same draws on both sides, got {len(a)} and {len(b)}")
    diff = np.subtract(a, b)
    stat = mean_std(diff)
    return {**stat, "wins": int((diff > 0).sum()), "draws": len(diff),
            "decided": bool(len(diff) > 1 and abs(stat["mean"]) > stat["std"])}


def verdict(name_a: str, name_b: str, p: dict) -> str:
    """One line for the report: which encoder wins, or that the draws cannot tell."""
    diff = f"{100 * p['mean']:+.1f} ± {100 * p['std']:.1f} points, {name_a} ahead on {p['wins']}/{p['draws']} draws"
    if not p["decided"]:
        return f"{name_a} vs {name_b}: {diff} — not separated (the difference is within its spread)"
    winner, loser = (name_a, name_b) if p["mean"] > 0 else (name_b, name_a)
    return f"{name_a} vs {name_b}: {diff} — **{winner} > {loser}**"


def pairwise(results: dict, encoders: list[str], classifier: str) -> list[dict]:
    """Every pair of encoders (in the given order) with a summary for ``classifier`` in ``results``
    ({encoder: {classifier: summarise_draws(...)}}): their paired macro-F1 differences."""
    have = [e for e in encoders if "per_draw" in (results.get(e, {}).get(classifier) or {})]
    out = []
    for i, a in enumerate(have):
        for b in have[i + 1:]:
            ra, rb = results[a][classifier], results[b][classifier]
            fa, fb = dict(zip(ra["draw_ids"], ra["per_draw"])), dict(zip(rb["draw_ids"], rb["per_draw"]))
            common = [k for k in ra["draw_ids"] if k in fb]
            if not common:
                continue
            p = paired_difference([fa[k] for k in common], [fb[k] for k in common])
            out.append({"a": a, "b": b, **p, "verdict": verdict(a, b, p)})
    return out
