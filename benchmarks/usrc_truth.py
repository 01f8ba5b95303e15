"""Ground-truth scan regions for the USrc benchmark: one JSON per real file, geometry fitted by hand.

A truth file ``benchmarks/usrc_truth/<dataset>/<path inside the dataset>.json`` holds::

    {"file": "pocus_videos/convex/Reg_Avi_Video_001.mp4", "width": 609, "height": 609,
     "geometry": {...hand-picked points, see below...},
     "polygon": [[x, y], ...],          # the region's outline in source pixels, clipped to the frame
     "checked": "how it was checked"}

``geometry`` is what a person picked on an overlay of the clip's max projection (``render_overlay``), in
pixels of the source frame (x right, y down):

* ``{"type": "rect", "x0", "y0", "x1", "y1"}``: a linear probe or an image already cropped to the scan;
* ``{"type": "fan", "apex": [x, y], "left": [x, y], "right": [x, y], "r_near": r, "r_far": r,
  "top": y | null, "bottom": y | null}``: a curvilinear or phased-array sector: the apex (where the two
  straight edges meet, usually above the frame), one point on each straight edge, the radii of the near
  arc (probe face; 0: the sector starts at the apex) and of the far arc (the depth); ``top``/``bottom``
  are optional flat cuts (a phased array's flat top, a display that cuts the fan). A trapezoid is a fan
  with flat cuts. Apex and radii were measured by fitting a circle to boundary points picked on the arc
  (``fit_circle``), the edge points were picked on the straight edges;
* optional on either: ``"within": [[x, y], ...]``, a hand-drawn polygon the region is also limited to (a
  crop whose border is not part of the scan geometry); ``"far_circle"`` / ``"near_circle"``: [cx, cy, r]
  of an arc fitted on its own (a display that stretched the clip, so the arcs are not centred on the apex).

``polygon`` is derived from ``geometry`` by ``polygon_of`` and stored so that the truth is readable
without this code. The benchmark rasterises it at the size the mask is computed at.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np

TRUTH_DIR = Path(__file__).resolve().parent / "usrc_truth"


def fit_circle(points) -> tuple[float, float, float]:
    """Least-squares circle (cx, cy, r) through boundary points [K,2] picked on an arc."""
    p = np.asarray(points, float)
    a = np.c_[2 * p, np.ones(len(p))]
    cx, cy, c = np.linalg.lstsq(a, (p**2).sum(1), rcond=None)[0]
    return float(cx), float(cy), float(np.sqrt(c + cx * cx + cy * cy))


def polygon_of(geometry: dict, width: int, height: int, arc_points: int = 96) -> np.ndarray:
    """Outline [K,2] float (x, y) of the region a hand-fitted geometry describes, clipped to the frame."""
    frame = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float64)
    g = geometry
    if g["type"] == "rect":
        poly = np.array([[g["x0"], g["y0"]], [g["x1"], g["y0"]], [g["x1"], g["y1"]], [g["x0"], g["y1"]]], float)
    elif g["type"] == "fan":
        apex = np.asarray(g["apex"], float)
        a_left, a_right = (math.atan2(p[0] - apex[0], p[1] - apex[1]) for p in (g["left"], g["right"]))
        angles = np.linspace(min(a_left, a_right), max(a_left, a_right), arc_points)
        unit = np.stack([np.sin(angles), np.cos(angles)], 1)
        r_far = float(g.get("r_far") or 4.0 * (width + height))
        r_near = float(g.get("r_near") or 0.0)
        near = apex + r_near * unit[::-1] if r_near > 0 else apex[None]
        poly = np.concatenate([apex + r_far * unit, near])
        clip = frame.copy()
        if g.get("top") is not None:
            clip[:2, 1] = max(0.0, float(g["top"]))
        if g.get("bottom") is not None:
            clip[2:, 1] = min(float(height), float(g["bottom"]))
        frame = clip
    else:
        raise ValueError(f"unknown geometry type {g['type']!r}")
    poly = _clip(poly, frame)
    if g.get("within") or g.get("near_circle") or g.get("far_circle"):
        poly = _refine_raster(poly, g, width, height)
    return poly


def _refine_raster(poly: np.ndarray, g: dict, width: int, height: int, k: int = 4) -> np.ndarray:
    """Outline of poly ∩ ``within`` (may be concave) ∩ inside ``far_circle`` ∖ inside ``near_circle``
    (circles [cx, cy, r] for an arc that is not centred on the apex, e.g. a stretched display), traced on
    a k-times supersampled raster."""
    region = np.zeros((height * k, width * k), np.uint8)
    cv2.fillPoly(region, [np.round(poly * k).astype(np.int32)], 1)
    if g.get("within"):
        lim = np.zeros_like(region)
        cv2.fillPoly(lim, [np.round(np.asarray(g["within"], float) * k).astype(np.int32)], 1)
        region &= lim
    yy, xx = np.mgrid[0 : height * k, 0 : width * k]
    for key, keep_inside in (("far_circle", True), ("near_circle", False)):
        if g.get(key):
            cx, cy, r = g[key]
            inside = np.hypot((xx + 0.5) / k - cx, (yy + 0.5) / k - cy) <= r
            region &= (inside if keep_inside else ~inside).astype(np.uint8)
    cs, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    c = max(cs, key=cv2.contourArea)[:, 0, :].astype(float)
    return (c + 0.5) / k


def _clip(poly: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Sutherland–Hodgman clip of ``poly`` by a convex ``window`` (both counter-/clockwise consistent)."""
    def inside(p, a, b):
        return (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]) >= 0

    def cut(p, q, a, b):
        d1, d2 = q - p, b - a
        den = d1[0] * d2[1] - d1[1] * d2[0]
        t = ((a[0] - p[0]) * d2[1] - (a[1] - p[1]) * d2[0]) / den
        return p + t * d1

    # orient the polygon like the window (clockwise in image coordinates = positive cross products here)
    def area(p):
        return 0.5 * float(np.sum(p[:, 0] * np.roll(p[:, 1], -1) - np.roll(p[:, 0], -1) * p[:, 1]))

    if area(poly) * area(window) < 0:
        poly = poly[::-1]
    out = [np.asarray(p, float) for p in poly]
    for i in range(len(window)):
        a, b = window[i], window[(i + 1) % len(window)]
        src, out = out, []
        for j in range(len(src)):
            p, q = src[j], src[(j + 1) % len(src)]
            if inside(q, a, b):
                if not inside(p, a, b):
                    out.append(cut(p, q, a, b))
                out.append(q)
            elif inside(p, a, b):
                out.append(cut(p, q, a, b))
        if not out:
            break
    return np.array(out, float).reshape(-1, 2)


def rasterize(polygon, width: int, height: int, out_shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask [h,w] of ``polygon`` (source pixels of a width × height frame) at ``out_shape``.
    Pixel centres are tested (a pixel belongs to the region when its centre lies inside it)."""
    h, w = out_shape
    pts = np.asarray(polygon, float) * np.array([w / width, h / height])
    m = np.zeros((h, w), np.uint8)
    shift = 4  # sub-pixel vertices; the -0.5 maps pixel-edge coordinates onto OpenCV's pixel centres
    cv2.fillPoly(m, [np.round((pts - 0.5) * (1 << shift)).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=shift)
    return m.astype(bool)


def load_truth(dataset: str) -> list[dict]:
    """Every truth record of one dataset folder, sorted by file."""
    root = TRUTH_DIR / dataset
    return sorted((json.loads(p.read_text()) for p in root.rglob("*.json")), key=lambda r: r["file"])


def write_truth(dataset: str, rel: str, width: int, height: int, geometry: dict, checked: str) -> Path:
    poly = polygon_of(geometry, width, height)
    rec = {"file": rel, "width": width, "height": height, "geometry": geometry,
           "polygon": [[round(float(x), 1), round(float(y), 1)] for x, y in poly], "checked": checked}
    path = TRUTH_DIR / dataset / (rel + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1) + "\n")
    return path


def render_overlay(image: np.ndarray, polygon, width: int, height: int, grid: int = 50,
                   other: np.ndarray | None = None) -> np.ndarray:
    """BGR picture for checking a truth by eye: ``image`` (gray, any size) with the truth outline in green,
    an optional second mask's outline in red, and a labelled grid in source pixels every ``grid``."""
    h, w = image.shape[:2]
    bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    sx, sy = w / width, h / height
    for g in range(0, max(width, height), grid):
        if g < width:
            cv2.line(bgr, (round(g * sx), 0), (round(g * sx), h - 1), (90, 60, 0), 1)
            cv2.putText(bgr, str(g), (round(g * sx) + 1, 9), cv2.FONT_HERSHEY_PLAIN, 0.6, (255, 160, 0), 1)
        if g < height:
            cv2.line(bgr, (0, round(g * sy)), (w - 1, round(g * sy)), (90, 60, 0), 1)
            cv2.putText(bgr, str(g), (1, round(g * sy) - 1), cv2.FONT_HERSHEY_PLAIN, 0.6, (255, 160, 0), 1)
    if other is not None:
        cs, _ = cv2.findContours(other.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(bgr, cs, -1, (0, 0, 255), 1)
    if polygon is not None and len(polygon):
        pts = np.round(np.asarray(polygon, float) * np.array([sx, sy])).astype(np.int32)
        cv2.polylines(bgr, [pts], True, (0, 255, 0), 1)
    return bgr
