"""What to ingest: a dataset list (YAML/JSON) or folders, expanded into sources with split groups.

Dataset list (YAML or JSON)::

    datasets:
      - name: busi            # becomes the shard prefix and the key prefix
        root: busi            # relative to the list's folder (or absolute)
        anatomy: breast
        kind: image           # free text, copied into the manifest
        group_pattern: '_p(\\d+)_'   # optional: files whose names match share a group (a patient)
        exclude: ['*_seg.png']       # optional: extra glob patterns to leave out
        labels: folder        # optional: folder (default) | none | regex:<pattern> | csv:<file>

A plain folder is one dataset named after the folder (anatomy "unknown", kind "mixed"); a folder holding
``datasets.yaml`` is read as that list.

A *source* is one file. Its split group is the file itself (all frames of a video or volume go to the same
split), unless ``group_pattern`` matches its file name, when the group is the match — its first capture
group if it has one — for stills, videos and volumes alike (so a patient's clips and images share a split).
Files of other types (README, CSV) are listed as ``ignored`` in the manifest; they do not count as skipped.

Labels (``labels``):

* ``folder`` (default): the first folder below the dataset root (folder-per-class layout); None at the root;
* ``none``: no labels;
* ``regex:<pattern>``: searched in the file name; the label is the first capture group (or the whole
  match), None where it does not match — e.g. ``regex:^(Cov|Pneu|Reg|Vir)_`` for POCUS's name prefixes;
* ``csv:<file>``: a CSV (relative to the dataset list's folder) with a header holding ``path`` (relative
  to the dataset root) and ``label``, read by ``usjepa.ingest.labels.read_label_rows`` (the probe's CSV
  reader too); files it does not list get None.

Splits (``assign_splits``): a group is in validation when ``split_of_group`` says so (sha1 of the group),
and a dataset with at least ``MIN_GROUPS_FOR_VAL`` groups of which the hash put none in validation gets its
group with the smallest split hash moved there, so a large enough dataset is never validated on nothing.
Groups holding copies of one still (equal or near-equal perceptual hash, ``usjepa.ingest.duplicates``) then
share the split of the first of them by name (``duplicates_share_a_split``, logged).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from usjepa.ingest.labels import LabelError, compile_label_pattern, label_from_name, read_label_rows
from usjepa.ingest.readers import kind_of, native_messages_dropped
from usjepa.shards.format import DEFAULT_VAL_FRACTION, dataset_slug, split_of_group, stable_unit_hash

log = logging.getLogger(__name__)

# Label masks that datasets ship beside their images are annotations, not ultrasound frames: BUSI's
# "benign (1)_mask.png" and, for images with several lesions, "benign (4)_mask_1.png", "_mask_2", ...
# (the probe's default exclusion, ``_mask(_\d+)?$`` on the stem, leaves out the same files), and folders
# of masks: ``mask/``, ``masks/`` (DDTI's ``mask/*.gif``) or binary label images pairing 1:1 with the
# frames of a sibling folder whatever its name. Excluded files are counted in the manifest, not reported
# as skipped; ``--exclude ''`` keeps them all.
DEFAULT_EXCLUDE = ("*_mask.*", "*_mask_[0-9]*.*", "mask/", "masks/")
MIN_GROUPS_FOR_VAL = 20


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    root: Path
    anatomy: str = "unknown"
    kind: str = "mixed"
    group_pattern: str | None = None
    exclude: tuple[str, ...] = ()
    labels: str = "folder"  # folder | none | regex:<pattern> | csv:<file> (see the module doc)

    def to_dict(self) -> dict:
        return {"name": self.name, "root": str(self.root), "anatomy": self.anatomy, "kind": self.kind,
                "group_pattern": self.group_pattern, "exclude": list(self.exclude), "labels": self.labels}


@dataclass(frozen=True)
class Source:
    dataset: str
    rel: str  # posix path relative to the dataset root: what the sample's ``source`` field holds
    path: Path
    kind: str  # still / video / volume
    group: str
    label: str | None
    split: str | None = None  # set by assign_splits; None: split_of_group(group)

    @property
    def uid(self) -> str:
        return f"{self.dataset}\0{self.rel}"


@dataclass
class Listing:
    datasets: list[DatasetSpec]
    sources: list[Source]
    excluded: dict[str, int] = field(default_factory=dict)  # dataset -> files left out by exclude globs
    ignored: list[dict] = field(default_factory=list)  # files of types ingest does not read (README, CSV)
    unreadable: list[dict] = field(default_factory=list)  # folders os.walk could not list, with the reason
    excluded_folders: list[dict] = field(default_factory=list)  # folders left out whole (mask folders), per rule


def parse_part(text: str | None) -> tuple[int, int]:
    """'i/N' with 0 <= i < N -> (i, N); None -> (0, 1)."""
    if text is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not int(m.group(2)) or int(m.group(1)) >= int(m.group(2)):
        raise ValueError(f"--part must be i/N with 0 <= i < N, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def part_of(source: Source, n_parts: int) -> int:
    """Stable partition of sources over N machines (same answer on every machine and run), by split group:
    a patient's files land in one part, so per-part group counts add up in ``merge``."""
    return int(stable_unit_hash("part\0" + source.group) * n_parts)


def load_dataset_list(path: str | os.PathLike) -> list[DatasetSpec]:
    path = Path(path)
    text = path.read_text()
    doc = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    entries = doc.get("datasets") if isinstance(doc, dict) else doc
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a list of datasets (under 'datasets:')")
    specs = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "name" not in e or "root" not in e:
            raise ValueError(f"{path}: dataset entry {i} needs at least 'name' and 'root': {e!r}")
        root = Path(e["root"])
        root = root if root.is_absolute() else (path.parent / root)
        pattern = e.get("group_pattern")
        if pattern is not None:
            re.compile(pattern)
        labels = _check_labels(str(e.get("labels", "folder")), path.parent, f"{path}: dataset {e['name']!r}")
        specs.append(DatasetSpec(name=str(e["name"]), root=root.resolve(), anatomy=str(e.get("anatomy", "unknown")),
                                 kind=str(e.get("kind", "mixed")), group_pattern=pattern,
                                 exclude=tuple(e.get("exclude", ())), labels=labels))
    _check_unique([s.name for s in specs], path)
    return specs


def _check_labels(labels: str, base: Path, where: str) -> str:
    """Validate a ``labels`` value; a csv path is made absolute (relative to the dataset list's folder)."""
    if labels in ("folder", "none"):
        return labels
    kind, _, arg = labels.partition(":")
    if kind == "regex" and arg:
        try:
            compile_label_pattern(arg)
        except LabelError as e:
            raise ValueError(f"{where}: labels {e}") from None
        return labels
    if kind == "csv" and arg:
        p = Path(arg) if Path(arg).is_absolute() else (base / arg)
        if not p.is_file():
            raise ValueError(f"{where}: labels csv {p} not found")
        return f"csv:{p.resolve()}"
    raise ValueError(f"{where}: labels must be folder, none, regex:<pattern> or csv:<file>, got {labels!r}")


class _Labeller:
    """The label of a file under one dataset's ``labels`` rule."""

    def __init__(self, labels: str):
        self.kind, _, arg = labels.partition(":")
        self.pattern = compile_label_pattern(arg) if self.kind == "regex" else None
        # CSV paths are relative to the dataset root, compared as normalised relative paths
        self.by_path = {row.rel: row.label for row in read_label_rows(arg)} if self.kind == "csv" else {}

    def __call__(self, rel: str) -> str | None:
        if self.kind == "folder":
            parts = rel.split("/")
            return parts[0] if len(parts) > 1 else None
        if self.kind == "regex":
            return label_from_name(rel.rsplit("/", 1)[-1], self.pattern)
        if self.kind == "csv":
            return self.by_path.get(rel)
        return None


def datasets_from_args(inputs: list[str]) -> list[DatasetSpec]:
    """CLI inputs (dataset lists and/or folders) -> dataset specs."""
    specs: list[DatasetSpec] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir() and (p / "datasets.yaml").is_file():
            specs += load_dataset_list(p / "datasets.yaml")
        elif p.is_dir():
            specs.append(DatasetSpec(name=p.resolve().name, root=p.resolve()))
        elif p.is_file():
            specs += load_dataset_list(p)
        else:
            raise FileNotFoundError(f"input {item!r} is neither a folder nor a dataset list")
    _check_unique([s.name for s in specs], "the inputs")
    return specs


def _check_unique(names: list[str], where) -> None:
    slugs = [dataset_slug(n) for n in names]
    dup = {s for s in slugs if slugs.count(s) > 1}
    if dup:
        raise ValueError(f"{where}: dataset names must be unique (after slugging): {sorted(dup)}")


def list_sources(specs: list[DatasetSpec], exclude: tuple[str, ...] = DEFAULT_EXCLUDE) -> Listing:
    """Walk every dataset root (sorted, so the listing is the same on every machine). Symbolic links to
    folders are followed, each real folder once (a link to a folder listed already, or to an ancestor, is
    listed under ``ignored``); a folder that cannot be read is listed under ``unreadable`` with the reason.
    Globs ending in ``/`` leave out folders by name (case-insensitive), and with them any folder of binary
    label images pairing 1:1 by name with a sibling folder's frames (``_label_folders``)."""
    sources: list[Source] = []
    excluded: dict[str, int] = {}
    ignored: list[dict] = []
    unreadable: list[dict] = []
    excluded_folders: list[dict] = []
    for spec in specs:
        if not spec.root.is_dir():
            raise FileNotFoundError(f"dataset {spec.name!r}: root {spec.root} is not a folder")
        globs = tuple(exclude) + spec.exclude
        file_globs = tuple(g for g in globs if not g.endswith("/"))
        folder_globs = tuple(g[:-1].lower() for g in globs if g.endswith("/"))
        pattern = re.compile(spec.group_pattern) if spec.group_pattern else None
        label_of = _Labeller(spec.labels)
        n_excl = 0
        rel_of = lambda p: Path(p).relative_to(spec.root).as_posix()  # noqa: E731

        def unreadable_folder(e: OSError, spec=spec) -> None:
            unreadable.append({"dataset": spec.name, "path": rel_of(e.filename) + "/",
                               "reason": f"folder not readable: {e.strerror or e}"})

        # real folders first: a link into the tree is a second name for a folder listed anyway
        seen = {os.path.realpath(d) for d, _, _ in os.walk(spec.root, onerror=lambda e: None)}
        for dirpath, dirnames, filenames in os.walk(spec.root, followlinks=True, onerror=unreadable_folder):
            dirnames.sort()
            here = Path(dirpath)
            # a folder named like an image (x.png) is listed as a source, so that it is reported, not ignored
            names = sorted(filenames + [d for d in dirnames if kind_of(d)])
            keep = []
            for d in dirnames:
                if kind_of(d) or d.startswith("."):
                    continue
                if (here / d).is_symlink():
                    real = os.path.realpath(here / d)
                    if real in seen:
                        ignored.append({"dataset": spec.name, "path": rel_of(here / d) + "/",
                                        "reason": "symbolic link to a folder listed already (or to an ancestor)"})
                        continue
                    seen.update(os.path.realpath(x) for x, _, _ in os.walk(real, onerror=lambda e: None))
                keep.append(d)
            if folder_globs:
                label_folders = _label_folders(here, keep, names)
                for d in list(keep):
                    rule = next((g + "/" for g in folder_globs if fnmatch.fnmatch(d.lower(), g)), None)
                    if rule is None and d in label_folders:
                        rule = "binary label images pairing 1:1 with a sibling folder's frames"
                    if rule is not None:
                        n = sum(1 for _, _, fs in os.walk(here / d) for f in fs if kind_of(f))
                        excluded_folders.append({"dataset": spec.name, "path": rel_of(here / d) + "/", "files": n,
                                                 "rule": rule})
                        n_excl += n
                        keep.remove(d)
            dirnames[:] = keep
            for name in names:
                if name.startswith("."):
                    continue
                if any(fnmatch.fnmatch(name, g) for g in file_globs):
                    n_excl += 1
                    continue
                path = here / name
                rel = rel_of(path)
                kind = kind_of(name)
                if kind is None:
                    ignored.append({"dataset": spec.name, "path": rel, "reason": "not a frame format ingest reads"})
                    continue
                group = rel
                m = pattern.search(name) if pattern is not None else None
                if m:
                    group = m.group(1) if m.groups() else m.group(0)
                sources.append(Source(spec.name, rel, path, kind, f"{dataset_slug(spec.name)}:{group}", label_of(rel)))
        excluded[spec.name] = n_excl
    return Listing(specs, sources, excluded, ignored, unreadable, excluded_folders)


_LABEL_SAMPLE = 3  # label images decoded to tell a mask folder (few: they are small and this runs per folder)


def _label_folders(parent: Path, folders: list[str], parent_files: list[str]) -> set[str]:
    """The sub-folders of ``parent`` that hold label masks for frames stored beside them: (nearly) every
    file has a namesake (same stem) in a sibling folder or in ``parent`` itself, and the first few decode
    to at most two grey values (a binary mask), which their namesakes do not. DDTI's ``mask/*.gif`` beside
    ``cropped/*.png`` is the case this is for. One listing per folder and an index by stem, so a parent
    with thousands of sub-folders costs thousands of listings, not millions."""
    stems = {d: _frame_stems(parent / d) for d in folders}
    stems[""] = {Path(n).stem for n in parent_files if kind_of(n)}  # "": the parent's own files
    holders: dict[str, list[str]] = {}
    for d, st in stems.items():
        for stem in st:
            holders.setdefault(stem, []).append(d)
    found = set()
    for d in folders:
        mine = stems[d]
        matches = [o for o, n in Counter(o for s in mine for o in holders[s] if o != d).most_common(3)
                   if n >= 0.9 * len(mine)]
        if not matches:
            continue
        files = {Path(f).stem: f for f in _frame_files(parent / d)}
        picked = sorted(files)[:_LABEL_SAMPLE]
        if not all(_is_binary_image(parent / d / files[k]) for k in picked):
            continue  # frames, not masks (patients' folders often repeat the same file names)
        for other in matches:
            partners = {Path(f).stem: f for f in _frame_files(parent / other)}
            if not all(k in partners and _is_binary_image(parent / other / partners[k]) for k in picked):
                found.add(d)
                break
    return found


def _frame_files(folder: Path) -> list[str]:
    try:
        return [n for n in os.listdir(folder) if kind_of(n) in ("still", "video") and not n.startswith(".")]
    except OSError:
        return []


def _frame_stems(folder: Path) -> set[str]:
    return {Path(n).stem for n in _frame_files(folder)}


def _is_binary_image(path: Path) -> bool:
    """At most two distinct grey values in the first frame (False for anything that does not open)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > 16_000_000:  # no label image this large: not worth decoding
                return False
            return len(np.unique(np.asarray(im.convert("L")))) <= 2
    except Exception:
        return False


def assign_splits(listing: Listing, val_fraction: float = DEFAULT_VAL_FRACTION, map_chunks=map) -> Listing:
    """The listing with each source's ``split`` set (module doc). Computed from the whole listing, so
    every ``--part`` of a job array agrees. ``map_chunks``: an order-keeping map that hashes the stills'
    chunks (ingest passes its worker pool's)."""
    split: dict[str, str] = {}
    for spec in listing.datasets:
        groups = sorted({s.group for s in listing.sources if s.dataset == spec.name})
        mine = {g: split_of_group(g, val_fraction) for g in groups}
        if len(groups) >= MIN_GROUPS_FOR_VAL and val_fraction > 0 and "val" not in mine.values():
            mine[min(groups, key=lambda g: stable_unit_hash("split\0" + g))] = "val"
        split.update(mine)
    split.update(duplicates_share_a_split(listing.sources, split, map_chunks))
    sources = [dataclasses.replace(s, split=split[s.group]) for s in listing.sources]
    return dataclasses.replace(listing, sources=sources)


HASH_CHUNK = 64  # stills per job: ~0.1 s of decoding, far above a pool job's cost, and jobs enough to balance


def still_dhashes(paths: list[str]) -> list[int | None]:
    """``file_dhash`` of each still, None where it does not read (ingest skips it later, with its reason)."""
    from usjepa.ingest.duplicates import file_dhash

    hashes = []
    with native_messages_dropped():  # libjpeg's "Corrupt JPEG data" lines: the skip report comes later
        for path in paths:
            try:
                hashes.append(file_dhash(path))
            except OSError:
                hashes.append(None)
    return hashes


def duplicates_share_a_split(sources: list[Source], split: dict[str, str], map_chunks=map) -> dict[str, str]:
    """Groups holding copies of one still (``usjepa.ingest.duplicates``: equal or near-equal dHash) -> the
    split of the first of them by name, so a validation image is never a copy of a training one. The stills
    are hashed in chunks through ``map_chunks`` (a decode each: 27 min per million stills on one core)."""
    from usjepa.ingest.duplicates import duplicate_clusters

    stills = [s for s in sources if s.kind == "still"]
    paths = [str(s.path) for s in stills]
    chunks = [paths[i:i + HASH_CHUNK] for i in range(0, len(paths), HASH_CHUNK)]
    hashes = [h for chunk in map_chunks(still_dhashes, chunks) for h in chunk]
    joined: dict[int, set[str]] = {}
    for s, c in zip(stills, duplicate_clusters(hashes)):
        joined.setdefault(c, set()).add(s.group)
    moved: dict[str, str] = {}
    parent: dict[str, str] = {}  # groups joined through shared copies, transitively

    def find(g: str) -> str:
        while parent.get(g, g) != g:
            g = parent[g]
        return g

    for groups in joined.values():
        first = min(find(g) for g in groups)
        for g in groups:
            parent[find(g)] = first
    for g in parent:
        if split[g] != split[find(g)]:
            moved[g] = split[find(g)]
    if moved:
        log.warning("%d group(s) hold copies of images in another group (perceptual hash): moved to their "
                    "copies' split so that no validation image is a copy of a training one", len(moved))
    return moved


def group_counts(sources: list[Source]) -> dict[str, dict[str, int]]:
    """dataset -> {"train": groups, "val": groups} over the given sources."""
    out: dict[str, dict[str, set]] = {}
    for s in sources:
        out.setdefault(s.dataset, {"train": set(), "val": set()})[s.split or split_of_group(s.group)].add(s.group)
    return {d: {k: len(v) for k, v in c.items()} for d, c in out.items()}
