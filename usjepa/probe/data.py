"""Labelled data for probing: readers, leak-proof grouped splits, and the checks that make a set usable.

An item is one labelled *source* — a still image, a video, a volume, or the frames of one source inside
ingest's shards — with the frames to take from it (``frames``: explicit indices, or ``None`` for the one
image of a still and ``frames_per_video`` evenly spaced frames of a video or volume). Features are
extracted per frame (``features.py``); splits are made per item, so frames of one source can never land in
two splits. Layouts read (``load_labelled`` picks by what it finds):

* folder-per-class: ``ROOT/<class>/**/<file>``, stills, videos and volumes (symlinked files and folders are
  followed); files whose stem matches ``exclude`` (BUSI's ``*_mask.png`` lesion masks) are not probed;
* file-name labels: ``label_pattern`` searched in every file name under ROOT (``'^(Cov|Pneu|Reg)'``); files
  that do not match are left out (counted in the log);
* CSV (``ROOT/labels.csv`` or a ``.csv`` path): ``path,label[,split][,group][,frame]`` (``usjepa.ingest.labels``);
* ingest's shards (``ROOT/manifest.json``): the samples whose metadata carries a label; group and source
  from the metadata; with several datasets in one manifest the classes are ``<dataset>/<label>``;
* UltraBench's processed layout (``train_val.json`` / ``train.json`` / ``validation.json`` / ``test.json``,
  at ROOT or in its one ``<task>_v<version>/`` folder): records with ``image``, ``label``, ``source`` or
  ``patient``, ``scan_mask``; the test split is kept, validation is carved from ``train_val`` by group.

Splitting: items sharing a source or a group (patient / video: CSV ``group`` column, UltraBench
``patient``/``source``, shard metadata ``group``, or the first capture group of ``group_pattern`` on the
relative path) form one unit; units are stratified by their majority class, ordered by a stable hash of
their id, and cut at the requested fractions with at least one unit per class in every split. The same data
gives the same split on every run and machine; ``split_seed`` salts the hash for another draw (for the
spread of a small test set). ``leakage_check`` counts sources and groups found in two
splits; for made splits it is 0 by construction, a source straddling given splits is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from usjepa.ingest.readers import file_ext, kind_of
from usjepa.ingest.labels import LabelError, compile_label_pattern, label_from_name, read_label_rows, relative_inside
from usjepa.shards.format import stable_unit_hash

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
TRAIN_VAL = "train_val"  # a split the data names but does not divide (UltraBench's train_val.json)
DEFAULT_EXCLUDE = r"_mask(_\d+)?$"  # matched against the file stem (BUSI lesion masks)
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)  # train, val, test
# Patient ids in file or folder names ("Reg_pat1Image_…", "patient_12/"), searched when no group pattern is
# given: files of one patient are one split unit. Not preceded by a letter, so "compat2" does not match.
DEFAULT_PATIENT_PATTERN = r"(?i)(?<![a-z])pat(?:ient)?[ _-]?(\d+)"
DEFAULT_FRAMES_PER_VIDEO = 16
UB_FILES = {"train_val.json": TRAIN_VAL, "train.json": "train", "validation.json": "val", "val.json": "val",
            "test.json": "test"}
UB_CLASS_KEYS = ("class", "pathology", "diagnosis", "organ", "region", "category")
UB_GROUP_KEYS = ("patient", "patient_id", "case")  # across sources; the source itself is always a group too
UB_SOURCE_KEYS = ("source", "video")


class LabelledDataError(ValueError):
    """The labelled data cannot be read or split as asked (missing files, bad rows, too few samples)."""


class TooFewSamplesError(LabelledDataError):
    """A class has too few samples (or groups) to appear in every split."""


@dataclass(frozen=True)
class ShardFrame:
    """Where one preprocessed frame of a labelled source lies in ingest's shards."""

    tar: str
    frame: int
    image: tuple[int, int]  # (data offset, size) of KEY.jpg
    mask: tuple[int, int]  # of KEY.mask.png


@dataclass(frozen=True)
class LabelledItem:
    path: Path  # the file (ROOT / rel, symlinks kept); for shard items the first tar holding it
    rel: str  # path relative to the dataset root: names the item in reports, cache keys and noise seeds
    label: str
    kind: str  # still | video | volume | shard
    source: str  # the file the frames come from; never split across train/val/test
    group: str  # patient / video id; the source when the data names none
    split: str | None = None  # train / val / test, TRAIN_VAL, or None when the data has no split
    frames: tuple[int, ...] | None = None  # explicit frame indices; None: the still, or K evenly spaced
    scan_mask: Path | None = None  # a precomputed valid-region mask (UltraBench); otherwise USrc computes it
    shard_frames: tuple[ShardFrame, ...] = ()
    duplicate: str | None = None  # perceptual-hash cluster of copies of this still (kept in one split)


@dataclass
class LabelledSet:
    name: str
    root: Path
    items: list[LabelledItem]
    classes: list[str]
    split_source: str = "given by the data"
    grouping: str = "by source file"
    leakage: dict = field(default_factory=dict)
    duplicates: dict = field(default_factory=dict)
    _digest: str | None = field(default=None, repr=False)

    def indices(self, split: str) -> np.ndarray:
        return np.array([i for i, it in enumerate(self.items) if it.split == split], dtype=np.int64)

    def labels(self) -> np.ndarray:
        pos = {c: i for i, c in enumerate(self.classes)}
        return np.array([pos[it.label] for it in self.items], dtype=np.int64)

    def input_digest(self) -> str:
        """What the features depend on: every input file's relative path, size and mtime, and the frames
        asked of it (labels, splits and groups are not part of it: re-splitting reuses the features)."""
        if self._digest is None:
            h = hashlib.sha256()
            for it in self.items:
                h.update(f"{it.rel}\0{it.kind}\0{it.frames}\0{_stat(it.path)}\0".encode())
                if it.scan_mask is not None:
                    h.update(f"mask:{_stat(it.scan_mask)}\0".encode())
                for sf in it.shard_frames:
                    h.update(f"{sf.tar}:{_stat(Path(sf.tar))}:{sf.frame}:{sf.image}:{sf.mask}\0".encode())
            self._digest = h.hexdigest()
        return self._digest

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {s: {c: 0 for c in self.classes} for s in SPLITS}
        for it in self.items:
            out[it.split][it.label] += 1
        return out


def _stat(path: Path) -> str:
    st = os.stat(path)  # follows symlinks: a replaced target invalidates the cache
    return f"{st.st_size}:{st.st_mtime_ns}"


# -------------------------------------------------------------------------------------------- readers


def walk_files(root: Path) -> list[Path]:
    """Every regular file under ``root``, symlinked files and folders followed (each real folder once)."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop, or the same folder linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not name.startswith(".") and p.is_file():
                out.append(p)
    return out


def _item(root: Path, path: Path, label: str, **kw) -> LabelledItem:
    rel = path.relative_to(root).as_posix()
    kind = kind_of(path)
    frames = kw.pop("frames", None)
    if kind == "still":
        frames = None
    return LabelledItem(path=path, rel=rel, label=label, kind=kind, source=rel, group=kw.pop("group", None) or rel,
                        frames=frames, **kw)


def _probe_files(files: list[Path], exclude: str | None) -> list[Path]:
    """The stills, videos and volumes among ``files`` whose stem does not match ``exclude``."""
    exclude_re = re.compile(exclude, re.IGNORECASE) if exclude else None
    return [p for p in files if kind_of(p) is not None
            and (exclude_re is None or not exclude_re.search(p.name[:-len(file_ext(p))]))]


def read_folder_per_class(root: Path, exclude: str | None = DEFAULT_EXCLUDE) -> list[LabelledItem]:
    items = []
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    for cdir in class_dirs:
        items += [_item(root, p, cdir.name) for p in _probe_files(walk_files(cdir), exclude)]
    if not items:
        raise LabelledDataError(f"no labelled images, videos or volumes under {root}: expected ROOT/<class>/<file>, "
                                f"a labels.csv, a manifest.json of labelled shards, UltraBench JSON files, "
                                f"or a --label-pattern for labels in the file names")
    return items


def read_pattern_labels(root: Path, pattern: str, exclude: str | None = DEFAULT_EXCLUDE) -> list[LabelledItem]:
    rx = compile_label_pattern(pattern)
    items, unmatched = [], []
    for p in _probe_files(walk_files(root), exclude):
        label = label_from_name(p.name, rx)
        if label is None:
            unmatched.append(p.name)
        else:
            items.append(_item(root, p, label))
    if unmatched:
        log.info("%s: %d file(s) do not match the label pattern %r and are not probed (e.g. %s)",
                 root, len(unmatched), pattern, unmatched[0])
    if not items:
        raise LabelledDataError(f"no file under {root} matches the label pattern {pattern!r}")
    return items


def read_csv_labels(csv_path: Path) -> list[LabelledItem]:
    root = csv_path.parent
    rows = read_label_rows(csv_path)
    merged: dict[tuple, list] = {}  # rows of one (file, label, split, group) -> one item with their frames
    for r in rows:
        if not r.path.is_file():
            raise LabelledDataError(f"{csv_path}:{r.line}: file {r.rel!r} not found")
        if kind_of(r.path) is None:
            raise LabelledDataError(f"{csv_path}:{r.line}: {r.rel!r} is not an image, video or volume file")
        merged.setdefault((r.rel, r.label, r.split, r.group), []).append(r)
    items = []
    for (rel, label, split, group), rs in merged.items():
        frames = tuple(sorted({r.frame for r in rs if r.frame is not None})) or None
        items.append(_item(root, rs[0].path, label, split=split, group=group, frames=frames))
    return items


def _ultrabench_dir(root: Path) -> Path | None:
    if any((root / f).is_file() for f in UB_FILES):
        return root
    subs = [d for d in sorted(root.iterdir()) if d.is_dir() and any((d / f).is_file() for f in UB_FILES)]
    if len(subs) > 1:
        raise LabelledDataError(f"{root} holds several UltraBench datasets ({', '.join(d.name for d in subs)}): "
                                f"name one of them")
    return subs[0] if subs else None


def read_ultrabench(root: Path) -> list[LabelledItem]:
    items = []
    for fname, split in UB_FILES.items():
        fpath = root / fname
        if not fpath.is_file():
            continue
        try:
            entries = json.loads(fpath.read_text())
        except json.JSONDecodeError as e:
            raise LabelledDataError(f"{fpath}: not valid JSON ({e})") from e
        if not isinstance(entries, list):
            raise LabelledDataError(f"{fpath}: expected a JSON array of examples")
        for k, e in enumerate(entries):
            where = f"{fpath}[{k}]"
            if not isinstance(e, dict) or "image" not in e or "label" not in e:
                raise LabelledDataError(f"{where}: an example needs 'image' and 'label'")
            try:
                number = int(e["label"])
            except (TypeError, ValueError):
                raise LabelledDataError(f"{where}: label {e['label']!r} is not an integer") from None
            name = next((str(e[key]) for key in UB_CLASS_KEYS if key in e), None)
            label = f"{number}:{name}" if name is not None else str(number)
            path = relative_inside(root, str(e["image"]), where)
            if not path.is_file():
                raise LabelledDataError(f"{where}: image {e['image']!r} not found")
            mask = relative_inside(root, str(e["scan_mask"]), where) if e.get("scan_mask") else None
            if mask is not None and not mask.is_file():
                log.warning("%s: scan mask %r not found; the USrc mask is computed instead", where, e["scan_mask"])
                mask = None
            source = next((str(e[key]) for key in UB_SOURCE_KEYS if e.get(key) is not None), None)
            patient = next((str(e[key]) for key in UB_GROUP_KEYS if e.get(key) is not None), None)
            item = _item(root, path, label, split=split, scan_mask=mask)
            items.append(replace(item, source=source or item.rel, group=patient or source or item.rel))
    return items


def read_labelled_shards(root: Path, frames_per_video: int) -> list[LabelledItem]:
    """Labelled samples of ingest's shards, one item per (dataset, source, label), K evenly spaced frames."""
    from usjepa.shards.format import IMAGE_EXT, MASK_EXT, META_EXT, SampleMeta, load_manifest, read_index, read_member

    manifest = load_manifest(root)
    several = len(manifest["datasets"]) > 1  # "normal" of two anatomies are two classes: name them by dataset
    frames: dict[tuple[str, str, str], list] = defaultdict(list)
    groups: dict[tuple[str, str, str], str] = {}
    unlabelled = 0
    for shard in manifest["shards"]:
        idx = read_index(shard["abs_index"], tar_size=os.path.getsize(shard["abs_path"]))
        with open(shard["abs_path"], "rb") as f:
            for i in range(len(idx)):
                meta = SampleMeta.from_json(read_member(f, idx.offsets[META_EXT][i], idx.sizes[META_EXT][i]))
                if meta.label is None:
                    unlabelled += 1
                    continue
                key = (meta.dataset, meta.source, f"{meta.dataset}/{meta.label}" if several else meta.label)
                groups[key] = f"{meta.dataset}/{meta.group}"
                frames[key].append(ShardFrame(
                    tar=shard["abs_path"], frame=meta.frame,
                    image=(int(idx.offsets[IMAGE_EXT][i]), int(idx.sizes[IMAGE_EXT][i])),
                    mask=(int(idx.offsets[MASK_EXT][i]), int(idx.sizes[MASK_EXT][i]))))
    if not frames:
        raise LabelledDataError(f"{root}: the shards hold no labelled sample ({unlabelled} unlabelled): ingest "
                                f"the labelled set with labels (class folders or `labels:` in the dataset YAML)")
    if unlabelled:
        log.info("%s: %d unlabelled shard sample(s) are not probed", root, unlabelled)
    items = []
    for (dataset, source, label), fs in sorted(frames.items()):
        fs = sorted(fs, key=lambda s: s.frame)
        picked = tuple(fs[i] for i in evenly_spaced(len(fs), frames_per_video))
        rel = f"{dataset}/{source}"
        items.append(LabelledItem(path=Path(picked[0].tar), rel=rel, label=label, kind="shard", source=rel,
                                  group=groups[(dataset, source, label)], frames=tuple(s.frame for s in picked),
                                  shard_frames=picked))
    return items


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` positions spread evenly over ``range(n)``, first and last included (all of them when n ≤ k)."""
    if n <= k:
        return list(range(n))
    if k == 1:
        return [n // 2]
    return sorted({int(round(i * (n - 1) / (k - 1))) for i in range(k)})


def _class_order(labels: list[str]) -> list[str]:
    # UltraBench labels are "<int>:<name>": keep the dataset's integer order; others sort by name.
    def key(c: str):
        head = c.split(":", 1)[0]
        return (0, int(head), c) if head.isdigit() else (1, 0, c)

    return sorted(set(labels), key=key)


# --------------------------------------------------------------------------------------------- splits


def group_by_pattern(items: list[LabelledItem], pattern: str) -> list[LabelledItem]:
    """Group id = the first capture group (or the whole match) of ``pattern`` searched in the relative path."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise LabelledDataError(f"group pattern {pattern!r} is not a valid regular expression: {e}") from e
    out = []
    for it in items:
        m = rx.search(it.rel)
        if m is None:
            raise LabelledDataError(f"{it.rel!r} does not match the group pattern {pattern!r}")
        out.append(replace(it, group=m.group(1) if rx.groups else m.group(0)))
    return out


def default_patient_groups(items: list[LabelledItem]) -> tuple[list[LabelledItem], int]:
    """Items the data names no group for (group == source) whose relative path matches
    ``DEFAULT_PATIENT_PATTERN`` get the group ``patient <n>``; -> (items, how many matched)."""
    rx = re.compile(DEFAULT_PATIENT_PATTERN)
    out, matched = [], 0
    for it in items:
        m = rx.search(it.rel) if it.group == it.source else None
        if m:
            matched += 1
            it = replace(it, group=f"patient {int(m.group(1))}")
        out.append(it)
    return out, matched


def mark_duplicates(items: list[LabelledItem]) -> tuple[list[LabelledItem], dict]:
    """Still images with equal or near-equal perceptual hashes (``usjepa.ingest.duplicates``) get one
    ``duplicate`` cluster id (so they share a split) -> (items, report: clusters, files in them, clusters
    whose copies carry different labels, examples)."""
    from usjepa.ingest.duplicates import NEAR_BITS, duplicate_clusters, file_dhash

    stills = [i for i, it in enumerate(items) if it.kind == "still" and it.frames is None]
    hashes = [file_dhash(items[i].path) for i in stills]
    cluster = duplicate_clusters(hashes)
    members: dict[int, list[int]] = defaultdict(list)
    for k, c in enumerate(cluster):
        members[c].append(stills[k])
    out = list(items)
    clusters = [m for m in members.values() if len(m) > 1]
    for m in clusters:
        name = min(items[i].rel for i in m)
        for i in m:
            out[i] = replace(out[i], duplicate=name)
    hash_of = dict(zip(stills, hashes))
    exact = sum(1 for m in clusters if len({hash_of[i] for i in m}) == 1)
    cross = [m for m in clusters if len({items[i].label for i in m}) > 1]
    report = {"stills_hashed": len(stills), "clusters": len(clusters), "files_in_clusters": sum(map(len, clusters)),
              "exact_clusters": exact, "clusters_with_two_labels": len(cross), "near_bits": NEAR_BITS,
              "examples": [[f"{items[i].rel} ({items[i].label})" for i in m] for m in (cross + clusters)[:5]]}
    if clusters:
        log.warning("%d group(s) of duplicate images (%d files, %d with different labels, e.g. %s): each group is "
                    "kept in one split", len(clusters), report["files_in_clusters"], len(cross),
                    " = ".join(report["examples"][0]))
    return out, report


def split_units(items: list[LabelledItem]) -> list[int]:
    """Unit id per item: items sharing a source, a group or a duplicate cluster are one unit (union-find), so
    a patient's videos, a video's frames and the copies of one image always land in one split."""
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, it in enumerate(items):
        for key in (("source", it.source), ("group", it.group), ("duplicate", it.duplicate)):
            if key[1] is None:
                continue
            j = first.setdefault(key, i)
            parent[find(i)] = find(j)
    return [find(i) for i in range(len(items))]


def split_salt(split_seed: int) -> str:
    """The hash salt of split draw ``split_seed``; draw 0 is the split every earlier report used."""
    if split_seed < 0:
        raise LabelledDataError(f"split seed must be ≥ 0, got {split_seed}")
    return "probe" if split_seed == 0 else f"probe/{split_seed}"


def assign_splits(items: list[LabelledItem], fractions=DEFAULT_FRACTIONS, salt: str = "probe") -> list[LabelledItem]:
    """Give every item without a final split one, by unit (``split_units``), stratified by class, stable.

    Items with split None may go to train/val/test; items marked TRAIN_VAL only to train/val (the data
    fixed their test set); items with a given split keep it. A unit mixing None and TRAIN_VAL is an error.
    """
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or (f < 0).any() or f[0] <= 0 or f[1] <= 0:
        raise LabelledDataError(f"split fractions must be three non-negative numbers (train, val, test) "
                                f"with train and val > 0, got {list(fractions)}")
    free = [i for i, it in enumerate(items) if it.split not in SPLITS]
    unit_of = split_units([items[i] for i in free])
    units: dict[int, list[int]] = defaultdict(list)
    for i, u in zip(free, unit_of):
        units[u].append(i)
    out = list(items)
    buckets: dict[tuple[str | None, str], list[tuple[str, int]]] = defaultdict(list)
    for u, idx in units.items():
        kinds = {items[i].split for i in idx}
        if len(kinds) > 1:
            raise LabelledDataError(f"group {items[idx[0]].group!r} mixes examples with different split markings "
                                    f"{sorted(map(str, kinds))}")
        majority = Counter(items[i].label for i in idx).most_common()
        top = min(lab for lab, n in majority if n == majority[0][1])
        name = min(f"{items[i].group}\0{items[i].source}" for i in idx)  # stable id of the unit
        buckets[(kinds.pop(), top)].append((name, u))
    for (kind, label), members in sorted(buckets.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        members.sort(key=lambda m: (stable_unit_hash(f"{salt}\0{m[0]}"), m[0]))
        n = len(members)
        fr = np.array([f[0], f[1], 0.0]) / (f[0] + f[1]) if kind == TRAIN_VAL else f / f.sum()
        need = [s for s, x in zip(SPLITS, fr) if x > 0]
        if n < len(need):
            where = "train and val" if kind == TRAIN_VAL else "train, val and test"
            raise TooFewSamplesError(
                f"class {label!r} has only {n} independent source(s)/group(s) (patients/videos/files) to split "
                f"into {where}; it needs at least {len(need)}: add examples or leave the class out")
        n_test = max(1, int(round(n * fr[2]))) if fr[2] > 0 else 0
        n_val = max(1, int(round(n * fr[1])))
        while n_test + n_val > n - 1:  # keep a training unit: shrink the larger held-out part
            if n_test > n_val or (n_test == n_val and n_test > 1):
                n_test -= 1
            else:
                n_val -= 1
        cuts = {"test": members[:n_test], "val": members[n_test:n_test + n_val], "train": members[n_test + n_val:]}
        for split, ms in cuts.items():
            for _, u in ms:
                for i in units[u]:
                    out[i] = replace(out[i], split=split)
    return out


def check_sources_in_one_split(items: list[LabelledItem]) -> None:
    """Frames of one source share one split marking (or none), whatever the labels file says."""
    marks: dict[str, set] = defaultdict(set)
    for it in items:
        marks[it.source].add(it.split)
    for source, m in marks.items():
        if len(m) > 1:
            raise LabelledDataError(f"source {source!r} has examples marked {sorted(map(str, m))}: frames of one "
                                    f"video / volume / file must all be in one split (or none, to let the "
                                    f"probe split them)")


def leakage_check(items: list[LabelledItem]) -> dict:
    """How many sources and groups have items in more than one split (0 and 0 for a leak-free split)."""
    def straddling(key) -> list[str]:
        where: dict[str, set] = defaultdict(set)
        for it in items:
            where[key(it)].add(it.split)
        return sorted(g for g, s in where.items() if len(s) > 1)

    sources, groups = straddling(lambda it: it.source), straddling(lambda it: it.group)
    dups = [d for d in straddling(lambda it: it.duplicate) if d is not None]
    return {"sources": len({it.source for it in items}), "groups": len({it.group for it in items}),
            "sources_in_two_splits": len(sources), "groups_in_two_splits": len(groups),
            "duplicates_in_two_splits": len(dups), "examples": (sources + groups + dups)[:3]}


def check_class_counts(classes: list[str], counts: dict[str, dict[str, int]], what: str = "example") -> None:
    """Every class in every split: a probe can neither learn nor be scored on an absent class."""
    for c in classes:
        for s in SPLITS:
            if counts[s][c] < 1:
                have = ", ".join(f"{sp}={counts[sp][c]}" for sp in SPLITS)
                raise TooFewSamplesError(f"class {c!r} has no {what} in the {s!r} split ({have}); every class "
                                         f"needs at least one in train, val and test")


def load_labelled(root: str | Path, *, name: str | None = None, group_pattern: str | None = None,
                  label_pattern: str | None = None, fractions=DEFAULT_FRACTIONS,
                  exclude: str | None = DEFAULT_EXCLUDE,
                  frames_per_video: int = DEFAULT_FRAMES_PER_VIDEO, split_seed: int = 0) -> LabelledSet:
    """Read a labelled set (see the module docstring for the layouts) and complete its splits.

    ``split_seed`` draws another made split (0: the default one); splits the data gives are kept."""
    if frames_per_video < 1:
        raise LabelledDataError(f"frames per video must be ≥ 1, got {frames_per_video}")
    salt = split_salt(split_seed)
    root = Path(os.path.abspath(Path(root).expanduser()))  # absolute, symlinks kept (relative paths stay valid)
    try:
        items, base = _read_any(root, label_pattern, exclude, frames_per_video)
    except LabelError as e:
        raise LabelledDataError(str(e)) from e
    except re.error as e:
        raise LabelledDataError(f"exclude pattern {exclude!r} is not a valid regular expression: {e}") from e
    patients = 0
    if group_pattern:
        items = group_by_pattern(items, group_pattern)
    else:
        items, patients = default_patient_groups(items)
    items, duplicates = mark_duplicates(items)
    check_sources_in_one_split(items)
    splits = {it.split for it in items}
    if splits <= set(SPLITS) and "val" not in splits and "train" in splits:
        # Train and test given, no validation set (GBCU, MMOTU): carve val out of train, by unit.
        items = [replace(it, split=TRAIN_VAL) if it.split == "train" else it for it in items]
    grouping = "by source file (video / volume / image)"
    named = {it.group for it in items} != {it.source for it in items}
    if group_pattern:
        grouping += f" and by group pattern {group_pattern!r} on the relative path"
    elif patients:
        grouping += (f" and by patient ids in file names ({patients} file(s) match {DEFAULT_PATIENT_PATTERN!r}; "
                     f"--group-pattern replaces it)")
    elif named:
        grouping += " and by the data's groups (patient / video)"
    split_source = "given by the data"
    if any(it.split not in SPLITS for it in items):
        made = "val carved from train" if all(it.split in (TRAIN_VAL, "test") for it in items) else "train/val/test"
        split_source = f"{made} made here, stratified by class, stable hash" + (
            f", split seed {split_seed}" if split_seed else "")
    items = assign_splits(items, fractions, salt=salt)
    classes = _class_order([it.label for it in items])
    if len(classes) < 2:
        raise LabelledDataError(f"{root}: a probe needs at least two classes, found {classes or 'none'}")
    leak = leakage_check(items)
    if leak["groups_in_two_splits"]:
        log.warning("%s: %d group(s) appear in more than one split as the data gives them (e.g. %r)",
                    root, leak["groups_in_two_splits"], leak["examples"][0])
    if duplicates["clusters"]:
        grouping += f"; {duplicates['clusters']} duplicate-image group(s) kept in one split each"
    data = LabelledSet(name=name or (root.stem if root.is_file() else root.name), root=base, items=items,
                       classes=classes, split_source=split_source, grouping=grouping, leakage=leak,
                       duplicates=duplicates)
    check_class_counts(classes, data.counts())
    return data


def _read_any(root: Path, label_pattern, exclude, frames_per_video) -> tuple[list[LabelledItem], Path]:
    if root.is_file() and root.suffix.lower() == ".csv":
        return read_csv_labels(root), root.parent
    if not root.is_dir():
        raise LabelledDataError(f"labelled data {root} is neither a folder nor a .csv file")
    if label_pattern:
        return read_pattern_labels(root, label_pattern, exclude), root
    if (root / "labels.csv").is_file():
        return read_csv_labels(root / "labels.csv"), root
    if (root / "manifest.json").is_file():
        return read_labelled_shards(root, frames_per_video), root
    ub = _ultrabench_dir(root)
    if ub is not None:
        return read_ultrabench(ub), ub
    return read_folder_per_class(root, exclude), root
