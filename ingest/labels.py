"""Where a labelled file's class comes from when no class folder says it: a file-name pattern or a CSV.

One implementation for ingest's dataset list (``labels: regex:<pattern>|csv:<file>``) and the probe's
``--label-pattern`` / CSV inputs:

* ``label_from_name(name, pattern)``: the first capture group of ``pattern`` searched in the file name
  (or the whole match when the pattern has no group); ``None`` when it does not match. POCUS is labelled
  this way: ``--label-pattern '^(Cov|Pneu|Reg)'``.
* ``read_label_rows(csv_path)``: rows of a CSV with the columns ``path,label[,split][,group][,frame]``
  (case-insensitive header; ``validation``/``valid`` mean ``val``). Paths are relative to the CSV's folder
  and checked lexically (no absolute path, no ``..``), so a symlinked file or folder inside that folder
  works while nothing can name a file outside it.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

CSV_COLUMNS = ("path", "label", "split", "group", "frame")
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test",
               "train_val": "train_val"}


class LabelError(ValueError):
    """A label source that cannot be used as written (bad pattern, bad CSV row); the message says where."""


def compile_label_pattern(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise LabelError(f"label pattern {pattern!r} is not a valid regular expression: {e}") from e


def label_from_name(name: str, pattern: str | re.Pattern) -> str | None:
    rx = compile_label_pattern(pattern) if isinstance(pattern, str) else pattern
    m = rx.search(name)
    if m is None:
        return None
    label = m.group(1) if rx.groups else m.group(0)
    return label or None


def relative_inside(root: Path, rel: str, where: str) -> Path:
    """``root / rel`` for a relative path that stays inside ``root`` lexically (symlinks are followed later)."""
    rel = rel.replace("\\", "/")
    if os.path.isabs(rel) or rel.startswith("/"):
        raise LabelError(f"{where}: path {rel!r} is absolute; it must be relative to {root}")
    norm = os.path.normpath(rel)
    if norm == ".." or norm.startswith("../"):
        raise LabelError(f"{where}: path {rel!r} escapes {root}")
    return root / norm


@dataclass(frozen=True)
class LabelRow:
    path: Path  # root / relative path (symlinks not resolved)
    rel: str
    label: str
    split: str | None
    group: str | None
    frame: int | None
    line: int


def read_label_rows(csv_path: str | os.PathLike) -> list[LabelRow]:
    csv_path = Path(csv_path)
    root = csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
        missing = {"path", "label"} - cols.keys()
        if missing:
            raise LabelError(f"{csv_path}: missing column(s) {sorted(missing)}; expected "
                             f"{','.join(CSV_COLUMNS[:2])}[,{'][,'.join(CSV_COLUMNS[2:])}]")

        def cell(row, name):
            return (row.get(cols[name]) or "").strip() if name in cols else ""

        rows = []
        for line, row in enumerate(reader, start=2):
            where = f"{csv_path}:{line}"
            rel, label = cell(row, "path"), cell(row, "label")
            if not rel or not label:
                raise LabelError(f"{where}: empty path or label")
            split_text = cell(row, "split").lower()
            if split_text and split_text not in SPLIT_NAMES:
                raise LabelError(f"{where}: split {split_text!r} is not one of train, val, test, train_val")
            frame_text = cell(row, "frame")
            try:
                frame = int(frame_text) if frame_text else None
            except ValueError:
                raise LabelError(f"{where}: frame {frame_text!r} is not a whole number") from None
            if frame is not None and frame < 0:
                raise LabelError(f"{where}: frame {frame} is negative")
            rows.append(LabelRow(path=relative_inside(root, rel, where), rel=os.path.normpath(rel), label=label,
                                 split=SPLIT_NAMES.get(split_text), group=cell(row, "group") or None,
                                 frame=frame, line=line))
    if not rows:
        raise LabelError(f"{csv_path}: no rows")
    return rows
