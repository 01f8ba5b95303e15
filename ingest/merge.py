"""Combine the part manifests of a ``--part i/N`` job array into one ``manifest.json`` and its corpus table.

Parts write distinct shard numbers (part i writes numbers i, i+N, i+2N, ...), so their shards can share one
folder; a part manifest in a sub-folder (e.g. copied back from another machine) is rebased so that every
shard path stays relative to, and inside, the merged manifest's folder.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

from usjepa.shards.format import FORMAT_VERSION, MANIFEST_NAME, resolve_in_root, write_json_atomic
from usjepa.shards.readers import build_corpus_table

_PART_RE = re.compile(r"manifest\.part-(\d+)-of-(\d+)\.json$")
_SAME = ("format_version", "preprocess", "split", "shuffle", "exclude", "inputs")


class MergeError(ValueError):
    pass


def find_part_manifests(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("manifest.part-*-of-*.json") if _PART_RE.search(p.name))


def merge_manifests(root: str | Path, parts: list[str | Path] | None = None) -> dict:
    """Merge part manifests (default: every ``manifest.part-i-of-N.json`` under ``root``) into
    ``root/manifest.json``. Refuses a missing or doubled part, parts made with different settings, and
    shard paths that collide or leave ``root``."""
    root = Path(root).resolve()
    paths = [Path(p).resolve() for p in parts] if parts else find_part_manifests(root)
    if not paths:
        raise MergeError(f"no manifest.part-*-of-*.json under {root}")
    seen: dict[int, Path] = {}
    n_parts = None
    docs = []
    for p in paths:
        m = _PART_RE.search(p.name)
        if not m:
            raise MergeError(f"{p.name} is not a part manifest name (manifest.part-i-of-N.json)")
        i, n = int(m.group(1)), int(m.group(2))
        if n_parts is not None and n != n_parts:
            raise MergeError(f"parts of different job arrays: {p.name} vs N={n_parts}")
        n_parts = n
        if i in seen:
            raise MergeError(f"part {i} given twice: {seen[i]} and {p}")
        seen[i] = p
        docs.append((p, json.loads(p.read_text())))
    missing = sorted(set(range(n_parts)) - set(seen))
    if missing:
        raise MergeError(f"parts {missing} of {n_parts} are missing: run them (or wait for them) before merging")
    first = docs[0][1]
    for p, d in docs:
        if "inputs" not in d:
            raise MergeError(f"{p.name} records no 'inputs' (made by an older usjepa-ingest): rerun that part")
    for p, d in docs[1:]:
        for k in _SAME:
            if d.get(k) != first.get(k):
                what = "source lists" if k == "inputs" else "settings"
                raise MergeError(f"{p.name}: {k!r} differs from {docs[0][0].name}; parts must share {what} "
                                 f"(same datasets, files and options)")
    shards, skipped, ignored, excluded_folders, short, datasets = [], [], [], [], [], {}
    for p, d in docs:
        for s in d["shards"]:
            rebased = dict(s)
            for field in ("path", "index"):
                rel = (p.parent / s[field]).resolve().relative_to(root).as_posix() if p.parent != root else s[field]
                resolve_in_root(root, rel)
                rebased[field] = rel
            shards.append(rebased)
        skipped += d.get("skipped", [])
        ignored += d.get("ignored", [])
        excluded_folders += d.get("excluded_folders", [])
        short += d.get("short_of_header", [])
        for name, v in d["datasets"].items():
            acc = datasets.setdefault(name, {k: v[k] for k in ("anatomy", "kind") if k in v})
            for k, x in v.items():
                if isinstance(x, int):
                    acc[k] = acc.get(k, 0) + x
                elif isinstance(x, dict):
                    sub = acc.setdefault(k, {})
                    for kk, xx in x.items():
                        sub[kk] = sub.get(kk, 0) + xx
                elif k not in acc:
                    acc[k] = x
    names = [s["path"] for s in shards]
    if len(set(names)) != len(names):
        raise MergeError("two parts wrote a shard with the same path (were they run with the same N?)")
    shards.sort(key=lambda s: s["path"])
    frames = sum(v["frames"]["train"] + v["frames"]["val"] for v in datasets.values())
    merged = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **{k: first[k] for k in _SAME[1:]},
        "part": f"merged {n_parts}",
        "datasets": datasets,
        "shards": shards,
        "skipped": sorted(skipped, key=lambda k: (k["dataset"], k["path"])),
        "ignored": ignored,
        "excluded_folders": excluded_folders,
        "short_of_header": sorted(short, key=lambda k: (k["dataset"], k["path"])),
        "summary": {"frames": frames, "sources": sum(v.get("sources", 0) for v in datasets.values()),
                    "skipped_files": len(skipped), "shards": len(shards),
                    "excluded_files": sum(v.get("excluded_files", 0) for v in datasets.values())},
    }
    write_json_atomic(root / MANIFEST_NAME, merged)
    build_corpus_table(root)
    return merged
