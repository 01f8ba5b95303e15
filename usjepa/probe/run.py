"""The evaluation protocol end to end: encoders × labelled datasets -> classifiers -> few-shot / robustness -> files.

``probe_encoders`` is the Python entry point (the demo calls it); ``usjepa-probe`` (``cli.py``) wraps it.
For each dataset and encoder: features of every labelled frame are extracted once (cached); each classifier
(``linear``: our Table 6 probe, all seeds at once; ``logreg``: scikit-learn's logistic regression, the
reference) trains on the training split's features, standardised with their statistics, and scores the
test split per seed. Few-shot trains the same classifiers on stratified fractions of the training frames
(validation split kept whole). Robustness scores the clean-trained classifiers on test features of
corrupted images. A seed that predicts one class for ≥ 80 % of the test set, or never gets a class right,
is flagged (``degenerate``): it is a collapse, not a result, and the report never ranks it. Writes ``probe_results.json``,
``probe_table.md`` and PNG curves into ``out_dir``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from usjepa.probe.data import (DEFAULT_EXCLUDE, DEFAULT_FRACTIONS, DEFAULT_FRAMES_PER_VIDEO, SPLITS, LabelledSet,
                               TooFewSamplesError, check_class_counts, load_labelled)
from usjepa.probe.draws import pairwise, summarise_draws
from usjepa.probe.encoders import load_probe_encoder
from usjepa.probe.features import extract_features, preprocess_dict
from usjepa.probe.linear import ProbeConfig, ProbeSettingsError, train_linear_probes
from usjepa.probe.logreg import train_logreg_probes
from usjepa.probe.metrics import mean_std, scores, stratified_subset
from usjepa.probe.report import markdown_report, plot_fewshot, plot_robustness
from usjepa.probe.select import C_GRID
from usjepa.shards.format import write_json_atomic

log = logging.getLogger(__name__)

FEWSHOT_FRACTIONS = (0.01, 0.05, 0.10, 0.50, 1.0)
CORRUPTIONS = ("blur", "contrast", "speckle")
SEVERITIES = (1, 2, 3)
CLASSIFIERS = ("linear", "logreg")
# A seed predicting one class for this share of the test set, or never getting a class right (its F1 is 0),
# has collapsed: a 64-d head that put 86-93 % of a 3-class test set into one class passed a 95 % flag
# while reversing the encoders' ranking (issue 22).
DEGENERATE_SHARE = 0.80
SPLIT_DRAWS = 10  # grouped split draws every score is repeated over (usjepa.probe.draws)
RESULTS_JSON = "probe_results.json"
RESULTS_MD = "probe_table.md"


def classifier_list(classifier: str) -> tuple[str, ...]:
    if classifier == "both":
        return CLASSIFIERS
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS + ('both',)}, got {classifier!r}")
    return (classifier,)


def _seed_list(seeds) -> list[int]:
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds must be ≥ 1, got {seeds}")
        return list(range(seeds))
    return [int(s) for s in seeds]


def _datasets(data_root) -> dict[str, Path]:
    if isinstance(data_root, dict):
        return {str(k): Path(v) for k, v in data_root.items()}
    roots = [data_root] if isinstance(data_root, (str, os.PathLike)) else list(data_root)
    out: dict[str, Path] = {}
    for r in roots:
        p = Path(r)
        name = p.stem if p.is_file() else Path(os.path.abspath(p)).name
        out[name if name not in out else f"{name}-{len(out)}"] = p
    return out


def _summarise(per_seed: list[dict], classes: list[str]) -> dict:
    return {
        "macro_f1": mean_std([s["macro_f1"] for s in per_seed]),
        "accuracy": mean_std([s["accuracy"] for s in per_seed]),
        "per_class_f1": {c: mean_std([s["per_class_f1"][i] for s in per_seed]) for i, c in enumerate(classes)},
        "degenerate_seeds": sum(s["degenerate"] for s in per_seed),
        "seeds": per_seed,
    }


def score_seeds(fitted, x_test, y_test: np.ndarray, n_classes: int, with_training_info: bool) -> list[dict]:
    """Per-seed test scores; ``degenerate`` marks a collapsed seed: ≥ 80 % of its predictions one class, or
    a class it never gets right (F1 0)."""
    preds = fitted.predict(x_test)
    out = []
    for i, seed in enumerate(fitted.seeds):
        share = float(np.bincount(preds[i], minlength=n_classes).max() / max(1, len(preds[i])))
        sc = scores(y_test, preds[i], n_classes)
        s = {"seed": seed, **sc, "top_class_share": share,
             "degenerate": share >= DEGENERATE_SHARE or min(sc["per_class_f1"]) == 0.0}
        if with_training_info:
            s.update(fitted.seed_info(i))
        out.append(s)
    return out


def _fit(classifier: str, x_tr, y_tr, x_va, y_va, n_classes, seeds, probe_cfg, normalise, subsets=None):
    if classifier == "linear":
        return train_linear_probes(x_tr, y_tr, x_va, y_va, n_classes, seeds, probe_cfg, subsets=subsets,
                                   normalise=normalise)
    return train_logreg_probes(x_tr, y_tr, x_va, y_va, n_classes, seeds, subsets=subsets)


def _default_preprocess():
    from usjepa.ingest.preprocess import PreprocessConfig

    return PreprocessConfig()


def _preprocess_cfg(preprocess):
    if preprocess is None:
        return _default_preprocess()
    if isinstance(preprocess, dict):
        from usjepa.ingest.preprocess import PreprocessConfig

        return PreprocessConfig(**preprocess)
    return preprocess


def _frame_counts(data: LabelledSet, table) -> dict[str, dict[str, int]]:
    out = {s: {c: 0 for c in data.classes} for s in SPLITS}
    for i in table.item:
        it = data.items[int(i)]
        out[it.split][it.label] += 1
    return out


def _split_rows(data: LabelledSet, table) -> dict[str, np.ndarray]:
    row_split = np.array([data.items[int(i)].split for i in table.item])
    return {s: np.flatnonzero(row_split == s) for s in SPLITS}


def probe_dataset(encoder, draws: list[LabelledSet], seeds: list[int], *, preprocess_cfg, pooling: str,
                  probe_cfg: ProbeConfig, classifiers=CLASSIFIERS, normalise: bool = True,
                  fewshot_fractions=(), corruptions=(), severities=SEVERITIES, cache_dir=None,
                  batch_size: int = 32, workers: int | None = None,
                  frames_per_video: int = DEFAULT_FRAMES_PER_VIDEO, precision: str = "auto",
                  progress: bool = False) -> tuple[dict, dict]:
    """One encoder on one labelled set, split ``len(draws)`` ways (the same items, another grouped split
    each): (results, timing). Features are extracted once; every draw trains and scores every classifier,
    few-shot and robustness run on the first draw."""
    data = draws[0]
    n_classes = len(data.classes)
    item_labels = data.labels()
    extract = dict(pooling=pooling, cache_dir=cache_dir, batch_size=batch_size, workers=workers,
                   frames_per_video=frames_per_video, precision=precision, progress=progress)
    t0 = time.perf_counter()
    table = extract_features(encoder, data, np.arange(len(data.items)), preprocess_cfg, **extract)
    t_feat = time.perf_counter() - t0
    counts = _frame_counts(data, table)
    draw_ids = []
    for k, d in enumerate(draws):  # a skipped frame can leave a class without a val/test frame in some draws
        try:
            check_class_counts(d.classes, _frame_counts(d, table), "usable frame")
            draw_ids.append(k)
        except TooFewSamplesError as e:
            if k == len(draws) - 1 and not draw_ids:
                raise
            log.warning("%s, split draw %d left out: %s", data.name, k, e)
    draws = [draws[k] for k in draw_ids]
    labels = item_labels[table.item]
    feats = torch.from_numpy(table.features)

    corrupted_sets = []  # (kind, eps, features, labels) of the first draw's test split
    t0 = time.perf_counter()
    if corruptions:
        test_items = np.unique(table.item[_split_rows(data, table)["test"]])
        for kind in corruptions:
            for eps in severities:
                ct = extract_features(encoder, data, test_items, preprocess_cfg, corruption=(kind, float(eps)),
                                      **extract)
                corrupted_sets.append((kind, eps, torch.from_numpy(ct.features), item_labels[ct.item]))
    t_corrupt = time.perf_counter() - t0

    out = {"feature_dim": int(feats.shape[1]), "features_from_cache": table.from_cache,
           "frames": counts, "frames_per_draw": [_frame_counts(d, table) for d in draws], "draw_ids": draw_ids,
           "skipped": table.skipped,
           "extraction_frames_per_s": table.frames_per_s}
    timing = {"features_s": round(t_feat, 3), "corrupted_features_s": round(t_corrupt, 3)}
    for clf in classifiers:
        t0 = time.perf_counter()
        per_draw = []
        for k, d in enumerate(draws):
            rows = _split_rows(d, table)
            x = {s: feats[rows[s]] for s in SPLITS}
            y = {s: torch.from_numpy(labels[rows[s]]) for s in SPLITS}
            y_test = labels[rows["test"]]
            fitted = _fit(clf, x["train"], y["train"], x["val"], y["val"], n_classes, seeds, probe_cfg, normalise)
            per_draw.append(_summarise(score_seeds(fitted, x["test"], y_test, n_classes, True), data.classes))
            if k == 0:
                first = per_draw[0]
                if fewshot_fractions:
                    first["fewshot"] = _fewshot(clf, x, y, labels[rows["train"]], y_test, n_classes, seeds,
                                                probe_cfg, normalise, fewshot_fractions, first, data.classes)
                if corrupted_sets:
                    rob: dict[str, dict] = {}
                    for kind, eps, xc, yc in corrupted_sets:
                        rob.setdefault(kind, {})[f"{eps:g}"] = _summarise(
                            score_seeds(fitted, xc, yc, n_classes, False), data.classes)
                    first["robustness"] = rob
        res = summarise_draws(per_draw, data.classes, draw_ids)
        res.update({k: per_draw[0][k] for k in ("fewshot", "robustness") if k in per_draw[0]})
        out[clf] = res
        timing[f"{clf}_s"] = round(time.perf_counter() - t0, 3)
        for s in res["seeds"]:
            if s["degenerate"]:
                log.warning("%s on %s, %s draw %d seed %d: %.0f %% of the test set predicted as one class, lowest "
                            "class F1 %.2f — a collapsed probe, flagged in the report and not ranked", encoder.spec,
                            data.name, clf, s["split_draw"], s["seed"], 100 * s["top_class_share"],
                            min(s["per_class_f1"]))
    return out, timing


def _fewshot(clf, x, y, train_labels, y_test, n_classes, seeds, probe_cfg, normalise, fractions, full,
             classes) -> dict:
    fs = {}
    for f in fractions:
        if float(f) >= 1.0:
            fs[f"{float(f):g}"] = {"n_train": len(train_labels), **full}
            continue
        subsets = [stratified_subset(train_labels, float(f), s) for s in seeds]
        sub = _fit(clf, x["train"], y["train"], x["val"], y["val"], n_classes, seeds, probe_cfg, normalise,
                   subsets=subsets)
        fs[f"{float(f):g}"] = {"n_train": len(subsets[0]),
                               **_summarise(score_seeds(sub, x["test"], y_test, n_classes, True), classes)}
    return fs


def probe_encoders(encoders: dict[str, str], data_root, out_dir, seeds=5, fewshot: bool = False,
                   robustness: bool = False, *, arch: str | None = None, pooling: str = "mean",
                   classifier: str = "both", normalise: bool = True,
                   split_fractions=DEFAULT_FRACTIONS, split_seed: int = 0, split_draws: int = SPLIT_DRAWS,
                   group_pattern: str | dict | None = None,
                   label_pattern: str | dict | None = None, frames_per_video: int = DEFAULT_FRAMES_PER_VIDEO,
                   exclude: str | None = DEFAULT_EXCLUDE, fewshot_fractions=FEWSHOT_FRACTIONS,
                   corruptions=CORRUPTIONS, severities=SEVERITIES, probe: ProbeConfig | dict | None = None,
                   preprocess=None, cache_dir=None, batch_size: int = 32, workers: int | None = None,
                   precision: str = "auto", device=None, plots: bool = True, progress: bool = False) -> dict:
    """Probe several encoders on one or more labelled datasets and write JSON, markdown and PNGs.

    ``encoders``: display name -> spec (checkpoint path, ``PATH#KEY``, ``random:ARCH``, ``timm:MODEL:PATH``).
    ``data_root``: a labelled-data path, a list of them, or {name: path} (columns of the table).
    ``seeds``: a count (seeds 0..n-1) or an explicit list. ``classifier``: linear | logreg | both.
    ``label_pattern`` / ``group_pattern``: a regex for every dataset, or {dataset name: regex}.
    ``split_draws``: grouped split draws ``split_seed .. split_seed + split_draws - 1`` (0 = the default
    split); every cell is the mean ± std over draws and ``res["paired"]`` compares encoders on the same draws
    (``usjepa.probe.draws``); features are extracted once.
    Returns the results dict also written as JSON; ``res["skipped_frames"]`` counts skipped inputs.
    """
    if not encoders:
        raise ValueError("no encoders to probe")
    clfs = classifier_list(classifier)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "feature_cache"
    seed_list = _seed_list(seeds)
    probe_cfg = ProbeConfig(**probe) if isinstance(probe, dict) else (probe or ProbeConfig())
    pre_cfg = _preprocess_cfg(preprocess)
    def one(option, name):  # a str applies to every dataset; a dict names its datasets
        return option.get(name) if isinstance(option, dict) else option

    if split_draws < 1:
        raise ProbeSettingsError(f"split draws must be ≥ 1, got {split_draws}")
    draws = {name: [load_labelled(p, name=name, group_pattern=one(group_pattern, name),
                                  label_pattern=one(label_pattern, name), fractions=split_fractions,
                                  exclude=exclude, frames_per_video=frames_per_video, split_seed=split_seed + k)
                    for k in range(split_draws)]
             for name, p in _datasets(data_root).items()}
    datasets = {name: d[0] for name, d in draws.items()}

    res: dict = {
        "protocol": {"seeds": seed_list, "pooling": pooling, "classifiers": list(clfs), "normalise": normalise,
                     "probe": asdict(probe_cfg), "logreg_c_grid": list(C_GRID),
                     "preprocess": preprocess_dict(pre_cfg), "split_fractions": list(split_fractions),
                     "split_seed": split_seed, "split_draws": split_draws,
                     "frames_per_video": frames_per_video, "precision": precision,
                     "degenerate_share": DEGENERATE_SHARE,
                     "fewshot_fractions": [float(f) for f in fewshot_fractions] if fewshot else [],
                     "corruptions": list(corruptions) if robustness else [],
                     "severities": [float(s) for s in severities] if robustness else []},
        "datasets": {}, "encoders": {}, "results": {d: {} for d in datasets}, "timing": {},
    }
    for name, data in datasets.items():
        res["datasets"][name] = {
            "root": str(data.root), "classes": data.classes, "counts": data.counts(),
            "sources": data.leakage["sources"], "groups": data.leakage["groups"],
            "split_source": data.split_source, "grouping": data.grouping, "leakage": data.leakage,
            "leakage_any_draw": {k: max(d.leakage[k] for d in draws[name])
                                 for k in ("sources_in_two_splits", "groups_in_two_splits",
                                           "duplicates_in_two_splits")},
            "duplicates": data.duplicates,
        }
        log.info("%s: %d labelled files, %d classes, counts %s; leakage check: %d source(s) and %d group(s) in "
                 "two splits", name, len(data.items), len(data.classes), data.counts(),
                 data.leakage["sources_in_two_splits"], data.leakage["groups_in_two_splits"])

    for enc_name, spec in encoders.items():
        enc = load_probe_encoder(spec, arch=arch, device=device)
        res["encoders"][enc_name] = {"spec": spec, "description": enc.description, "identity": enc.identity}
        for dname, data in datasets.items():
            log.info("probing %s on %s", enc_name, dname)
            r, timing = probe_dataset(
                enc, draws[dname], seed_list, preprocess_cfg=pre_cfg, pooling=pooling, probe_cfg=probe_cfg,
                classifiers=clfs, normalise=normalise, fewshot_fractions=fewshot_fractions if fewshot else (),
                corruptions=corruptions if robustness else (), severities=severities, cache_dir=cache_dir,
                batch_size=batch_size, workers=workers, frames_per_video=frames_per_video, precision=precision,
                progress=progress)
            res["results"][dname][enc_name] = r
            res["timing"][f"{enc_name}/{dname}"] = timing
            res["datasets"][dname].setdefault("frames", r["frames"])
            res["datasets"][dname].setdefault("skipped", r["skipped"])
        del enc
    res["paired"] = {d: {c: pairwise(res["results"][d], list(encoders), c) for c in clfs} for d in datasets}
    res["skipped_frames"] = sum(len(d.get("skipped", [])) for d in res["datasets"].values())

    files = {"json": str(out_dir / RESULTS_JSON), "markdown": str(out_dir / RESULTS_MD), "plots": []}
    if plots:
        for dname in datasets:
            if fewshot:
                files["plots"].append(str(plot_fewshot(res, dname, out_dir / f"probe_fewshot_{dname}.png")))
            if robustness:
                files["plots"].append(str(plot_robustness(res, dname, out_dir / f"probe_robustness_{dname}.png")))
    res["files"] = files
    (out_dir / RESULTS_MD).write_text(markdown_report(res))
    write_json_atomic(out_dir / RESULTS_JSON, json.loads(json.dumps(res, default=str)))
    return res
