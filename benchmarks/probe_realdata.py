"""The probe on the shared real data: BUSI (class folders), POCUS (labels from the file-name prefix
Cov / Pneu / Reg, grouped by video), DDTI (TI-RADS from diagnosis.csv, grouped by patient), for a random-init
ViT-B/16 and the ``make demo`` student and teacher, with both classifiers over five seeds.

    make demo    # writes demo_out/stage{1_teacher,2_student}/export/encoder_best.safetensors
    nice python -m benchmarks.probe_realdata --out runs/probe_realdata

DDTI ships its labels as ``diagnosis.csv`` keyed ``P_I.jpg_P(N)`` (patient P, image I, nodule N; the crop is
``cropped/P_I(N).png``, or ``cropped/P_I.png`` when the image has one nodule; rows without a TI-RADS
category are left out). This script writes that as the probe's own CSV (``path,label,group``) in
``OUT/ddti_labelled/`` beside a symbolic link to the crops, so the real files are read in place.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
from pathlib import Path

from usjepa.probe.run import probe_encoders

REPO = Path(__file__).resolve().parents[1]
DDTI_KEY = re.compile(r"^(\d+)_(\d+)\.jpg_\d+\((\d+)\)$")


def ddti_nodules(ddti: Path) -> list[tuple[str, str, str]]:
    """(crop file name in ``cropped/``, TI-RADS category, patient number) of every nodule of
    ``diagnosis.csv`` that has a category and a crop on disk."""
    out = []
    with open(ddti / "diagnosis.csv", newline="") as f:
        for key, label in csv.reader(f):
            m = DDTI_KEY.match(key.strip())
            if not m or not label.strip():
                continue
            patient, image, nodule = m.groups()
            for name in (f"{patient}_{image}({nodule}).png", f"{patient}_{image}.png"):
                if (ddti / "cropped" / name).is_file():
                    out.append((name, label.strip(), patient))
                    break
    return out


def ddti_labels_csv(ddti: Path, out: Path) -> Path:
    """``OUT/labels.csv`` (path, label, group = patient) and ``OUT/cropped`` -> the real crops."""
    out.mkdir(parents=True, exist_ok=True)
    link = out / "cropped"
    if not link.exists():
        os.symlink(os.path.abspath(ddti / "cropped"), link)
    rows = [{"path": f"cropped/{name}", "label": f"TI-RADS {tirads}", "group": f"patient {patient}"}
            for name, tirads, patient in ddti_nodules(ddti)]
    path = out / "labels.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "group"])
        w.writeheader()
        w.writerows(rows)
    return path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--realdata", type=Path, default=REPO.parent / "shared" / "realdata")
    ap.add_argument("--demo", type=Path, default=REPO / "demo_out", help="make demo's output folder")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "probe_realdata")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--datasets", default="busi,pocus,ddti")
    args = ap.parse_args(argv)

    roots = {"busi": args.realdata / "busi", "pocus": args.realdata / "pocus",
             "ddti": ddti_labels_csv(args.realdata / "ddti", args.out / "ddti_labelled")}
    wanted = [d for d in args.datasets.split(",") if d]
    encoders = {
        "random-init ViT-B/16": "random:vit_base_patch16_224",
        "demo student (tiny)": str(args.demo / "stage2_student" / "export" / "encoder_best.safetensors"),
        "demo teacher (tiny)": str(args.demo / "stage1_teacher" / "export" / "encoder_best.safetensors"),
    }
    res = probe_encoders(encoders, {d: roots[d] for d in wanted}, args.out, seeds=args.seeds, classifier="both",
                         label_pattern={"pocus": r"^(Cov|Pneu|Reg)"}, progress=True)
    print(Path(res["files"]["markdown"]).read_text())
    return res


if __name__ == "__main__":
    main()
