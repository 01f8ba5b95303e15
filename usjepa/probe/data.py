"""Labelled image sets for probing: readers, grouped stratified splits, and the checks that make them usable.

Three layouts are read (``load_labelled`` picks by what it finds):

* folder-per-class: ``ROOT/<class>/**/<image>``; files whose stem ends in ``_mask`` (or ``_mask_<n>``),
  like BUSI's lesion masks, are not images to probe;
* CSV (``ROOT/labels.csv`` or a ``.csv`` path): columns ``path,label[,split][,group]``, paths relative to
  the CSV's folder;
* UltraBench's processed format: ``train_val.json`` / ``train.json`` / ``validation.json`` / ``test.json``,
  each a list of ``{"image", "label", "class"|"pathology"|..., "patient"|"source", "scan_mask"}``.

Splits that the data does not carry are made here, by group (patient / video / file): a group never lands
in two splits. Within each class the groups are ordered by a stable hash of their id and cut at the
requested fractions, keeping at least one group per class in every split, so the split is the same on every
run and machine and each class is present in train, val and test.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from usjepa.shards.format import resolve_in_root, stable_unit_hash

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
TRAIN_VAL = "train_val"  # a split the data names but does not divide (UltraBench's train_val.json)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NOT_STILL_SUFFIXES = (".mp4", ".avi", ".mov", ".mpeg", ".mpg", ".gif", ".m4v", ".nii", ".nii.gz", ".nrrd", ".mha",
                      ".dcm")
DEFAULT_EXCLUDE = r"_mask(_\d+)?$"  # matched against the file stem (BUSI lesion masks)
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)  # train, val, test
UB_FILES = {"train_val.json": TRAIN_VAL, "train.json": "train", "validation.json": "val", "val.json": "val",
            "test.json": "test"}
UB_CLASS_KEYS = ("class", "pathology", "diagnosis", "organ", "region", "category")
UB_GROUP_KEYS = ("patient", "patient_id", "source", "video", "case")


class LabelledDataError(ValueError):
    """The labelled data cannot be read or split as asked (missing files, bad rows, too few samples)."""


class TooFewSamplesError(LabelledDataError):
    """A class has too few samples (or groups) to appear in every split."""


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: str
    group: str
    split: str | None = None  # train / val / test, TRAIN_VAL, or None when the data has no split
    scan_mask: Path | None = None  # a precomputed valid-region mask (UltraBench); otherwise USrc computes it


@dataclass
class LabelledSet:
    name: str
    root: Path
    items: list[LabelledImage]
    classes: list[str]
    split_source: str = "given by the data"
    _digest: str | None = field(default=None, repr=False)

    def indices(self, split: str) -> np.ndarray:
        return np.array([i for i, it in enumerate(self.items) if it.split == split], dtype=np.int64)

    def labels(self) -> np.ndarray:
        pos = {c: i for i, c in enumerate(self.classes)}
        return np.array([pos[it.label] for it in self.items], dtype=np.int64)

    def digest(self) -> str:
        """Hash of what the probe sees: every file's bytes, its label, split and group (computed once)."""
        if self._digest is None:
            h = hashlib.sha256()
            for it in self.items:
                h.update(f"{it.path.relative_to(self.root)}\0{it.label}\0{it.split}\0{it.group}\0".encode())
                h.update(_file_sha1(it.path).encode())
                if it.scan_mask is not None:
                    h.update(_file_sha1(it.scan_mask).encode())
            self._digest = h.hexdigest()
        return self._digest

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {s: {c: 0 for c in self.classes} for s in SPLITS}
        for it in self.items:
            out[it.split][it.label] += 1
        return out


def _file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -------------------------------------------------------------------------------------------- readers


def read_folder_per_class(root: Path, exclude: str | None = DEFAULT_EXCLUDE) -> list[LabelledImage]:
    exclude_re = re.compile(exclude, re.IGNORECASE) if exclude else None
    items, not_stills = [], []
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    for cdir in class_dirs:
        for p in sorted(cdir.rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                if p.name.lower().endswith(NOT_STILL_SUFFIXES):
                    not_stills.append(p)
                continue
            if exclude_re is not None and exclude_re.search(p.stem):
                continue
            rel = p.relative_to(root).as_posix()
            items.append(LabelledImage(path=p, label=cdir.name, group=rel))
    if not_stills:
        log.warning("%s: skipped %d video/volume file(s) (e.g. %s): the probe reads still images; extract "
                    "labelled frames to image files (or a CSV with a group column per video) to probe them",
                    root, len(not_stills), not_stills[0].name)
    if not items:
        raise LabelledDataError(f"no labelled images under {root}: expected ROOT/<class>/<image> "
                                f"({', '.join(IMAGE_SUFFIXES)}), a labels.csv, or UltraBench JSON files")
    return items


def read_csv_labels(csv_path: Path) -> list[LabelledImage]:
    root = csv_path.parent
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
        missing = {"path", "label"} - cols.keys()
        if missing:
            raise LabelledDataError(f"{csv_path}: missing column(s) {sorted(missing)}; "
                                    f"expected path,label[,split][,group]")
        items = []
        for line, row in enumerate(reader, start=2):
            rel = (row[cols["path"]] or "").strip()
            label = (row[cols["label"]] or "").strip()
            if not rel or not label:
                raise LabelledDataError(f"{csv_path}:{line}: empty path or label")
            split = (row[cols["split"]] or "").strip().lower() if "split" in cols else ""
            if split in ("validation", "valid"):
                split = "val"
            if split and split not in SPLITS + (TRAIN_VAL,):
                raise LabelledDataError(f"{csv_path}:{line}: split {split!r} is not one of {SPLITS}")
            group = (row[cols["group"]] or "").strip() if "group" in cols else ""
            path = resolve_in_root(root, rel)
            if not path.is_file():
                raise LabelledDataError(f"{csv_path}:{line}: image {rel!r} not found")
            items.append(LabelledImage(path=path, label=label, group=group or rel, split=split or None))
    if not items:
        raise LabelledDataError(f"{csv_path}: no rows")
    return items


def read_ultrabench(root: Path) -> list[LabelledImage]:
    items = []
    for fname, split in UB_FILES.items():
        fpath = root / fname
        if not fpath.is_file():
            continue
        entries = json.loads(fpath.read_text())
        if not isinstance(entries, list):
            raise LabelledDataError(f"{fpath}: expected a JSON array of examples")
        for k, e in enumerate(entries):
            if not isinstance(e, dict) or "image" not in e or "label" not in e:
                raise LabelledDataError(f"{fpath}[{k}]: an example needs 'image' and 'label'")
            name = next((str(e[key]) for key in UB_CLASS_KEYS if key in e), None)
            label = f"{int(e['label'])}:{name}" if name is not None else str(int(e["label"]))
            group = next((str(e[key]) for key in UB_GROUP_KEYS if key in e), str(e["image"]))
            path = resolve_in_root(root, str(e["image"]))
            if not path.is_file():
                raise LabelledDataError(f"{fpath}[{k}]: image {e['image']!r} not found")
            mask = resolve_in_root(root, str(e["scan_mask"])) if e.get("scan_mask") else None
            if mask is not None and not mask.is_file():
                mask = None
            items.append(LabelledImage(path=path, label=label, group=group, split=split, scan_mask=mask))
    return items


def _class_order(labels: list[str]) -> list[str]:
    # UltraBench labels are "<int>:<name>": keep the dataset's integer order; others sort by name.
    def key(c: str):
        head = c.split(":", 1)[0]
        return (0, int(head), c) if head.isdigit() else (1, 0, c)

    return sorted(set(labels), key=key)


# --------------------------------------------------------------------------------------------- splits


def group_by_pattern(items: list[LabelledImage], root: Path, pattern: str) -> list[LabelledImage]:
    """Group id = the first capture group (or the whole match) of ``pattern`` searched in the relative path."""
    rx = re.compile(pattern)
    out = []
    for it in items:
        rel = it.path.relative_to(root).as_posix()
        m = rx.search(rel)
        if m is None:
            raise LabelledDataError(f"{rel!r} does not match the group pattern {pattern!r}")
        out.append(replace(it, group=m.group(1) if rx.groups else m.group(0)))
    return out


def assign_splits(items: list[LabelledImage], fractions=DEFAULT_FRACTIONS, salt: str = "probe") -> list[LabelledImage]:
    """Give every item without a final split one, by group, stratified by class, stable across runs.

    Items with split None may go to train/val/test; items marked TRAIN_VAL only to train/val (the data
    fixed their test set). A group whose items disagree on what is fixed is an error.
    """
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or (f < 0).any() or f[0] <= 0 or f[1] <= 0 or f.sum() <= 0:
        raise LabelledDataError(f"split fractions must be three non-negative numbers (train, val, test) "
                                f"with train and val > 0, got {fractions}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        if it.split not in SPLITS:
            groups[it.group].append(i)
    fixed = {it.group: it.split for it in items if it.split in SPLITS}
    out = list(items)
    # Groups by (allowed splits, majority class); each bucket is cut independently.
    buckets: dict[tuple[str | None, str], list[str]] = defaultdict(list)
    for g, idx in groups.items():
        kinds = {items[i].split for i in idx}
        if len(kinds) > 1:
            raise LabelledDataError(f"group {g!r} mixes examples with different split markings "
                                    f"{sorted(map(str, kinds))}")
        if g in fixed:
            raise LabelledDataError(f"group {g!r} has examples already in split {fixed[g]!r} "
                                    f"and examples without one")
        majority = Counter(items[i].label for i in idx).most_common()
        top = min(lab for lab, n in majority if n == majority[0][1])
        buckets[(kinds.pop(), top)].append(g)
    for (kind, label), gs in sorted(buckets.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        gs.sort(key=lambda g: (stable_unit_hash(f"{salt}\0{g}"), g))
        n = len(gs)
        if kind == TRAIN_VAL:
            fr = np.array([f[0], f[1], 0.0]) / (f[0] + f[1])
        else:
            fr = f / f.sum()
        need = [s for s, x in zip(SPLITS, fr) if x > 0]
        if n < len(need):
            where = "train and val" if kind == TRAIN_VAL else "train, val and test"
            raise TooFewSamplesError(
                f"class {label!r} has only {n} group(s) (patients/videos/files) to split into {where}; "
                f"it needs at least {len(need)}: add examples or drop the class")
        n_test = max(1, int(round(n * fr[2]))) if fr[2] > 0 else 0
        n_val = max(1, int(round(n * fr[1])))
        while n_test + n_val > n - 1:  # keep a training group: shrink the larger held-out part
            if n_test > n_val or (n_test == n_val and n_test > 1):
                n_test -= 1
            else:
                n_val -= 1
        cuts = {"test": gs[:n_test], "val": gs[n_test:n_test + n_val], "train": gs[n_test + n_val:]}
        for split, members in cuts.items():
            for g in members:
                for i in groups[g]:
                    out[i] = replace(out[i], split=split)
    return out


def check_splits(items: list[LabelledImage], classes: list[str]) -> None:
    """Every class in every split (a probe can neither learn nor be scored on an absent class)."""
    present = {(it.split, it.label) for it in items}
    missing = [(c, s) for c in classes for s in SPLITS if (s, c) not in present]
    if missing:
        counts = Counter((it.label, it.split) for it in items)
        c, s = missing[0]
        have = ", ".join(f"{sp}={counts[(c, sp)]}" for sp in SPLITS)
        raise TooFewSamplesError(f"class {c!r} has no example in the {s!r} split ({have}); every class needs "
                                 f"at least one example in train, val and test")
    by_group: dict[str, set[str]] = defaultdict(set)
    for it in items:
        by_group[it.group].add(it.split)
    straddling = [g for g, s in by_group.items() if len(s) > 1]
    if straddling:
        log.warning("%d group(s) appear in more than one split as the data gives them (e.g. %r)",
                    len(straddling), straddling[0])


def load_labelled(root: str | Path, *, name: str | None = None, group_pattern: str | None = None,
                  fractions=DEFAULT_FRACTIONS, exclude: str | None = DEFAULT_EXCLUDE) -> LabelledSet:
    """Read a labelled set (folder-per-class, CSV, or UltraBench JSON) and complete its splits."""
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".csv":
        items, base = read_csv_labels(root), root.parent
    elif not root.is_dir():
        raise LabelledDataError(f"labelled data {root} is neither a folder nor a .csv file")
    elif (root / "labels.csv").is_file():
        items, base = read_csv_labels(root / "labels.csv"), root
    elif any((root / f).is_file() for f in UB_FILES):
        items, base = read_ultrabench(root), root
    else:
        items, base = read_folder_per_class(root, exclude), root
    base = base.resolve()
    items = [replace(it, path=it.path.resolve()) for it in items]
    if group_pattern:
        items = group_by_pattern(items, base, group_pattern)
    splits = {it.split for it in items}
    if splits <= set(SPLITS) and "val" not in splits and "train" in splits:
        # Train and test given, no validation set (GBCU, MMOTU): carve val out of train, by group.
        items = [replace(it, split=TRAIN_VAL) if it.split == "train" else it for it in items]
    split_source = "given by the data"
    if any(it.split not in SPLITS for it in items):
        made = "val carved from train" if all(it.split in (TRAIN_VAL, "test") for it in items) else "train/val/test"
        grouping = (f"groups from pattern {group_pattern!r}" if group_pattern
                    else "groups from the data (else one per file)")
        split_source = f"{made} made here: {grouping}, stratified by class, stable hash"
        items = assign_splits(items, fractions)
    classes = _class_order([it.label for it in items])
    if len(classes) < 2:
        raise LabelledDataError(f"{root}: a probe needs at least two classes, found {classes}")
    check_splits(items, classes)
    return LabelledSet(name=name or (root.stem if root.is_file() else root.name), root=base, items=items,
                       classes=classes, split_source=split_source)
