"""The evaluation protocol end to end: encoders × labelled datasets -> linear / few-shot / robustness -> files.

``probe_encoders`` is the Python entry point (the demo calls it); ``usjepa-probe`` (``cli.py``) wraps it.
For each dataset and encoder: features of every labelled image are extracted once (cached), the linear
probes of all seeds train together on the training features (``linear.py``), and the test set is scored per
seed. Few-shot trains the same probes on stratified fractions of the training set (validation set kept
whole, as the paper preserves the splits). Robustness scores the clean-trained probes on test features of
corrupted images. Writes ``probe_results.json``, ``probe_table.md`` and PNG curves into ``out_dir``.
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

from usjepa.probe.data import DEFAULT_EXCLUDE, DEFAULT_FRACTIONS, LabelledSet, load_labelled
from usjepa.probe.encoders import load_probe_encoder
from usjepa.probe.features import extract_features, preprocess_dict
from usjepa.probe.linear import ProbeConfig, TrainedProbes, train_linear_probes
from usjepa.probe.metrics import mean_std, scores, stratified_subset
from usjepa.probe.report import markdown_report, plot_fewshot, plot_robustness
from usjepa.shards.format import write_json_atomic

log = logging.getLogger(__name__)

FEWSHOT_FRACTIONS = (0.01, 0.05, 0.10, 0.50, 1.0)
CORRUPTIONS = ("blur", "contrast", "speckle")
SEVERITIES = (1, 2, 3)
RESULTS_JSON = "probe_results.json"
RESULTS_MD = "probe_table.md"


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
        name = p.stem if p.is_file() else p.resolve().name
        out[name if name not in out else f"{name}-{len(out)}"] = p
    return out


def _summarise(per_seed: list[dict], classes: list[str]) -> dict:
    return {
        "macro_f1": mean_std([s["macro_f1"] for s in per_seed]),
        "accuracy": mean_std([s["accuracy"] for s in per_seed]),
        "per_class_f1": {c: mean_std([s["per_class_f1"][i] for s in per_seed]) for i, c in enumerate(classes)},
        "seeds": per_seed,
    }


def _score_probes(probes: TrainedProbes, x_test: torch.Tensor, y_test: np.ndarray, n_classes: int,
                  with_training_info: bool) -> list[dict]:
    preds = probes.predict(x_test)
    out = []
    for i, seed in enumerate(probes.seeds):
        s = {"seed": seed, **scores(y_test, preds[i], n_classes)}
        if with_training_info:
            s.update(best_epoch=probes.best_epoch[i], epochs_run=probes.epochs_run[i],
                     best_val_loss=probes.best_val_loss[i])
        out.append(s)
    return out


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


def probe_dataset(encoder, data: LabelledSet, seeds: list[int], *, preprocess_cfg, pooling: str,
                  probe_cfg: ProbeConfig, fewshot_fractions, corruptions, severities, cache_dir,
                  batch_size: int, workers: int | None, progress: bool) -> tuple[dict, dict]:
    """One encoder on one labelled set: (results, timing)."""
    n_classes = len(data.classes)
    labels = data.labels()
    tr, va, te = data.indices("train"), data.indices("val"), data.indices("test")
    everything = np.concatenate([tr, va, te])
    t0 = time.perf_counter()
    table = extract_features(encoder, data, everything, preprocess_cfg, pooling=pooling, cache_dir=cache_dir,
                             batch_size=batch_size, workers=workers, progress=progress)
    t_feat = time.perf_counter() - t0
    feats = torch.from_numpy(table.features)
    x_tr, x_va, x_te = feats[:len(tr)], feats[len(tr):len(tr) + len(va)], feats[len(tr) + len(va):]
    y_tr, y_va, y_te = (torch.from_numpy(labels[i]) for i in (tr, va, te))

    t0 = time.perf_counter()
    probes = train_linear_probes(x_tr, y_tr, x_va, y_va, n_classes, seeds, probe_cfg)
    t_probe = time.perf_counter() - t0
    out = {"feature_dim": int(feats.shape[1]), "features_from_cache": table.from_cache,
           "linear": _summarise(_score_probes(probes, x_te, labels[te], n_classes, True), data.classes)}

    t0 = time.perf_counter()
    if fewshot_fractions:
        fs = {}
        for f in fewshot_fractions:
            if float(f) >= 1.0:
                fs[f"{float(f):g}"] = {"n_train": len(tr), **{k: v for k, v in out["linear"].items() if k != "seeds"},
                                       "seeds": out["linear"]["seeds"]}
                continue
            subsets = [stratified_subset(labels[tr], float(f), s) for s in seeds]
            sub_probes = train_linear_probes(x_tr, y_tr, x_va, y_va, n_classes, seeds, probe_cfg, subsets=subsets)
            per_seed = _score_probes(sub_probes, x_te, labels[te], n_classes, True)
            fs[f"{float(f):g}"] = {"n_train": len(subsets[0]), **_summarise(per_seed, data.classes)}
        out["fewshot"] = fs
    t_fewshot = time.perf_counter() - t0

    t0 = time.perf_counter()
    if corruptions:
        rob: dict[str, dict] = {}
        for kind in corruptions:
            rob[kind] = {}
            for eps in severities:
                ct = extract_features(encoder, data, te, preprocess_cfg, pooling=pooling,
                                      corruption=(kind, float(eps)), cache_dir=cache_dir, batch_size=batch_size,
                                      workers=workers, progress=progress)
                per_seed = _score_probes(probes, torch.from_numpy(ct.features), labels[te], n_classes, False)
                rob[kind][f"{eps:g}"] = _summarise(per_seed, data.classes)
        out["robustness"] = rob
    t_rob = time.perf_counter() - t0
    timing = {"features_s": round(t_feat, 3), "linear_s": round(t_probe, 3), "fewshot_s": round(t_fewshot, 3),
              "robustness_s": round(t_rob, 3)}
    return out, timing


def probe_encoders(encoders: dict[str, str], data_root, out_dir, seeds=5, fewshot: bool = False,
                   robustness: bool = False, *, arch: str | None = None, pooling: str = "mean",
                   split_fractions=DEFAULT_FRACTIONS, group_pattern: str | None = None,
                   exclude: str | None = DEFAULT_EXCLUDE, fewshot_fractions=FEWSHOT_FRACTIONS,
                   corruptions=CORRUPTIONS, severities=SEVERITIES, probe: ProbeConfig | dict | None = None,
                   preprocess=None, cache_dir=None, batch_size: int = 32, workers: int | None = None,
                   device=None, plots: bool = True, progress: bool = False) -> dict:
    """Probe several encoders on one or more labelled datasets and write JSON, markdown and PNGs.

    ``encoders``: display name -> spec (checkpoint path, ``PATH#KEY``, ``random:ARCH``, ``timm:MODEL:PATH``).
    ``data_root``: a labelled-data path, a list of them, or {name: path} (columns of the table).
    ``seeds``: a count (seeds 0..n-1) or an explicit list. Returns the results dict also written as JSON.
    """
    if not encoders:
        raise ValueError("no encoders to probe")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "feature_cache"
    seed_list = _seed_list(seeds)
    probe_cfg = ProbeConfig(**probe) if isinstance(probe, dict) else (probe or ProbeConfig())
    pre_cfg = _preprocess_cfg(preprocess)
    datasets = {name: load_labelled(p, name=name, group_pattern=group_pattern, fractions=split_fractions,
                                    exclude=exclude) for name, p in _datasets(data_root).items()}

    res: dict = {
        "protocol": {"seeds": seed_list, "pooling": pooling, "probe": asdict(probe_cfg),
                     "preprocess": preprocess_dict(pre_cfg), "split_fractions": list(split_fractions),
                     "fewshot_fractions": [float(f) for f in fewshot_fractions] if fewshot else [],
                     "corruptions": list(corruptions) if robustness else [],
                     "severities": [float(s) for s in severities] if robustness else []},
        "datasets": {}, "encoders": {}, "results": {d: {} for d in datasets}, "timing": {},
    }
    for name, data in datasets.items():
        res["datasets"][name] = {
            "root": str(data.root), "classes": data.classes, "counts": data.counts(),
            "groups": len({it.group for it in data.items}),
            "split_source": data.split_source,
        }
        log.info("%s: %d images, %d classes, counts %s", name, len(data.items), len(data.classes), data.counts())

    for enc_name, spec in encoders.items():
        enc = load_probe_encoder(spec, arch=arch, device=device)
        res["encoders"][enc_name] = {"spec": spec, "description": enc.description, "identity": enc.identity}
        for dname, data in datasets.items():
            log.info("probing %s on %s", enc_name, dname)
            r, timing = probe_dataset(
                enc, data, seed_list, preprocess_cfg=pre_cfg, pooling=pooling, probe_cfg=probe_cfg,
                fewshot_fractions=fewshot_fractions if fewshot else (),
                corruptions=corruptions if robustness else (), severities=severities,
                cache_dir=cache_dir, batch_size=batch_size, workers=workers, progress=progress)
            res["results"][dname][enc_name] = r
            res["timing"][f"{enc_name}/{dname}"] = timing
        del enc

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

