"""Scan-sector geometry: evidence of live ultrasound, and the sector shape fitted to it (USrc mask, §4.2).

A scan region is one of a few shapes, all described by the same model here: two straight side edges
(vertical for a linear probe, converging on an apex above the image for a curvilinear or phased-array
sector, slanted for a trapezoid), a near boundary and a far boundary, each either an arc around the apex
(curvilinear probe face, depth) or a flat line (a phased array's flat top, a display that cuts the fan, a
linear probe), and the frame border where the display crops the scan. Fitting that model, instead of
taking the hull of bright pixels, keeps dark tissue inside the sector (a dark deep field, a rib shadow
along an edge) and leaves out a background of any grey level.

``scan_evidence`` says which pixels carry live ultrasound; ``fit_sector`` fits the model to that region.
Both run on frames already resized to ``max_side`` (≤ 320²), a few milliseconds per clip.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

_LIVE_STD = 0.8  # temporal std (gray levels) above which a pixel changes: echo, not background or overlay
_TEXTURE_STD = 2.5  # local std (5×5) above which a still's pixel is textured: speckle, not a flat background
_LEVEL_STEP = 10  # a still's pixel this far from the background level is signal even where it is smooth
_MIN_VIDEO_FRAMES = 8
_DENSITY_WINDOW = 0.025  # side of the window (share of the image side) over which evidence is counted
_FULL_FRAME = 0.995  # evidence this dense everywhere: the scan is the whole frame (nothing to fit)
_DENSITY_MIN = 0.15  # share of evidence pixels in that window that makes it part of the scan


def background_level(img: np.ndarray) -> int:
    """The most common gray level on the frame's outer ring: black for most scanners, grey for some."""
    ring = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    return int(np.bincount(ring, minlength=256).argmax())


def _local_std(img: np.ndarray, k: int = 5) -> np.ndarray:
    f = img.astype(np.float32)
    m = cv2.blur(f, (k, k))
    return np.sqrt(np.maximum(cv2.blur(f * f, (k, k)) - m * m, 0))


def scan_evidence(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(evidence, overlay) for frames [N,h,w] uint8. ``evidence``: pixels that show live ultrasound.
    ``overlay``: bright pixels that never change in a clip (burned-in text, markers, calipers); these are
    taken out of the final mask (none on a still).

    Video (≥ 8 frames): the live image changes from frame to frame, background and overlays do not, so a
    pixel is evidence where its temporal std over ≤ 32 sampled frames exceeds ``_LIVE_STD`` — which also
    holds in dark tissue, where speckle still flickers. Stills: a pixel is evidence where it is textured
    (local std) or clearly away from the background level (``background_level``)."""
    n = frames.shape[0]
    mx = frames.max(axis=0)
    bg = background_level(mx)
    if n >= _MIN_VIDEO_FRAMES:
        step = max(1, n // 32)
        sample = frames[::step].astype(np.float32)
        std = sample.std(axis=0)
        live = std > _LIVE_STD
        overlay = (std < 0.75) & (mx.astype(np.int16) > bg + 60)
        if live.mean() > 0.02:
            return live, overlay
        # a (nearly) frozen clip: fall back to the still rule on its max projection
    img = mx
    textured = _local_std(img) > _TEXTURE_STD
    away = np.abs(img.astype(np.int16) - bg) > _LEVEL_STEP
    # Text and marks printed beside the scan are separate components that candidate_region drops. White
    # strokes over the tissue of a still are not removed: a top-hat that finds them also removed the
    # saturated speckle of bright tissue. Coloured marks are inpainted by finish_frame.
    return textured | away, np.zeros_like(textured)


def _disc(radius: int) -> np.ndarray:
    r = max(1, int(radius))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def candidate_region(evidence: np.ndarray) -> np.ndarray:
    """Clean the evidence into the scan's silhouette: evidence density over a small window (so sparse
    flicker in dark tissue counts and isolated noise does not), an opening drops thin overlay
    bridges, the largest component is kept with any other of ≥ 15 % of its area (a dark band can split a
    sector in two), a closing and hole filling restore dark patches inside."""
    h, w = evidence.shape
    # density, not single pixels: deep dark tissue flickers in only some pixels, noise outside in fewer
    k = max(3, round(_DENSITY_WINDOW * min(h, w)) | 1)
    dense = cv2.blur(evidence.astype(np.float32), (k, k)) > _DENSITY_MIN
    # the window grows a fully covered region by (0.5 - _DENSITY_MIN)·k: take that back
    dense = cv2.erode(dense.astype(np.uint8), _disc(round((0.5 - _DENSITY_MIN) * k))) > 0
    fg = cv2.morphologyEx(dense.astype(np.uint8), cv2.MORPH_OPEN, _disc(round(0.01 * min(h, w)) or 1))
    if cv2.countNonZero(fg) >= _FULL_FRAME * h * w:  # an image cropped to the scan (most still datasets)
        return np.ones((h, w), bool)
    n_lab, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n_lab <= 1:
        return np.zeros((h, w), bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.zeros(n_lab, np.uint8)
    keep[1:] = areas >= 0.15 * areas.max()
    region = keep[labels]
    region = cv2.morphologyEx(region, cv2.MORPH_CLOSE, _disc(round(0.03 * min(h, w))))
    # fill holes: everything not reachable from the border through background is inside
    pad = np.pad(region, 1)
    flood = pad.copy()
    cv2.floodFill(flood, None, (0, 0), 2)
    pad[flood == 0] = 1
    return pad[1:-1, 1:-1].astype(bool)


def _ransac_line(ys: np.ndarray, xs: np.ndarray, tol: float, seed: int = 0) -> tuple[float, float, int] | None:
    """x = a + b·y through the most (y, x) points within ``tol``; least squares on the inliers. Fixed seed:
    the same clip always gets the same mask (ingest output is byte-reproducible)."""
    if len(ys) < 8:
        return None
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, len(ys), (2, 200))
    ok = ys[i] != ys[j]
    i, j = i[ok], j[ok]
    if not len(i):
        return None
    b = (xs[j] - xs[i]) / (ys[j] - ys[i])
    a = xs[i] - b * ys[i]
    resid = np.abs(xs[None, :] - (a[:, None] + b[:, None] * ys[None, :]))
    best = int(np.argmax((resid < tol).sum(1)))
    inl = resid[best] < tol
    if inl.sum() < 8:
        return None
    b, a = np.polyfit(ys[inl], xs[inl], 1)
    return float(a), float(b), int(inl.sum())


@functools.lru_cache(maxsize=8)
def _pixel_centres(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + np.float32(0.5)
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _boundary_mask(kind: str, v: float, is_near: bool, yy, d) -> np.ndarray:
    """Pixels on the inner side of a near/far boundary: ("arc", r) around the apex or ("flat", y)."""
    if kind == "arc":
        return (d >= v) if is_near else (d <= v)
    return (yy >= v) if is_near else (yy <= v)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / u if u else 0.0


def fit_sector(region: np.ndarray) -> tuple[np.ndarray, dict] | None:
    """Fit the sector model (module doc) to a candidate region; returns (mask, parameters) or None when
    the region has too few rows. ``covered`` (share of the region inside the fit) and ``filled`` (region
area / fit area) tell the caller whether the fit explains the region.

    Side edges: a robust line through the region's left-most (right-most) pixel of each row, ignoring rows
    where the region touches the frame border (cropped there). Apex: where the edges meet, if above the
    region. Near / far boundary: the 0.5th / 99.5th percentile of the region pixels' distance from the apex
    (arc) or of their row (flat), whichever agrees better with the region."""
    h, w = region.shape
    rows = np.flatnonzero(region.any(axis=1))
    if len(rows) < 8:
        return None
    sub = region[rows]
    first = np.argmax(sub, axis=1)
    last = w - 1 - np.argmax(sub[:, ::-1], axis=1)
    tol = max(1.5, 0.006 * max(h, w))
    ys = rows.astype(np.float64) + 0.5
    edges = []
    for xs, border, off in ((first, 0, 0.0), (last, w - 1, 1.0)):
        keep = xs != border
        line = _ransac_line(ys[keep], xs[keep].astype(np.float64) + off, tol)
        # an edge carried by few rows is a ragged boundary (dark tissue), not the sector's edge
        edges.append(line if line is not None and line[2] >= 0.2 * len(rows) else None)
    left, right = edges
    if left is not None and right is not None and abs(left[1] + right[1]) > 0.25 * max(abs(left[1]), abs(right[1])):
        # Asymmetric edges: the narrower one follows a dark boundary inside the sector (dark tissue only
        # ever narrows the evidence). Sectors are symmetric about the middle of their bright near field,
        # so the narrower edge is replaced by the mirror image of the wider one about that middle.
        x_mid = float(np.median((first[:3] + last[:3] + 1) / 2.0))
        if -left[1] > right[1]:
            right = (2 * x_mid - left[0], -left[1], 0)
        else:
            left = (2 * x_mid - right[0], -right[1], 0)
    left, right = (e[:2] if e is not None else None for e in (left, right))
    apex = None
    if left is not None and right is not None and right[1] - left[1] > 0.02:
        ay = (left[0] - right[0]) / (right[1] - left[1])
        if ay < rows[0] + 0.05 * h:  # the edges converge above the scan: a sector
            apex = (left[0] + left[1] * ay, ay)
    yy, xx = _pixel_centres(h, w)
    sides = np.ones((h, w), bool)
    if left is not None:
        sides &= xx >= left[0] + left[1] * yy
    if right is not None:
        sides &= xx <= right[0] + right[1] * yy
    ry, rx = np.nonzero(region)
    n_region = len(ry)
    step = max(1, n_region // 20000)  # percentiles of a regular subsample: same to a fraction of a pixel
    fy, fx = ry[::step] + 0.5, rx[::step] + 0.5
    near_opts = [("flat", float(np.percentile(fy, 0.5)) - 0.5)]
    far_opts = [("flat", float(np.percentile(fy, 99.5)) + 0.5)]
    d = None
    if apex is not None:
        r = np.hypot(fx - apex[0], fy - apex[1])
        near_opts.append(("arc", float(np.percentile(r, 0.5)) - 0.5))
        far_opts.append(("arc", float(np.percentile(r, 99.5)) + 0.5))
        d = np.hypot(xx - np.float32(apex[0]), yy - np.float32(apex[1]))
    near_masks = [(o, sides & _boundary_mask(*o, True, yy, d)) for o in near_opts]
    far_masks = [(o, _boundary_mask(*o, False, yy, d)) for o in far_opts]
    best = None
    for near, nm in near_masks:
        for far, fm in far_masks:
            m = nm & fm
            score = _iou(m, region)
            if best is None or score > best[0] + 1e-3:
                best = (score, m, near, far)
    score, mask, near, far = best
    covered = np.count_nonzero(mask & region) / n_region  # the fit must hold the evidence ...
    filled = n_region / max(1, np.count_nonzero(mask))  # ... and not be mostly empty
    return mask, {"left": left, "right": right, "apex": apex, "near": near, "far": far, "iou_region": score,
                  "covered": covered, "filled": filled}
