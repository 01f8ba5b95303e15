"""usjepa.probe without images: splits, metrics, the batched linear probe, few-shot subsets."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from usjepa.probe.data import LabelledDataError, TooFewSamplesError, load_labelled
from usjepa.probe.linear import ProbeConfig, train_linear_probes
from usjepa.probe.metrics import accuracy, macro_f1, per_class_f1, stratified_subset


def _touch_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG fake: never decoded by these tests")


def _write_csv(root: Path, rows: list[dict]) -> Path:
    cols = list(rows[0])
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return root


def _patients(root: Path, n_patients: int, per_patient: int, classes=("a", "b", "c")) -> list[dict]:
    rows = []
    for p in range(n_patients):
        label = classes[p % len(classes)]
        for k in range(per_patient):
            rel = f"img/p{p:03d}_{k}.png"
            _touch_png(root / rel)
            rows.append({"path": rel, "label": label, "group": f"patient{p}"})
    return rows


# ------------------------------------------------------------------------------------------- metrics


def test_macro_f1_by_hand():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([0, 1, 1, 1, 0, 2])
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp1 fp0 fn1 -> 2/3
    assert np.allclose(per_class_f1(y, p, 3), [0.5, 0.8, 2 / 3])
    assert macro_f1(y, p, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert accuracy(y, p) == pytest.approx(4 / 6)
    # a class never predicted scores 0 and still counts in the macro mean
    assert macro_f1(np.array([0, 1, 2]), np.array([0, 1, 1]), 3) == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_stratified_subset_keeps_every_class():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    sub = stratified_subset(labels, 0.1, seed=3)
    counts = np.bincount(labels[sub], minlength=3)
    assert counts.tolist() == [9, 1, 1]
    assert len(set(sub.tolist())) == len(sub)
    assert np.array_equal(sub, stratified_subset(labels, 0.1, seed=3))
    assert not np.array_equal(sub, stratified_subset(labels, 0.1, seed=4))
    assert len(stratified_subset(labels, 0.1, seed=4)) == len(sub)  # equal sizes across seeds
    with pytest.raises(ValueError):
        stratified_subset(labels, 0.0, seed=0)


# -------------------------------------------------------------------------------------------- splits


def test_grouped_split_from_group_column(tmp_path):
    rows = _patients(tmp_path, n_patients=30, per_patient=4)
    ds = load_labelled(_write_csv(tmp_path, rows))
    splits_of_group: dict[str, set] = {}
    for it in ds.items:
        splits_of_group.setdefault(it.group, set()).add(it.split)
    assert all(len(s) == 1 for s in splits_of_group.values())  # no patient on both sides
    counts = ds.counts()
    assert all(counts[s][c] > 0 for s in ("train", "val", "test") for c in ds.classes)
    assert sum(counts["train"].values()) > sum(counts["test"].values()) > 0
    again = load_labelled(tmp_path)
    assert [it.split for it in again.items] == [it.split for it in ds.items]  # stable


def test_split_seed_draws_another_grouped_split(tmp_path):
    rows = _patients(tmp_path, n_patients=30, per_patient=4)
    csv_path = _write_csv(tmp_path, rows)
    draws = [load_labelled(csv_path, split_seed=k) for k in range(3)]
    assert [it.split for it in load_labelled(csv_path).items] == [it.split for it in draws[0].items]  # 0 = default
    test_groups = [frozenset(it.group for it in d.items if it.split == "test") for d in draws]
    assert len(set(test_groups)) == 3  # each draw holds out other patients
    for d in draws:
        by_group: dict[str, set] = {}
        for it in d.items:
            by_group.setdefault(it.group, set()).add(it.split)
        assert all(len(s) == 1 for s in by_group.values())  # still no patient on both sides
        assert all(d.counts()[s][c] > 0 for s in ("train", "val", "test") for c in d.classes)
    assert "split seed" not in draws[0].split_source and "split seed 2" in draws[2].split_source
    assert [it.split for it in load_labelled(csv_path, split_seed=2).items] == [it.split for it in draws[2].items]
    with pytest.raises(LabelledDataError, match="split seed"):
        load_labelled(csv_path, split_seed=-1)


def test_grouped_split_from_filename_pattern(tmp_path):
    for c in ("benign", "malignant"):
        for p in range(6):
            for k in range(3):
                _touch_png(tmp_path / c / f"{c}_pat{p}_frame{k}.png")
        _touch_png(tmp_path / c / f"{c}_pat0_frame0_mask.png")  # a lesion mask: not an image to probe
    ds = load_labelled(tmp_path, group_pattern=r"(\w+_pat\d+)_frame")
    assert len(ds.items) == 2 * 6 * 3
    assert not any("_mask" in it.path.name for it in ds.items)
    by_group: dict[str, set] = {}
    for it in ds.items:
        by_group.setdefault(it.group, set()).add(it.split)
    assert len(by_group) == 12 and all(len(s) == 1 for s in by_group.values())
    with pytest.raises(LabelledDataError, match="does not match the group pattern"):
        load_labelled(tmp_path, group_pattern=r"nomatch_(\d+)")


def test_given_train_test_gets_val_carved_by_group(tmp_path):
    rows = _patients(tmp_path, n_patients=24, per_patient=2, classes=("x", "y"))
    for r in rows:
        r["split"] = "test" if int(r["group"][7:]) >= 18 else "train"
    ds = load_labelled(_write_csv(tmp_path, rows))
    test_groups = {f"patient{p}" for p in range(18, 24)}
    assert {it.group for it in ds.items if it.split == "test"} == test_groups
    assert ds.counts()["val"]["x"] > 0 and ds.counts()["val"]["y"] > 0
    assert "val carved" in ds.split_source


def test_too_few_samples_is_a_clear_error(tmp_path):
    rows = _patients(tmp_path, n_patients=12, per_patient=1, classes=("common",))
    for k in range(2):  # two files only: cannot fill train, val and test
        _touch_png(tmp_path / f"rare{k}.png")
        rows.append({"path": f"rare{k}.png", "label": "rare", "group": f"rare{k}"})
    with pytest.raises(TooFewSamplesError, match="'rare'.*at least 3"):
        load_labelled(_write_csv(tmp_path, rows))


def test_given_split_missing_a_class_is_a_clear_error(tmp_path):
    rows = []
    for k in range(6):
        for lab in ("a", "b"):
            rel = f"{lab}{k}.png"
            _touch_png(tmp_path / rel)
            split = ("train", "train", "train", "val", "test", "test")[k]
            if lab == "b" and split == "test":
                split = "train"
            rows.append({"path": rel, "label": lab, "split": split})
    with pytest.raises(TooFewSamplesError, match="class 'b' has no example in the 'test' split"):
        load_labelled(_write_csv(tmp_path, rows))


def test_csv_paths_stay_inside_the_root(tmp_path):
    (tmp_path / "data").mkdir()
    _touch_png(tmp_path / "outside.png")
    _write_csv(tmp_path / "data", [{"path": "../outside.png", "label": "a"}])
    with pytest.raises(ValueError, match="escapes"):
        load_labelled(tmp_path / "data")


def test_ultrabench_json(tmp_path):
    import json

    train_val, test = [], []
    for p in range(10):
        for lab, name in ((0, "regular"), (1, "covid")):
            for k in range(2):
                rel = f"images/{name}_{p}_{k}.png"
                _touch_png(tmp_path / rel)
                e = {"source": f"{name}_{p}.mp4", "image": rel, "pathology": name, "label": lab}
                (test if p >= 8 else train_val).append(e)
    (tmp_path / "train_val.json").write_text(json.dumps(train_val))
    (tmp_path / "test.json").write_text(json.dumps(test))
    ds = load_labelled(tmp_path)
    assert ds.classes == ["0:regular", "1:covid"]
    assert sum(ds.counts()["test"].values()) == len(test)
    by_group: dict[str, set] = {}
    for it in ds.items:
        by_group.setdefault(it.group, set()).add(it.split)
    assert all(len(s) == 1 for s in by_group.values())


# ------------------------------------------------------------------------------------------- probing


def _blobs(n_per_class: int, n_classes: int, dim: int, sep: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g) * sep
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=g)
    return x, y


def test_linear_probe_learns_and_stops_early():
    x, y = _blobs(40, 3, 16, sep=3.0, seed=0)
    xv, yv = _blobs(10, 3, 16, sep=3.0, seed=0)
    xt, yt = _blobs(20, 3, 16, sep=3.0, seed=0)
    probes = train_linear_probes(x, y, xv, yv, 3, seeds=[0, 1], cfg=ProbeConfig(max_epochs=150, patience=5))
    preds = probes.predict(xt)
    assert preds.shape == (2, 60)
    assert all(macro_f1(yt.numpy(), p, 3) > 0.9 for p in preds)
    for best, run in zip(probes.best_epoch, probes.epochs_run):
        assert 1 <= best <= run <= 150
        assert run == 150 or run - best == 5  # stopped exactly `patience` epochs after the best one


def test_linear_probe_is_deterministic_per_seed():
    x, y = _blobs(30, 4, 24, sep=1.0, seed=1)  # overlapping classes: seeds really differ
    xv, yv = _blobs(8, 4, 24, sep=1.0, seed=2)
    cfg = ProbeConfig(max_epochs=20, patience=5)
    together = train_linear_probes(x, y, xv, yv, 4, seeds=[0, 7, 3], cfg=cfg)
    again = train_linear_probes(x, y, xv, yv, 4, seeds=[0, 7, 3], cfg=cfg)
    alone = train_linear_probes(x, y, xv, yv, 4, seeds=[7], cfg=cfg)
    assert torch.equal(together.weight, again.weight)
    # a seed's probe does not depend on the seeds trained beside it
    assert torch.allclose(together.weight[1], alone.weight[0], atol=1e-6)
    assert together.best_epoch[1] == alone.best_epoch[0]
    # the Adam phase differs by seed; L-BFGS then takes every seed to the one optimum of the convex problem
    adam_only = train_linear_probes(x, y, xv, yv, 4, seeds=[0, 7, 3], cfg=ProbeConfig(max_epochs=20, patience=5,
                                                                                      polish_iters=0))
    assert not torch.allclose(adam_only.weight[0], adam_only.weight[1])
    assert torch.allclose(together.weight[0], together.weight[1], atol=1e-5)


def test_linear_probe_subsets_restrict_training_rows():
    x, y = _blobs(20, 2, 8, sep=2.0, seed=3)
    xv, yv = _blobs(5, 2, 8, sep=2.0, seed=4)
    subsets = [stratified_subset(y.numpy(), 0.1, s) for s in (0, 1)]
    probes = train_linear_probes(x, y, xv, yv, 2, seeds=[0, 1], cfg=ProbeConfig(max_epochs=5), subsets=subsets)
    x_poisoned = x.clone()
    outside = np.setdiff1d(np.arange(len(x)), np.concatenate(subsets))
    x_poisoned[outside] = 1e6  # rows outside the subsets must not matter
    probes2 = train_linear_probes(x_poisoned, y, xv, yv, 2, seeds=[0, 1], cfg=ProbeConfig(max_epochs=5),
                                  subsets=subsets)
    assert torch.equal(probes.weight, probes2.weight)
    with pytest.raises(ValueError):
        train_linear_probes(x, y, xv, yv, 2, seeds=[0, 1], subsets=[subsets[0]])


def test_closed_form_gradients_match_autograd():
    from usjepa.probe.linear import cross_entropy_grads

    g = torch.Generator().manual_seed(0)
    xb = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    yb = torch.randint(0, 4, (3, 7), generator=g)
    w = torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.baddbmm(b.unsqueeze(1), xb, w)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 4), yb.reshape(-1), reduction="none")
    loss.view(3, 7).mean(1).sum().backward()
    gw, gb = cross_entropy_grads(xb, yb, w.detach(), b.detach())
    assert torch.allclose(gw, w.grad) and torch.allclose(gb, b.grad)


def test_files_that_are_not_images_videos_or_volumes_are_not_probed(tmp_path):
    for c in ("a", "b"):
        for k in range(3):
            _touch_png(tmp_path / c / f"{c}{k}.png")
        (tmp_path / c / "notes.txt").write_text("not probed")
    ds = load_labelled(tmp_path)
    assert len(ds.items) == 6
    with pytest.raises(LabelledDataError, match="no labelled images"):
        load_labelled(tmp_path / "a")  # a folder whose sub-folders hold no images


def test_markdown_columns_rank_best_bold_second_underlined():
    from usjepa.probe.report import _ranked_column

    cells = {"a": {"mean": 0.5, "std": 0.01}, "b": {"mean": 0.7, "std": 0.02}, "c": {"mean": 0.6, "std": 0.0},
             "d": None}
    out = _ranked_column(cells)
    assert out == {"a": "50.0 ± 1.0", "b": "**70.0 ± 2.0**", "c": "<u>60.0 ± 0.0</u>", "d": "–"}


def test_collapsed_seeds_are_flagged_never_ranked_and_zero_spread_is_named():
    from usjepa.probe.report import _ranked_column
    from usjepa.probe.run import score_seeds

    class Majority:  # predicts class 0 for everything: the collapse the report must not rank
        seeds = [0, 1]

        def predict(self, x):
            return np.zeros((2, len(x)), dtype=np.int64)

    y = np.array([0] * 8 + [1, 2])
    per_seed = score_seeds(Majority(), np.zeros((10, 4)), y, 3, with_training_info=False)
    assert all(s["degenerate"] and s["top_class_share"] == 1.0 for s in per_seed)
    cells = {"collapsed": {"mean": 0.9, "std": 0.0, "n_seeds": 5, "degenerate": 5},
             "real": {"mean": 0.6, "std": 0.05, "n_seeds": 5, "degenerate": 0},
             "same": {"mean": 0.5, "std": 0.0, "n_seeds": 5, "degenerate": 0}}
    out = _ranked_column(cells)
    assert out["collapsed"] == "90.0 ± 0 (=) ⚠5/5"  # highest mean, but neither bold nor underlined
    assert out["real"] == "**60.0 ± 5.0**" and out["same"] == "<u>50.0 ± 0 (=)</u>"


# ------------------------------------------------------------------------------ normalisation, logreg


def test_standardised_probe_and_logreg_both_solve_separable_badly_scaled_features():
    from usjepa.probe.logreg import train_logreg_probes

    xa, ya = _blobs(70, 3, 16, sep=6.0, seed=10)
    order = torch.randperm(len(ya), generator=torch.Generator().manual_seed(0))
    (x, y), (xv, yv), (xt, yt) = ((xa[order[a:b]], ya[order[a:b]]) for a, b in ((0, 120), (120, 150), (150, 210)))
    scale = torch.logspace(-3, -1, 16)  # an encoder with tiny class differences on a large offset
    shift = 50.0
    x, xv, xt = (a * scale + shift for a in (x, xv, xt))
    cfg = ProbeConfig(max_epochs=60, patience=10)
    lin = train_linear_probes(x, y, xv, yv, 3, seeds=[0, 1, 2], cfg=cfg)
    lr = train_logreg_probes(x, y, xv, yv, 3, seeds=[0, 1, 2])
    for fitted in (lin, lr):
        preds = fitted.predict(xt)
        assert min(macro_f1(yt.numpy(), p, 3) for p in preds) >= 0.95
    # what normalising fixes for the minibatch Adam phase (the L-BFGS phase alone copes with the scales, but
    # the L2 penalty would then weigh the dimensions by their raw scale)
    raw = train_linear_probes(x, y, xv, yv, 3, seeds=[0, 1, 2], cfg=ProbeConfig(max_epochs=60, patience=10,
                                                                                polish_iters=0), normalise=False)
    assert max(macro_f1(yt.numpy(), p, 3) for p in raw.predict(xt)) < 0.95


def test_standardisation_is_folded_into_the_kept_weights():
    xa, ya = _blobs(20, 3, 8, sep=1.5, seed=20)
    x, y, xv, yv = xa[::2] * 7 + 3, ya[::2], xa[1::2] * 7 + 3, ya[1::2]
    cfg = ProbeConfig(max_epochs=8, patience=100)
    probes = train_linear_probes(x, y, xv, yv, 3, seeds=[0, 1], cfg=cfg)
    mean, std = x.double().mean(0).float(), x.double().std(0, unbiased=False).float()
    z = train_linear_probes((x - mean) / std, y, (xv - mean) / std, yv, 3, seeds=[0, 1], cfg=cfg, normalise=False)
    assert torch.allclose(probes.logits(xv), z.logits((xv - mean) / std), atol=1e-4)
    # few-shot: each seed standardises with the rows it trains on
    subsets = [stratified_subset(y.numpy(), 0.4, s) for s in (0, 1)]
    fs = train_linear_probes(x, y, xv, yv, 3, seeds=[0, 1], cfg=cfg, subsets=subsets)
    for k in (0, 1):
        rows = torch.as_tensor(subsets[k])
        m, s = x[rows].double().mean(0).float(), x[rows].double().std(0, unbiased=False).float()
        one = train_linear_probes((x - m) / s, y, (xv - m) / s, yv, 3, seeds=[[0, 1][k]], cfg=cfg,
                                  subsets=[subsets[k]], normalise=False)
        assert torch.allclose(fs.logits(xv)[k], one.logits((xv - m) / s)[0], atol=1e-4)


# ------------------------------------------------------------------------------------------ leakage


def test_sources_and_groups_unite_into_split_units(tmp_path):
    rows = []
    for p in range(12):
        label = "abc"[p % 3]
        for v in range(2):  # two videos per patient, two rows (frames) per video
            rel = f"p{p:02d}_video{v}.png"
            _touch_png(tmp_path / rel)
            rows += [{"path": rel, "label": label, "group": f"patient{p}", "frame": f} for f in (0, 5)]
    ds = load_labelled(_write_csv(tmp_path, rows))
    assert len(ds.items) == 24  # the two frame rows of each file are one item
    assert ds.leakage == {"sources": 24, "groups": 12, "sources_in_two_splits": 0, "groups_in_two_splits": 0,
                          "duplicates_in_two_splits": 0,
                          "examples": []}
    # without a group column the files are still their own units; with a pattern, patients are
    rows_no_group = [{k: v for k, v in r.items() if k != "group"} for r in rows]
    ds2 = load_labelled(_write_csv(tmp_path, rows_no_group), group_pattern=r"^(p\d+)_")
    by_patient: dict[str, set] = {}
    for it in ds2.items:
        by_patient.setdefault(it.rel[:3], set()).add(it.split)
    assert all(len(s) == 1 for s in by_patient.values())


def test_a_file_in_two_groups_joins_them():
    from usjepa.probe.data import LabelledItem, split_units

    def item(src, grp):
        return LabelledItem(path=Path(src), rel=src, label="a", kind="still", source=src, group=grp)

    units = split_units([item("x.png", "g1"), item("x.png", "g2"), item("y.png", "g2"), item("z.png", "g3")])
    assert units[0] == units[1] == units[2] != units[3]


def test_batched_probe_matches_torch_adam_with_l2_per_setting():
    """Each (lr, λ) probe of the batched grid moves exactly as a plain autograd run with torch's Adam
    (``weight_decay`` = coupled L2 on the weights, none on the bias) would alone (the Adam phase: L-BFGS off),
    and each seed keeps the setting the shared rule (``select.choose``) picks on validation."""
    from benchmarks.bench_probe import plain_probe
    from usjepa.probe.select import choose, one_class

    x, y = _blobs(30, 3, 12, sep=1.0, seed=5)
    xv, yv = _blobs(10, 3, 12, sep=1.0, seed=6)
    fixed = dict(max_epochs=12, patience=10**9, min_epochs=0, polish_iters=0)
    grid = ProbeConfig(lr_grid=(1e-3, 1e-2), wd_grid=(1e-3, 0.3), **fixed)
    chosen = train_linear_probes(x, y, xv, yv, 3, seeds=[0, 4], cfg=grid, normalise=False)
    for i, seed in enumerate([0, 4]):
        f1, loss, flat = [], [], []
        for lr, l2 in grid.settings():
            one = ProbeConfig(lr_grid=(lr,), wd_grid=(l2,), **fixed)
            w = plain_probe(x, y, xv, yv, 3, seed, one)
            alone = train_linear_probes(x, y, xv, yv, 3, seeds=[seed], cfg=one, normalise=False)
            assert torch.allclose(alone.weight[0], w, atol=1e-5)
            f1.append(alone.val_macro_f1[0])
            loss.append(alone.best_val_loss[0])
            flat.append(one_class(alone.predict(xv)[0]))
        best = grid.settings()[choose(f1, loss, flat, [l2 for _, l2 in grid.settings()])]
        assert (chosen.lr[i], chosen.weight_decay[i]) == best


def test_early_stopping_keeps_no_epoch_before_min_epochs():
    x, y = _blobs(20, 3, 64, sep=0.3, seed=7)  # barely separable: validation loss is lowest at once
    xv, yv = _blobs(4, 3, 64, sep=0.3, seed=8)
    probes = train_linear_probes(x, y, xv, yv, 3, seeds=[0, 1, 2], cfg=ProbeConfig(max_epochs=80, patience=5))
    assert all(30 <= b <= r for b, r in zip(probes.best_epoch, probes.epochs_run))
    early = train_linear_probes(x, y, xv, yv, 3, seeds=[0, 1, 2],
                                cfg=ProbeConfig(max_epochs=80, patience=5, min_epochs=1))
    assert min(early.best_epoch) < 30  # without the floor this set stops early: the floor is what holds it


def test_patient_ids_in_file_names_group_files_by_default(tmp_path):
    """Clips named ``…pat1…`` of one patient land in one split without any option, and the split summary
    says so; another patient number is another group."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for p in range(6):
            for clip in range(3):
                img = rng.integers(0, 255, (40, 40), dtype=np.uint8)
                cv2.imwrite(str(tmp_path / cls / f"{cls.upper()}_pat{p}Image_{clip}.png"), img)
    data = load_labelled(tmp_path)
    assert len({it.group for it in data.items}) == 6  # pat0..pat5, whichever class folder
    assert data.leakage["groups_in_two_splits"] == 0
    for p in range(6):
        assert len({it.split for it in data.items if f"_pat{p}Image" in it.rel}) == 1
    assert "patient ids in file names (36 file(s) match" in data.grouping
    explicit = load_labelled(tmp_path, group_pattern=r"_(pat\d)I")
    assert "patient ids" not in explicit.grouping


def test_duplicate_images_are_found_across_classes_and_kept_in_one_split(tmp_path):
    """The same picture under two labels (as in BUSI), and a rescaled JPEG re-export of another, are one
    duplicate group each: reported, kept in one split on every draw; distinct images are never joined."""
    from usjepa.ingest.duplicates import dhash, hamming

    rng = np.random.default_rng(1)
    imgs = [cv2.GaussianBlur(rng.integers(0, 255, (96, 128), dtype=np.uint8), (9, 9), 3) for _ in range(24)]
    for cls in ("benign", "malignant", "normal"):
        (tmp_path / cls).mkdir()
    for k, img in enumerate(imgs):
        cv2.imwrite(str(tmp_path / ("benign", "malignant", "normal")[k % 3] / f"img{k}.png"), img)
    cv2.imwrite(str(tmp_path / "malignant" / "copy_of_0.png"), imgs[0])  # benign img0, again as malignant
    cv2.imwrite(str(tmp_path / "normal" / "reexport_of_5.jpg"), cv2.resize(imgs[5], (160, 120)),
                [cv2.IMWRITE_JPEG_QUALITY, 70])
    hashes = np.array([dhash(i) for i in imgs], dtype=np.uint64)
    assert hamming(hashes[:, None], hashes[None, :])[np.triu_indices(len(imgs), 1)].min() > 4  # distinct stay apart
    for k in range(4):
        data = load_labelled(tmp_path, split_seed=k)
        dup = data.duplicates
        assert (dup["clusters"], dup["files_in_clusters"], dup["clusters_with_two_labels"]) == (2, 4, 1)
        split = {it.rel: it.split for it in data.items}
        assert split["benign/img0.png"] == split["malignant/copy_of_0.png"]
        assert split["normal/img5.png"] == split["normal/reexport_of_5.jpg"]
        assert data.leakage["duplicates_in_two_splits"] == 0
    assert "duplicate-image group(s) kept in one split" in data.grouping


# ------------------------------------------------------------------- the probe against logreg, one setting


@pytest.mark.parametrize("n_classes", [2, 3])
def test_probe_reaches_logregs_optimum_at_every_c_of_the_shared_grid(n_classes):
    """Adam + the L-BFGS phase end where scikit-learn's logistic regression ends at the same C (λ = 1/(C N),
    2/(C N) for two classes, where scikit-learn fits one binomial weight vector): the same probabilities on
    held-out rows, for every C of the grid both classifiers share — and a few-shot subset per seed, each
    with its own standardisation, reaches the optimum of its own rows."""
    import warnings

    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from usjepa.probe.select import C_GRID

    x, y = _blobs(40, n_classes, 24, sep=0.6, seed=11)  # overlapping: the penalty matters
    xt, _ = _blobs(30, n_classes, 24, sep=0.6, seed=12)
    subsets = [stratified_subset(y.numpy(), 0.5, s) for s in (0, 1)]
    for rows in (None, subsets):
        for c in C_GRID:
            cfg = ProbeConfig(c_grid=(c,), lr_grid=(1e-2,), max_epochs=20, patience=5, min_epochs=1)
            probes = train_linear_probes(x, y, x[:12], y[:12], n_classes, seeds=[0, 1], cfg=cfg, subsets=rows)
            assert probes.c == [c, c]
            ours = probes.logits(xt).softmax(-1)
            for s in range(2):
                r = np.arange(len(y)) if rows is None else rows[s]
                scaler = StandardScaler().fit(x[r].double().numpy())
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ref = LogisticRegression(C=c, tol=1e-10, max_iter=10000).fit(scaler.transform(x[r].double().numpy()),
                                                                                 y[r].numpy())
                p_ref = ref.predict_proba(scaler.transform(xt.double().numpy()))
                assert np.abs(ours[s].numpy() - p_ref).max() < 1e-4, (c, s, rows is None)


def test_selection_passes_over_one_class_answers_and_breaks_ties_towards_the_stronger_penalty():
    """The shared rule: a setting predicting one class for all of validation (the prior, which the strongest
    penalties reach and the validation loss favours when nothing generalises) loses to any that predicts
    two; then macro F1, then the loss (to 6 decimals), then the stronger penalty."""
    from usjepa.probe.select import choose, l2_of_c, one_class

    assert one_class(np.array([2, 2, 2])) and not one_class(np.array([2, 1, 2])) and not one_class(np.array([]))
    # the prior scores the higher F1 and the lower loss, and is still passed over
    assert choose([0.21, 0.17, 0.17], [1.07, 1.62, 2.58], [True, False, False], [33.0, 0.03, 0.003]) == 1
    assert choose([0.21, 0.17], [1.07, 1.62], [True, True], [33.0, 0.03]) == 0  # nothing else on offer
    assert choose([0.5, 0.5], [0.9000001, 0.9000004], [False, False], [0.1, 1.0]) == 1  # loss tie: stronger
    assert choose([0.5, 0.5], [0.91, 0.90], [False, False], [0.1, 1.0]) == 1
    assert l2_of_c(0.1, 200, 3) == pytest.approx(0.05) and l2_of_c(0.1, 200, 2) == pytest.approx(0.1)
