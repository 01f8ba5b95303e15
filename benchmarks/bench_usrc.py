"""USrc mask quality: IoU against hand-fitted sector outlines, new algorithm vs the previous one, in one run.

    python -m benchmarks.bench_usrc --out benchmarks/results

Sets:
* ``pocus``, ``busi``: every file of ../shared/realdata/{pocus,busi} (lesion masks excluded), truth from
  ``benchmarks/usrc_truth/<set>/<file>.json`` (see ``benchmarks/usrc_truth.py``). A video is scored on its
  clip mask (one mask per clip, as ingest computes it), against the clip's sector outline.
* ``ddti``: the thyroid crops; their truth is the whole frame (the crops were cut inside the scan, see
  docs/ingest.md), except for the files with a JSON under ``usrc_truth/ddti/`` (crops that kept part of
  the scanner's display, found by looking at the lowest-scoring files).
* ``synthetic``: frames with known geometry, one per failure class of issue 12 (``synthetic_cases``).

Throughput: ``usjepa-ingest run`` of ../shared/realdata/pocus (videos) and of the DDTI crops (stills)
with one worker, frames/s with the new mask vs the old one (monkeypatched into the pipeline), alternated and repeated in this process; and the time of
one mask computation per real file, old vs new (one thread).

``usrc_mask_baseline`` is the previous algorithm, kept here as the baseline only (not a user option).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.common import hardware, hardware_line, save_result, utc_now
from benchmarks.usrc_truth import load_truth, rasterize

REPO = Path(__file__).resolve().parents[1]
REALDATA = Path(os.environ.get("USJEPA_REALDATA", REPO.parent / "shared" / "realdata"))


def _disc(radius: int) -> np.ndarray:
    r = max(1, int(radius))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def usrc_mask_baseline(frames: np.ndarray, cfg=None) -> np.ndarray:
    """The USrc mask before issue 12: max projection minus static bright pixels, threshold 12, opening,
    largest component(s), closing, convex hull."""
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    threshold, min_region = 12, 0.05
    signal = frames.max(axis=0)
    n = frames.shape[0]
    if n >= 8:
        step = max(1, n // 32)
        std = frames[::step].astype(np.float32).std(axis=0)
        static_bright = (std < 1.0) & (signal > 3 * threshold)
        if static_bright.mean() < 0.5:
            signal = np.where(static_bright, 0, signal).astype(np.uint8)
    h, w = signal.shape
    fg = (signal > threshold).astype(np.uint8)
    opened = cv2.morphologyEx(fg, cv2.MORPH_OPEN, _disc(round(0.02 * min(h, w))))
    n_lab, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    if n_lab > 1:
        areas = stats[1:, cv2.CC_STAT_AREA]
        region = np.isin(labels, 1 + np.flatnonzero(areas >= 0.15 * areas.max())).astype(np.uint8)
    else:
        region = np.zeros_like(fg)
    if region.sum() < min_region * h * w:
        mask = fg.astype(bool)
        return mask if mask.any() else np.ones((h, w), bool)
    region = cv2.morphologyEx(region, cv2.MORPH_CLOSE, _disc(round(0.03 * min(h, w))))
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(np.concatenate(contours)), 1)
    return mask.astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / u if u else 1.0


def clip_frames(path: Path, cfg) -> np.ndarray:
    """The prepared (gray, resized) frames of one file, as ingest gives them to the mask."""
    from usjepa.ingest.preprocess import prepare_frame
    from usjepa.ingest.readers import open_frames

    return np.stack([prepare_frame(f, cfg)[0] for _, f in open_frames(path)])


# ------------------------------------------------------------------------------------ synthetic cases


def _speckle(rng, shape, level):
    return np.clip(level * rng.rayleigh(0.6, shape), 0, 255)


def _fan(h, w, apex, half_angle, r0, r1):
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    d, a = np.hypot(xx - apex[0], yy - apex[1]), np.arctan2(xx - apex[0], yy - apex[1])
    return (d >= r0) & (d <= r1) & (np.abs(a) <= half_angle)


def synthetic_cases(seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, frames [N,h,w] uint8 gray, true region) for each failure class of issue 12."""
    rng = np.random.default_rng(seed)
    h = w = 320
    out = []
    yy = np.mgrid[0:h, 0:w][0] + 0.5
    # 1. dark field (video): bright near field, deep fan at levels 2-6 that only flickers
    sector = _fan(h, w, (160, -120), 0.55, 140, 420)
    depth = np.clip(1.0 - (yy - 20) / 200.0, 0.03, 1.0)
    frames = np.stack([np.where(sector, _speckle(rng, (h, w), 110) * depth, 0) for _ in range(16)]).astype(np.uint8)
    out.append(("dark_field_video", frames, sector))
    # 2. grey background outside a curved sector (video)
    sector = _fan(h, w, (160, -200), 0.45, 210, 500)
    frames = np.stack([np.where(sector, _speckle(rng, (h, w), 90), 22) for _ in range(16)]).astype(np.uint8)
    out.append(("grey_background_video", frames, sector))
    # 3. black corners of a still cropped from a fan (the fan is wider than the frame at depth)
    sector = _fan(h, w, (160, -160), 0.7, 0, 470)
    still = np.where(sector, _speckle(rng, (h, w), 100), 0).astype(np.uint8)
    out.append(("black_corners_still", still[None], sector))
    # 4. text and calipers over the tissue of a linear still (white strokes; truth excludes them)
    rect = np.zeros((h, w), bool)
    rect[10:300, 20:300] = True
    img = np.where(rect, _speckle(rng, (h, w), 90), 0).astype(np.uint8)
    cv2.putText(img, "RT AXILLA", (40, 260), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 255, 2)
    for cx, cy in ((120, 120), (200, 150)):
        cv2.line(img, (cx - 6, cy), (cx + 6, cy), 255, 1)
        cv2.line(img, (cx, cy - 6), (cx, cy + 6), 255, 1)
    strokes = (img == 255) & rect
    out.append(("text_over_tissue_still", img[None], rect & ~cv2.dilate(strokes.astype(np.uint8), _disc(1)).astype(bool)))
    # 5. split sector (video): an anechoic band across the whole fan
    sector = _fan(h, w, (160, -150), 0.5, 160, 460)
    d = np.hypot(np.mgrid[0:h, 0:w][1] + 0.5 - 160, yy + 150)
    band = (d > 250) & (d < 320)
    frames = np.stack([np.where(sector & ~band, _speckle(rng, (h, w), 100), 0) for _ in range(16)]).astype(np.uint8)
    out.append(("split_sector_video", frames, sector))
    # 6. dark half of a still sector (rib shadow along one edge), pixel levels 1-4 there
    sector = _fan(h, w, (160, -100), 0.6, 110, 400)
    xx = np.mgrid[0:h, 0:w][1]
    img = np.where(sector, np.where(xx < 110, _speckle(rng, (h, w), 5), _speckle(rng, (h, w), 110)), 0)
    out.append(("rib_shadow_still", img.astype(np.uint8)[None], sector))
    return out


# ------------------------------------------------------------------------------------------ quality


def score_set(name: str, cfg) -> list[dict]:
    from usjepa.ingest.preprocess import compute_usrc_mask

    rows = []
    for rec in load_truth(name):
        path = REALDATA / name / rec["file"]
        if not path.is_file():
            continue
        frames = clip_frames(path, cfg)
        truth = rasterize(rec["polygon"], rec["width"], rec["height"], frames.shape[1:])
        t0 = time.perf_counter()
        old = usrc_mask_baseline(frames)
        t1 = time.perf_counter()
        new = compute_usrc_mask(frames, cfg)
        t2 = time.perf_counter()
        rows.append({"set": name, "file": rec["file"], "frames": len(frames), "old": iou(old, truth),
                     "new": iou(new, truth), "old_ms": 1e3 * (t1 - t0), "new_ms": 1e3 * (t2 - t1)})
    return rows


def score_ddti(cfg, limit: int | None = None) -> list[dict]:
    from usjepa.ingest.preprocess import compute_usrc_mask

    files = sorted((REALDATA / "ddti" / "cropped").glob("*.png"))[:limit]
    exceptions = {r["file"]: r for r in load_truth("ddti")}
    rows = []
    for p in files:
        frames = clip_frames(p, cfg)
        rec = exceptions.get("cropped/" + p.name)
        truth = (rasterize(rec["polygon"], rec["width"], rec["height"], frames.shape[1:]) if rec
                 else np.ones(frames.shape[1:], bool))
        rows.append({"set": "ddti", "file": "cropped/" + p.name, "frames": 1,
                     "old": iou(usrc_mask_baseline(frames), truth), "new": iou(compute_usrc_mask(frames, cfg), truth)})
    return rows


def score_synthetic(cfg) -> list[dict]:
    from usjepa.ingest.preprocess import compute_usrc_mask

    return [{"set": "synthetic", "file": name, "frames": len(fr), "old": iou(usrc_mask_baseline(fr), truth),
             "new": iou(compute_usrc_mask(fr, cfg), truth)} for name, fr, truth in synthetic_cases()]


# --------------------------------------------------------------------------------------- throughput


def ingest_fps(rounds: int = 2) -> dict:
    """Frames/s of a 1-worker ingest with the new vs the old mask, alternated in this process: the POCUS
    videos (one mask per clip) and the DDTI stills (one mask per image, where the mask's cost shows most)."""
    import webdataset  # noqa: F401  (imported once, outside the clock)

    from usjepa.ingest import pipeline
    from usjepa.ingest.sources import DatasetSpec

    real = pipeline.compute_usrc_mask
    corpora = {"pocus videos": REALDATA / "pocus", "ddti stills": REALDATA / "ddti" / "cropped"}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, root in corpora.items():
            if not root.is_dir():
                continue
            fps = {"new": [], "old": []}
            for r in range(rounds):
                for which, fn in (("old", lambda fr, cfg: usrc_mask_baseline(fr)), ("new", real)):
                    pipeline.compute_usrc_mask = fn
                    try:
                        t0 = time.perf_counter()
                        m = pipeline.run_ingest([DatasetSpec(root.name, root)],
                                                pipeline.IngestOptions(out=Path(tmp) / f"{root.name}{which}{r}",
                                                                       workers=1, progress=False))
                        fps[which].append(m["summary"]["frames"] / (time.perf_counter() - t0))
                    finally:
                        pipeline.compute_usrc_mask = real
            out[name] = {"frames_per_s": fps, "ratio_new_vs_old": [n / o for n, o in zip(fps["new"], fps["old"])]}
    return out


# ------------------------------------------------------------------------------------------ figures

FAILING = ["pocus_videos/convex/Reg_Avi_Video_001.mp4", "pocus_videos/convex/Pneu_Pneumonia-LITFL-Ultrasound_crop.mp4",
           "pocus_videos/convex/Reg_pat4Image_140606.mpeg", "pocus_videos/convex/Pneu_northumbria_0409_set1_vid1.avi",
           "pocus_videos/convex/Reg_recommendations_alines_mov1.mov", "pocus_images/convex/Cov_Oliviera_2020_Fig4A.jpg"]


def _outline(bgr: np.ndarray, mask: np.ndarray, colour, width: int = 1) -> None:
    cs, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(bgr, cs, -1, colour, width)


def _panel(gray: np.ndarray, cell: int = 240, caption: str = "") -> np.ndarray:
    s = cell / max(gray.shape)
    img = cv2.resize(gray, (round(gray.shape[1] * s), round(gray.shape[0] * s)), interpolation=cv2.INTER_AREA)
    out = np.zeros((cell + 16, cell, 3), np.uint8)
    out[: img.shape[0], : img.shape[1]] = img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    cv2.putText(out, caption[:44], (2, cell + 12), cv2.FONT_HERSHEY_PLAIN, 0.85, (255, 255, 255), 1)
    return out


def _brighten(gray: np.ndarray) -> np.ndarray:
    return (255 * (gray / 255.0) ** 0.5).astype(np.uint8)  # so that dark tissue and the sector edge show


def make_figures(out_dir: Path, cfg) -> list[Path]:
    """docs figures: the algorithm's steps on three real files, and old vs new masks on the files the old
    mask got wrong (truth blue, old red, new green)."""
    from usjepa.ingest.preprocess import compute_usrc_mask
    from usjepa.ingest.sector import candidate_region, scan_evidence

    truth = {r["file"]: r for r in load_truth("pocus")}
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for rel in FAILING[:2] + ["pocus_images/convex/Cov_Oliviera_2020_Fig4A.jpg"]:
        frames = clip_frames(REALDATA / "pocus" / rel, cfg)
        t = rasterize(truth[rel]["polygon"], truth[rel]["width"], truth[rel]["height"], frames.shape[1:])
        evidence, _ = scan_evidence(frames)
        region = candidate_region(evidence)
        mask = compute_usrc_mask(frames, cfg)
        proj = _brighten(frames.max(axis=0))
        fit = cv2.cvtColor(proj, cv2.COLOR_GRAY2BGR)
        _outline(fit, t, (255, 128, 0), 2)
        _outline(fit, mask, (0, 255, 0), 1)
        name = Path(rel).name
        rows.append(np.hstack([_panel(proj, caption=f"{name[:28]}: max"), _panel(evidence.astype(np.uint8) * 255, caption="1 evidence"),
                               _panel(region.astype(np.uint8) * 255, caption="2 candidate region"),
                               _panel(fit, caption=f"3 fit (green), truth (blue) {iou(mask, t):.2f}")]))
    paths = [out_dir / "usrc_algorithm.png"]
    cv2.imwrite(str(paths[0]), np.vstack(rows))
    tiles = []
    for rel in FAILING:
        frames = clip_frames(REALDATA / "pocus" / rel, cfg)
        t = rasterize(truth[rel]["polygon"], truth[rel]["width"], truth[rel]["height"], frames.shape[1:])
        old, new = usrc_mask_baseline(frames), compute_usrc_mask(frames, cfg)
        bgr = cv2.cvtColor(_brighten(frames[len(frames) // 2]), cv2.COLOR_GRAY2BGR)
        _outline(bgr, t, (255, 128, 0), 3)
        _outline(bgr, old, (0, 0, 255), 2)
        _outline(bgr, new, (0, 255, 0), 1)
        tiles.append(_panel(bgr, 300, f"{Path(rel).name[:17]} old {iou(old, t):.2f} new {iou(new, t):.2f}"))
    paths.append(out_dir / "usrc_failing_files.png")
    cv2.imwrite(str(paths[1]), np.vstack([np.hstack(tiles[:3]), np.hstack(tiles[3:6])]))
    return paths


def _summary(rows: list[dict]) -> dict:
    out = {}
    for s in sorted({r["set"] for r in rows}):
        mine = [r for r in rows if r["set"] == s]
        out[s] = {k: {"mean": float(np.mean([r[k] for r in mine])), "min": float(np.min([r[k] for r in mine]))}
                  for k in ("old", "new")} | {"files": len(mine)}
    return out


def main(argv=None) -> int:
    from usjepa.ingest.preprocess import PreprocessConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--ddti-limit", type=int, default=None, help="score only the first N DDTI crops")
    ap.add_argument("--rounds", type=int, default=2, help="throughput rounds (old and new alternated)")
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--figures", metavar="DIR", default=None, help="only write the docs figures into DIR")
    a = ap.parse_args(argv)
    cfg = PreprocessConfig()
    cv2.setNumThreads(1)
    if a.figures:
        print("\n".join(str(p) for p in make_figures(Path(a.figures), cfg)))
        return 0
    rows = score_synthetic(cfg)
    if (REALDATA / "pocus").is_dir():
        rows += score_set("pocus", cfg) + score_set("busi", cfg)
    if (REALDATA / "ddti").is_dir():
        rows += score_ddti(cfg, a.ddti_limit)
    speed = ingest_fps(a.rounds) if (REALDATA / "pocus").is_dir() and not a.no_throughput else None
    hw = hardware()
    summary = _summary(rows)
    md = ["| set | file | frames | IoU old | IoU new | mask ms old / new |", "|---|---|---|---|---|---|"]
    md += [f"| {r['set']} | {r['file']} | {r['frames']} | {r['old']:.3f} | {r['new']:.3f} | "
           + (f"{r['old_ms']:.1f} / {r['new_ms']:.1f} |" if "old_ms" in r else "|") for r in rows if r["set"] != "ddti"]
    md += ["", "| set | files | mean IoU old | min IoU old | mean IoU new | min IoU new |", "|---|---|---|---|---|---|"]
    md += [f"| {s} | {v['files']} | {v['old']['mean']:.3f} | {v['old']['min']:.3f} | {v['new']['mean']:.3f} | "
           f"{v['new']['min']:.3f} |" for s, v in summary.items()]
    if speed:
        md += ["", "| ingest, 1 worker | frames/s old mask (rounds) | frames/s new mask | ratio new/old | hardware |",
               "|---|---|---|---|---|"]
        md += [f"| {name} | {', '.join(f'{x:.0f}' for x in v['frames_per_s']['old'])} | "
               f"{', '.join(f'{x:.0f}' for x in v['frames_per_s']['new'])} | "
               f"{', '.join(f'{x:.2f}' for x in v['ratio_new_vs_old'])} (median {np.median(v['ratio_new_vs_old']):.2f}) | "
               f"{hardware_line(hw)} |" for name, v in speed.items()]
    save_result(a.out, "bench_usrc", {"when": utc_now(), "hardware": hw, "summary": summary, "rows": rows,
                                      "throughput": speed}, "\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
