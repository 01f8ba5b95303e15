"""What to ingest: a dataset list (YAML/JSON) or folders, expanded into sources with split groups.

Dataset list (YAML or JSON)::

    datasets:
      - name: busi            # becomes the shard prefix and the key prefix
        root: busi            # relative to the list's folder (or absolute)
        anatomy: breast
        kind: image           # free text, copied into the manifest
        group_pattern: '_p(\\d+)_'   # optional: stills whose names match share a group (a patient)
        exclude: ['*_mask.png']      # optional: extra glob patterns to leave out
        labels: folder        # optional: 'folder' (default; folder-per-class) or 'none'

A plain folder is one dataset named after the folder (anatomy "unknown", kind "mixed"); a folder holding
``datasets.yaml`` is read as that list.

A *source* is one file. Its split group is the file itself for a video or a volume (all its frames go to the
same split) and for a still, unless ``group_pattern`` matches its name, when the group is the match (so a
patient's stills share a split). Files of other types (README, CSV) are listed as ``ignored`` in the
manifest; they do not count as skipped. The label is the first folder below the dataset root (folder-per-class
layout), or None for files at the root or with ``labels: none``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from usjepa.ingest.readers import kind_of
from usjepa.shards.format import dataset_slug, stable_unit_hash

# Label masks that datasets ship beside their images (BUSI's "benign (1)_mask.png") are annotations, not
# ultrasound frames. Excluded files are counted in the manifest, not reported as skipped.
DEFAULT_EXCLUDE = ("*_mask.*",)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    root: Path
    anatomy: str = "unknown"
    kind: str = "mixed"
    group_pattern: str | None = None
    exclude: tuple[str, ...] = ()
    labels: str = "folder"  # "folder": label = first folder below the root; "none": no labels

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

    @property
    def uid(self) -> str:
        return f"{self.dataset}\0{self.rel}"


@dataclass
class Listing:
    datasets: list[DatasetSpec]
    sources: list[Source]
    excluded: dict[str, int] = field(default_factory=dict)  # dataset -> files left out by exclude globs
    ignored: list[dict] = field(default_factory=list)  # files of types ingest does not read (README, CSV)


def parse_part(text: str | None) -> tuple[int, int]:
    """'i/N' with 0 <= i < N -> (i, N); None -> (0, 1)."""
    if text is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not int(m.group(2)) or int(m.group(1)) >= int(m.group(2)):
        raise ValueError(f"--part must be i/N with 0 <= i < N, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def part_of(source: Source, n_parts: int) -> int:
    """Stable partition of sources over N machines (same answer on every machine and run)."""
    return int(stable_unit_hash("part\0" + source.uid) * n_parts)


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
        labels = str(e.get("labels", "folder"))
        if labels not in ("folder", "none"):
            raise ValueError(f"{path}: dataset {e['name']!r}: labels must be 'folder' or 'none', got {labels!r}")
        specs.append(DatasetSpec(name=str(e["name"]), root=root.resolve(), anatomy=str(e.get("anatomy", "unknown")),
                                 kind=str(e.get("kind", "mixed")), group_pattern=pattern,
                                 exclude=tuple(e.get("exclude", ())), labels=labels))
    _check_unique([s.name for s in specs], path)
    return specs


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
    """Walk every dataset root (sorted, so the listing is the same on every machine)."""
    sources: list[Source] = []
    excluded: dict[str, int] = {}
    ignored: list[dict] = []
    for spec in specs:
        if not spec.root.is_dir():
            raise FileNotFoundError(f"dataset {spec.name!r}: root {spec.root} is not a folder")
        globs = tuple(exclude) + spec.exclude
        pattern = re.compile(spec.group_pattern) if spec.group_pattern else None
        n_excl = 0
        for dirpath, dirnames, filenames in os.walk(spec.root, followlinks=False):
            dirnames.sort()
            here = Path(dirpath)
            # a folder named like an image (x.png) is listed as a source, so that it is reported, not ignored
            names = sorted(filenames + [d for d in dirnames if kind_of(d)])
            dirnames[:] = [d for d in dirnames if not kind_of(d) and not d.startswith(".")]
            for name in names:
                if name.startswith("."):
                    continue
                if any(fnmatch.fnmatch(name, g) for g in globs):
                    n_excl += 1
                    continue
                path = here / name
                rel = path.relative_to(spec.root).as_posix()
                kind = kind_of(name)
                if kind is None:
                    ignored.append({"dataset": spec.name, "path": rel, "reason": "not a frame format ingest reads"})
                    continue
                group = rel
                if kind == "still" and pattern is not None:
                    m = pattern.search(name)
                    if m:
                        group = m.group(1) if m.groups() else m.group(0)
                parts = rel.split("/")
                label = parts[0] if len(parts) > 1 and spec.labels == "folder" else None
                sources.append(Source(spec.name, rel, path, kind, f"{dataset_slug(spec.name)}:{group}", label))
        excluded[spec.name] = n_excl
    return Listing(specs, sources, excluded, ignored)
