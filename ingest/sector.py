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
_HALO_LEVEL = 3  # ... and one this close to it, on the rim of a still's mask, is texture halo (without_halo)
_MIN_VIDEO_FRAMES = 8
_DENSITY_WINDOW = 0.025  # side of the window (share of the image side) over which evidence is counted
_FULL_FRAME = 0.995  # evidence this dense everywhere: the scan is the whole frame (nothing to fit)
_DENSITY_MIN = 0.15  # share of evidence pixels in that window that makes it part of the scan
_BAND_FLAT = 0.1  # a row (column) of a display band has at least this share of pixels exactly at its level
_BAND_MIN = 0.05  # display bands thinner than this share of the side are left in (see display_bands)
_BAND_MAX = 0.5  # nor can a band be deeper than this: the scan is the larger part of the frame
_BAND_LEAD = 0.1  # a band's flat part may start this far in: a column of text printed up to the crop's edge
_SLOPE_SAME = 0.05  # side edges whose slopes (dx/dy) are this close to mirror images are taken as fitted (3°)
_ATTACHMENT_MAX = 0.05  # a piece of the region outside the fit below this share of the frame: text that joined it
_GLYPH_CONTRAST = 45  # a glyph's pixels are this much brighter than the mean around them (11×11)
_GLYPH_HEIGHT = (5, 0.075)  # glyph height: from 5 px to this share of the longer side
_GLYPHS_IN_A_ROW = 4  # bright blobs of one height on one baseline, this many in a row: a line of text
_RINGING = 0.025  # a clip's codec flicker reaches this share of the side outside a bright scan edge
_EDGE_STEP = 15  # mean level by which the scan's rim stands above the black border at a true edge
_RINGING_LEVEL = 1.5  # ... over two pixels whose mean is this close to the background (ringing, not a ramp)


def background_level(img: np.ndarray) -> int:
    """The most common gray level on the frame's outer ring: black for most scanners, grey for some."""
    ring = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    return int(np.bincount(ring, minlength=256).argmax())


def _local_variance(img: np.ndarray, k: int = 5) -> np.ndarray:
    """k×k variance of a uint8 image (OpenCV's box filters straight from uint8: ~3x faster than in NumPy)."""
    m = cv2.boxFilter(img, cv2.CV_32F, (k, k))
    return cv2.subtract(cv2.sqrBoxFilter(img, cv2.CV_32F, (k, k)), cv2.multiply(m, m))


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
        live = std > max(_LIVE_STD, _background_flicker(std, mx, bg))
        overlay = (std < 0.75) & (mx.astype(np.int16) > bg + 60)
        if live.mean() > 0.02:
            return live, overlay
        # a (nearly) frozen clip: fall back to the still rule on its max projection
    img = mx
    textured = _local_variance(img) > _TEXTURE_STD**2
    away = cv2.absdiff(img, np.full_like(img, bg)) > _LEVEL_STEP
    # Text and marks printed beside the scan are separate components that candidate_region drops. White
    # strokes over the tissue of a still are not removed: a top-hat that finds them also removed the
    # saturated speckle of bright tissue. Coloured marks are inpainted by finish_frame.
    return textured | away, np.zeros_like(textured)


def _background_flicker(std: np.ndarray, mx: np.ndarray, bg: int) -> float:
    """Temporal std that a clip's background itself reaches where all of it flickers (analogue capture
    noise of a level or two, which would pass for dark tissue): 1.25 × the median std of the top row's
    pixels near the background level, when they are at least a quarter of the row; 0 otherwise. The top
    row: beside a fan's apex it is background and a linear scan's near field there is bright, while the
    far rows and the sides can be dark tissue, whose flicker must stay evidence. The median: codec noise
    that only some background pixels show (most clips) leaves the threshold where it is."""
    dark = mx[0].astype(np.int16) <= bg + _LEVEL_STEP
    if dark.sum() < 0.25 * len(dark):
        return 0.0
    return 1.25 * float(np.median(std[0][dark]))


def without_halo(mask: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """A mask found by the still rule (a still, a clip of < 8 frames) less its texture halo: the 5×5
    variance of ``scan_evidence`` is high up to 2 px outside the scan's edge, where its window reaches the
    tissue, so the region and the sector fitted to it stand 2 px out all round a scan on a black border.
    Taken back: the mask's pixels within 2 px of its edge (not the frame's) that sit at the background
    level (±``_HALO_LEVEL``) on the max projection; tissue there is brighter. A clip's evidence (temporal
    std, per pixel) has no halo: its mask is returned as it is."""
    if frames.shape[0] >= _MIN_VIDEO_FRAMES:
        return mask
    img = frames.max(axis=0)
    rim = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
    return mask & ~(rim & (cv2.absdiff(img, np.full_like(img, background_level(img))) <= _HALO_LEVEL))


def _band_depth(flat_rows: np.ndarray, max_lead: int) -> int:
    """Depth of a band whose flat rows (from the border inwards) start within ``max_lead`` rows of the
    border (rows before them: a column of text printed up to the crop's edge) and run ≥ 3 rows; 0 if
    there is none, or if the run does not end within the rows looked at."""
    starts = np.flatnonzero(flat_rows[: max_lead + 1])
    if not len(starts):
        return 0
    start = int(starts[0])
    ends = np.flatnonzero(~flat_rows[start:])
    if not len(ends) or ends[0] < 3:
        return 0
    return start + int(ends[0])


def display_bands(img: np.ndarray) -> tuple[int, int, int, int]:
    """Depth in pixels of flat display bands along the top, bottom, left and right border of a still — a
    scanner's text panel ("IZQ TIRADS"), a side strip with the depth scale — that a crop kept beside the
    scan. A band row (column) holds ≥ ``_BAND_FLAT`` of pixels *exactly* at the band's level (the most
    common gray of that outermost row / column) with no variation in their 3×3 neighbourhood: drawn
    background, which speckle, even dark or clipped tissue, never is over a tenth of a row (measured
    below 0.3 % on the BUSI and DDTI tissue rows), while text on the panel covers at most ~half of it.
    The band is the run of such rows from the border — or from within ``_BAND_LEAD`` of it, where a column
    of text was printed up to the crop's edge (DDTI's parameter strips "12L6 9.0 31fps …"); one thinner than ``_BAND_MIN`` of the side is
    ignored (it touches only the outermost patches, and DDTI's 10–13 px leftover borders are scored as
    scan); a run that does not end within ``_BAND_MAX`` of the side is no band (flat pixels in every row
    are a margin along a perpendicular side). Bands are taken deepest first, each next one measured
    beside those found (a bottom panel makes every column partly flat). The caller decides whether what
    lies inside is a crop of the scan."""
    k = np.ones((3, 3), np.uint8)
    flat = cv2.dilate(img, k) == cv2.erode(img, k)  # no variation in the 3×3 neighbourhood
    # views with the side's border first, rows across the band: top, bottom, left, right
    views = [lambda a: a, lambda a: a[::-1], lambda a: a.T, lambda a: a.T[::-1]]
    depths = [0, 0, 0, 0]
    for _ in range(4):  # deepest band first, then the others measured beside it (a panel is no side strip)
        h, w = img.shape
        inside = (slice(depths[0], h - depths[1]), slice(depths[2], w - depths[3]))
        found = []
        for side, view in enumerate(views):
            if depths[side]:
                continue
            vi, vf = view(img[inside]), view(flat[inside])
            level = np.uint8(np.bincount(vi[0], minlength=256).argmax())
            n, lead = vi.shape[0], int(_BAND_LEAD * vi.shape[0])

            def flat_rows(m: int) -> np.ndarray:
                return np.count_nonzero((vi[:m] == level) & vf[:m], axis=1) >= _BAND_FLAT * vi.shape[1]

            if not flat_rows(lead + 1).any():  # the common case, no band: only the outer rows are read
                continue
            depth = _band_depth(flat_rows(int(_BAND_MAX * n)), lead)
            if depth >= _BAND_MIN * n:
                found.append((depth * vi.shape[1], side, depth))
        if not found:
            break
        _, side, depth = max(found)
        depths[side] = depth
    return tuple(depths)


def _bright_marks(img: np.ndarray):
    """Connected components (8-connected) of the pixels ``_GLYPH_CONTRAST`` above their 11×11 mean:
    (count, labels, stats [n,5] as OpenCV's CC_STAT_LEFT, TOP, WIDTH, HEIGHT, AREA). The stats come from
    the few labelled pixels (≈1 % of the frame), not from OpenCV's per-pixel pass, which cost 3–6× more."""
    cand = (cv2.subtract(img, cv2.blur(img, (11, 11))) >= _GLYPH_CONTRAST).astype(np.uint8)
    n, labels = cv2.connectedComponents(cand, connectivity=8)
    st = np.zeros((n, 5), np.int64)  # label 0, the background, stays all zero: never a mark
    points = cv2.findNonZero(cand)  # ~10x faster than np.nonzero on a frame
    if points is None:
        return n, labels, st
    xs, ys = points.reshape(-1, 2).T  # (x, y) points
    lab = labels[ys, xs]
    order = np.argsort(lab, kind="stable")  # every label 1..n-1 occurs: one run of pixels per label
    lab, ys, xs = lab[order], ys[order], xs[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    lo_x, lo_y = np.minimum.reduceat(xs, starts), np.minimum.reduceat(ys, starts)
    st[1:] = np.stack([lo_x, lo_y, np.maximum.reduceat(xs, starts) - lo_x + 1,
                       np.maximum.reduceat(ys, starts) - lo_y + 1, np.diff(np.r_[starts, len(lab)])], axis=1)
    return n, labels, st


def burned_in_marks(img: np.ndarray) -> np.ndarray:
    """Text lines and caliper crosses drawn over a still (``text_rows`` | ``caliper_crosses``), from one
    pass of bright components."""
    marks = _bright_marks(img)
    return text_rows(img, marks) | caliper_crosses(img, marks)


def caliper_crosses(img: np.ndarray, marks=None) -> np.ndarray:
    """Pixels of caliper crosses over the tissue of a still: a bright component of about square extent
    (7 px to 6 % of the side) with 1–2 px arms whose pixels lie on its middle row and middle column (±1),
    each arm spanning most of it — a "+" drawn by the scanner. Speckle and tissue lines are not plus-shaped. Boolean [h,w]."""
    h, w = img.shape
    n, labels, st = marks or _bright_marks(img)
    bw, bh, area = st[:, cv2.CC_STAT_WIDTH], st[:, cv2.CC_STAT_HEIGHT], st[:, cv2.CC_STAT_AREA]
    side = np.maximum(bw, bh)
    maybe = (np.minimum(bw, bh) >= 7) & (side <= max(7, 0.06 * max(h, w))) & (np.abs(bw - bh) <= 0.35 * side)
    # two arms of 1-2 px, not a blob; each arm covering 70 % (tested below) needs this many pixels
    maybe &= (area <= 2 * (bw + bh)) & (area >= 0.7 * (bw + bh) - 3)
    maybe[0] = False
    keep = np.zeros(n, bool)
    for i in np.flatnonzero(maybe)[:200]:
        x0, y0 = st[i, cv2.CC_STAT_LEFT], st[i, cv2.CC_STAT_TOP]
        box = labels[y0 : y0 + bh[i], x0 : x0 + bw[i]] == i
        cy, cx = bh[i] // 2, bw[i] // 2
        row, col = box[max(0, cy - 1) : cy + 2].any(axis=0), box[:, max(0, cx - 1) : cx + 2].any(axis=1)
        off_arms = box.copy()
        off_arms[max(0, cy - 1) : cy + 2] = False
        off_arms[:, max(0, cx - 1) : cx + 2] = False
        keep[i] = row.mean() >= 0.7 and col.mean() >= 0.7 and off_arms.sum() <= 0.1 * area[i]
    return keep[labels]


def text_rows(img: np.ndarray, marks=None) -> np.ndarray:
    """Pixels of burned-in text over the tissue of a still ("RIGHT BREAST", "LEFT BREAST", a display's
    parameter column): bright glyph-sized components standing out of their surroundings that sit ≥ 4 in a
    row, on one baseline, of one height, each close to the next. A single thin bright line — the skin
    line, a specular tissue echo, the saturated speckle a white top-hat also took — is one long component
    or a scatter of blobs on no common baseline, so it stays; a lone digit is no row and stays too (a
    small hole at most, see docs/ingest.md; caliper crosses: ``caliper_crosses``). Boolean [h,w]."""
    h, w = img.shape
    n, labels, st = marks or _bright_marks(img)
    x, y, gw, gh, area = (st[:, i].astype(np.float32) for i in range(5))
    top_height = max(_GLYPH_HEIGHT[0], _GLYPH_HEIGHT[1] * max(h, w))
    # strokes (not filled blobs, or one stroke wide: an I, a 1); up to two glyphs wide (neighbours that touch)
    glyph = ((gh >= _GLYPH_HEIGHT[0]) & (gh <= top_height) & (gw <= 2.5 * gh) & (area >= 4)
             & ((area <= 0.8 * gw * gh) | (gw <= 3)))
    glyph[0] = False
    idx = np.flatnonzero(glyph)
    if len(idx) < _GLYPHS_IN_A_ROW or len(idx) > 600:  # hundreds of glyph-sized blobs: speckle, not text
        return np.zeros((h, w), bool)
    gx, gb, ghh, gr = x[idx], (y + gh)[idx], gh[idx], (x + gw)[idx]
    # i and j are neighbours in a line of text: same baseline and height, j starts right after i ends
    gap = gx[None, :] - gr[:, None]
    near = ((np.abs(gb[None, :] - gb[:, None]) <= 2) & (np.abs(ghh[None, :] - ghh[:, None]) <= np.maximum(2, 0.25 * ghh[:, None]))
            & (gap >= -1) & (gap <= 1.5 * ghh[:, None]))
    near |= near.T
    group = np.arange(len(idx))
    for _ in range(64):  # connected groups of the neighbour graph: propagate the smallest index
        nxt = np.where(near, group[None, :], len(idx)).min(axis=1)
        nxt = np.minimum(nxt, group)
        if np.array_equal(nxt, group):
            break
        group = nxt
    sizes = np.bincount(group, minlength=len(idx))
    keep = np.zeros(n, bool)
    keep[idx[sizes[group] >= _GLYPHS_IN_A_ROW]] = True
    return keep[labels]


def crop_inside_display_bands(img: np.ndarray, evidence: np.ndarray) -> np.ndarray | None:
    """A still cropped to the scan plus flat display bands at its border (a text panel below, a side
    strip): the rectangle inside the bands, when the candidate region covers ≥ ``_FULL_FRAME`` of the
    inside (the full-frame rule of ``candidate_region`` applied to the inside; the band's flat part may
    end a few pixels short of the tissue, where the strip's edge is anti-aliased). None otherwise — a fan on a black
    background has "bands" at its corners, but the inside is no crop, and the sector fit handles it.
    Text on the panel joins the tissue's component, so without this the region would keep it."""
    top, bottom, left, right = display_bands(img)
    if not (top or bottom or left or right):
        return None
    h, w = img.shape
    rows, cols = slice(top, h - bottom), slice(left, w - right)
    if candidate_region(evidence[rows, cols]).mean() < _FULL_FRAME:
        return None
    mask = np.zeros((h, w), bool)
    mask[rows, cols] = True
    return mask


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
    # areas by bincount: OpenCV's WithStats pass costs ~1 ms here, more than labelling and counting
    n_lab, labels = cv2.connectedComponents(fg, connectivity=8)
    if n_lab <= 1:
        return np.zeros((h, w), bool)
    areas = np.bincount(labels.ravel(), minlength=n_lab)[1:]
    keep = np.zeros(n_lab, np.uint8)
    keep[1:] = areas >= 0.15 * areas.max()
    region = keep[labels]
    r = round(0.03 * min(h, w))
    if region[0].any() or region[-1].any() or region[:, 0].any() or region[:, -1].any():
        region = cv2.morphologyEx(region, cv2.MORPH_CLOSE, _disc(r))
    else:
        # A scan with a border all round (no side touches the frame): closed on a copy padded with its
        # border, since OpenCV's default border lets the erosion keep whatever the dilation pushed onto
        # the frame's edge — a linear still ending a few pixels short of it gained those rows of black
        # border. Where the scan reaches the frame, that fill is kept on purpose: the few-pixel strips
        # a crop leaves along its edge (DDTI) count as scan.
        padded = cv2.copyMakeBorder(region, r + 1, r + 1, r + 1, r + 1, cv2.BORDER_REPLICATE)
        region = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, _disc(r))[r + 1 : -r - 1, r + 1 : -r - 1]
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


def _filled_rows(region: np.ndarray, sides: np.ndarray) -> tuple[float | None, float | None]:
    """Top and bottom (pixel edges) of the rows whose span between the fitted side edges the region fills
    at least half: a flat near / far boundary. Text or a label printed in the border next to the scan
    joins the region in a few rows, which it fills only in part, so it does not pull the boundary out
    the way a percentile of the region's rows would. (None, None) when no row is that full."""
    span = np.count_nonzero(sides, axis=1)
    full = np.flatnonzero(np.count_nonzero(region & sides, axis=1) >= np.maximum(1, 0.5 * span))
    if not len(full):
        return None, None
    return float(full[0]), float(full[-1] + 1)


def _far_ring(region: np.ndarray, sides: np.ndarray, d: np.ndarray) -> float | None:
    """Outer radius (around the apex) of the outermost 1-px ring whose part between the side edges and
    inside the frame the region fills at least half, when the fill beyond it drops at once — below a
    third over the rings from 2 px beyond it, 2 % of the side (≥ 3 rings) wide: a fan's far arc with text printed
    next to it. Such text (a depth label, a parameter line; in a clip its MJPG compression flicker or
    redrawn digits make it look live) joins the region but fills only a short stretch of each ring, so
    it pulls a percentile of the region's radii out, not this. None when no ring is that full, or when
    the fill fades out gradually (dark tissue in the far field: the percentile is kept)."""
    ring = d[sides].astype(np.int32)
    span = np.bincount(ring)
    filled = np.bincount(ring, weights=region[sides], minlength=len(span))
    full = np.flatnonzero((span > 0) & (filled >= np.maximum(1, 0.5 * span)))
    if not len(full):
        return None
    outer = int(full[-1]) + 1
    beyond = slice(outer + 2, outer + 2 + max(3, round(0.02 * max(region.shape))))
    if filled[beyond].sum() >= max(1, span[beyond].sum()) / 3:
        return None
    return float(outer)


def _attachments(outside: np.ndarray) -> int:
    """Pixels of the region outside a fit that are small separate pieces — each under
    ``_ATTACHMENT_MAX`` of the frame, together under twice that: a line of text or a label printed in
    the border that touches the scan and joined its region. They do not count against the fit; a region
    that a crop's irregular border shapes leaves larger pieces outside, which do. Shares of the frame,
    not of the region: a display prints its labels at a size set by the screen, so a scan drawn small
    (a 120x160 clip's fan fills 60 % of it) meets the same text as a large one."""
    n, labels = cv2.connectedComponents(outside.astype(np.uint8), connectivity=8)
    areas = np.bincount(labels.ravel(), minlength=n)[1:]
    small = int(areas[areas < _ATTACHMENT_MAX * outside.size].sum())
    return small if small < 2 * _ATTACHMENT_MAX * outside.size else 0


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
    if left is not None and right is not None and abs(left[1] + right[1]) > max(_SLOPE_SAME, 0.25 * max(abs(left[1]), abs(right[1]))):
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
    if apex is None:  # a linear scan: its near and far boundaries are the first and last filled rows
        near_flat, far_flat = _filled_rows(region, sides)
        if near_flat is not None:
            near_opts, far_opts = [("flat", near_flat)], [("flat", far_flat)]
    d = None
    if apex is not None:
        d = np.hypot(xx - np.float32(apex[0]), yy - np.float32(apex[1]))
        r = np.hypot(fx - apex[0], fy - apex[1])
        near_arc, far_arc = float(np.percentile(r, 0.5)) - 0.5, float(np.percentile(r, 99.5)) + 0.5
        # Text attached to the far arc (a depth label) pulls its percentile out by a glyph's height or
        # more: the outermost ring that the region fills is taken instead when the fill drops there as at
        # a sector's edge (a dark far field fades out over many rings, and stays with the percentile; a
        # few pixels between the two are the spread of a speckled edge, not text)
        far_ring = _far_ring(region, sides, d)
        if far_ring is not None and far_arc - far_ring > _GLYPH_HEIGHT[0]:
            far_arc = far_ring
        near_opts.append(("arc", near_arc))
        far_opts.append(("arc", far_arc))
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
    # the fit must hold the evidence (text that touched the scan aside) ...
    covered = (np.count_nonzero(mask & region) + _attachments(region & ~mask)) / n_region
    filled = n_region / max(1, np.count_nonzero(mask))  # ... and not be mostly empty
    return mask, {"left": left, "right": right, "apex": apex, "near": near, "far": far, "iou_region": score,
                  "covered": covered, "filled": filled}


def _sector_mask(shape: tuple[int, int], left, right, apex, near, far) -> np.ndarray:
    """The pixels of the sector model with these parameters (as ``fit_sector`` returns them)."""
    yy, xx = _pixel_centres(*shape)
    mask = np.ones(shape, bool)
    if left is not None:
        mask &= xx >= left[0] + left[1] * yy
    if right is not None:
        mask &= xx <= right[0] + right[1] * yy
    d = None if apex is None else np.hypot(xx - np.float32(apex[0]), yy - np.float32(apex[1]))
    return mask & _boundary_mask(*near, True, yy, d) & _boundary_mask(*far, False, yy, d)


def without_edge_ringing(mask: np.ndarray, params: dict, mean: np.ndarray, bg: int) -> np.ndarray:
    """A clip's fitted sector with its side edges and far arc moved in onto the scan's edge where codec
    flicker had widened them: block compression (MJPG, H.264) makes the black border flicker by a level
    or two up to a block beyond a bright scan edge (and around burned-in text), which passes for the
    sparse flicker of dark tissue, so the region and the fit stand a few pixels out. An edge is moved in
    by the offset (up to ``_RINGING`` of the side) where the mean image steps, within two pixels, from
    the border level (≤ background + ``_RINGING_LEVEL``) outside to ≥ ``_EDGE_STEP`` more inside. Where
    the tissue at the edge is dark there is no such step, and where the edge is soft (a blurred or
    upscaled export ramps up over a few pixels, and its outline includes the ramp) the two pixels
    outside are above the border level: both edges stay."""
    h, w = mask.shape
    k = max(2, round(_RINGING * max(h, w)))
    yy, xx = _pixel_centres(h, w)
    apex = params["apex"]
    d = None if apex is None else np.hypot(xx - np.float32(apex[0]), yy - np.float32(apex[1]))
    near_band = cv2.dilate(mask.astype(np.uint8), _disc(k + 2)).astype(bool)
    left, right, far = params["left"], params["right"], params["far"]

    def inward_offset(depth: np.ndarray, along: np.ndarray) -> int:
        """Offset (px, ≥ 0) of the step, for pixels at signed depth ``depth`` inside the boundary."""
        sel = near_band & along & (depth > -3) & (depth < k + 3)
        bins = np.floor(depth[sel]).astype(np.int32) + 3
        n = np.bincount(bins, minlength=k + 6)
        prof = np.bincount(bins, weights=mean[sel], minlength=k + 6) / np.maximum(n, 1)
        best, best_step = 0, 0.0
        for o in range(0, k + 1):  # boundary at depth o: depths o-2, o-1 outside, o, o+1 inside (bin = depth + 3)
            out, inn = prof[o + 1 : o + 3].mean(), prof[o + 3 : o + 5].mean()
            if n[o + 1 : o + 3].min() < 0.9 * n[o + 3 : o + 5].max():  # outside the frame: no border seen
                continue
            if out <= bg + _RINGING_LEVEL and inn - out >= max(_EDGE_STEP, best_step):
                best, best_step = o, inn - out
        return best

    radial = _boundary_mask(*params["near"], True, yy, d) & _boundary_mask(*far, False, yy, d)  # sides: these rows / radii
    inside_sides = _sector_mask((h, w), left, right, None, ("flat", -1.0), ("flat", h + 1.0))
    if left is not None:
        n = np.hypot(1.0, left[1])
        o = inward_offset((xx - (left[0] + left[1] * yy)) / n, radial)
        left = (left[0] + o * n, left[1])
    if right is not None:
        n = np.hypot(1.0, right[1])
        o = inward_offset(((right[0] + right[1] * yy) - xx) / n, radial)
        right = (right[0] - o * n, right[1])
    if far[0] == "arc":
        far = ("arc", far[1] - inward_offset(far[1] - d, inside_sides))
    return mask & _sector_mask((h, w), left, right, apex, params["near"], far)
