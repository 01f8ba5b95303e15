"""Per-frame preprocessing (paper §4.3) and the USrc mask (paper §4.2, Appendix B).

The order is chosen for speed: frames are converted to grayscale and resized first (every later step then
runs on at most ``max_side``² pixels), the USrc mask is computed once per clip from all its frames, and
inpainting and percentile rescaling finish each frame.

USrc mask algorithm (``compute_usrc_mask``), on the resized grayscale frames of one clip (or one still); it
models the scan sector, not the echo (helpers in ``usjepa.ingest.sector``):

1. Evidence of live ultrasound (``scan_evidence``). A clip (≥ 8 frames): pixels whose temporal std over
   ≤ 32 sampled frames exceeds 0.8 gray levels (more where the whole background flickers: 1.25 × its
   median std on the top row) — the live image changes, background and burned-in overlays do not, and even
   dark deep tissue flickers. A still: pixels that are textured (5×5 local std) or clearly
   away from the background level (the most common gray on the frame's outer ring: black or grey).
2. Candidate region (``candidate_region``): evidence density over a small window (sparse flicker in dark
   tissue counts, isolated noise does not), an opening, the largest component plus any of ≥ 15 % of it
   (a dark band can split a sector), a closing (on a border-padded copy when no side touches the frame)
   and hole filling.
3. Sector fit (``fit_sector``): robust lines through the region's row-wise left and right ends give the
   side edges (the frame border where the display crops the scan; an asymmetric pair is made symmetric
   about the near field's middle with the wider edge, since dark tissue only narrows the evidence); where
   they meet above the region is the apex; near and far boundaries are arcs around the apex or flat cuts,
   at the extreme percentiles of the region (a linear scan's flat ones at its first and last rows filled
   half between the edges; a fan's far arc at its outermost ring filled half, where text attached to the
   arc pulled the percentile out) — whichever agrees better with it. Curvilinear fans, phased
   sectors, trapezoids and linear rectangles are all this one model.
4. The fit is used when it holds ≥ ``min_fit_agreement`` of the region and the region fills ≥
   ``min_fit_fill`` of it (small separate pieces outside it — text that touched the scan — not counted);
   otherwise (a crop with an irregular border) the region's convex hull, or the
   region itself when the hull would add more than that. A clip's accepted fit has its side edges and far
   arc moved in where codec flicker beyond a bright edge widened them (``without_edge_ringing``).
   Still rule (stills, clips under 8 frames): the 2-px texture halo outside the scan's edge is taken back
   (``without_halo``).
5. Static bright overlays found in step 1 (text, markers, calipers drawn over the tissue of a clip) are
   taken out of the mask; on a still, lines of burned-in text over the tissue (``text_rows``: glyphs in
   a row) and caliper crosses (``caliper_crosses``). Fallback: a region below ``min_region_fraction`` of
   the image means nothing was found (a nearly black clip): every pixel above ``mask_threshold``, or the
   whole frame.

A still cropped to the scan with flat display bands at its border (a text panel, a side strip:
``display_bands``) gets the rectangle inside the bands (``crop_inside_display_bands``), before step 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from usjepa.ingest.sector import (background_level, burned_in_marks, candidate_region,
                                  crop_inside_display_bands, fit_sector, scan_evidence, without_edge_ringing,
                                  without_halo)


class FrameRejected(ValueError):
    """A frame that carries no usable image (all black, flat): skipped and reported, never written."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PreprocessConfig:
    max_side: int = 320  # longer side after resizing (benchmarked: see docs/ingest.md)
    jpeg_quality: int = 90
    inpaint_max_fraction: float = 0.05  # inpaint coloured annotations only below this share of the image
    colour_threshold: int = 40  # max(B,G,R) - min(B,G,R) above this is a coloured (annotation) pixel
    low_percentile: float = 2.0
    high_percentile: float = 98.0
    mask_threshold: int = 12  # gray level separating echo from the black border
    min_region_fraction: float = 0.05
    min_fit_agreement: float = 0.95  # share of the evidence the fitted sector must hold to be used
    min_fit_fill: float = 0.5  # evidence area / fitted area below this: the fit is mostly empty, not used
    blank_max_level: int = 8  # a frame whose 99th percentile is below this is "all black"
    max_pixels: int = 64_000_000  # stills above this are decoded reduced (JPEG) or skipped, never whole

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _to_uint8(frame: np.ndarray) -> np.ndarray:
    if frame.dtype == np.uint8:
        return frame
    f = frame.astype(np.float32)
    lo, hi = float(f.min()), float(f.max())
    if hi <= lo:
        return np.zeros(f.shape, np.uint8)
    return ((f - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def prepare_frame(frame: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """Grayscale + resize. Returns the resized gray frame and, for colour input, the resized mask of
    coloured (annotation) pixels — None for grayscale input or when nothing is coloured."""
    frame = _to_uint8(np.asarray(frame))
    colour = None
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim == 3:
        if frame.shape[2] == 4:
            frame = frame[:, :, :3]
        # max(B,G,R) - min(B,G,R) with OpenCV: NumPy's reduction over a 3-byte innermost axis is ~40x slower
        # (~11 ms vs ~0.3 ms on 450x450) and was most of the per-frame cost
        b, g, r = cv2.split(np.ascontiguousarray(frame))
        spread = cv2.subtract(cv2.max(cv2.max(b, g), r), cv2.min(cv2.min(b, g), r))
        colour = spread > cfg.colour_threshold
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        if not colour.any():
            colour = None
    elif frame.ndim == 2:
        gray = frame
    else:
        raise FrameRejected(f"unsupported frame shape {frame.shape}")
    h, w = gray.shape
    scale = cfg.max_side / max(h, w)
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        if colour is not None:
            # INTER_AREA on the float mask keeps any pixel that was partly coloured
            colour = cv2.resize(colour.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0
    return np.ascontiguousarray(gray), colour


def _disc(radius: int) -> np.ndarray:
    r = max(1, int(radius))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def compute_usrc_mask(frames: np.ndarray, cfg: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """USrc mask of one clip: ``frames`` is [N,h,w] or [h,w] uint8 gray (already resized). See module doc."""
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    h, w = frames.shape[1:]
    evidence, overlay = scan_evidence(frames)
    if frames.shape[0] == 1:
        inner = crop_inside_display_bands(frames[0], evidence)
        if inner is not None:
            return _without_marks(frames, inner)
    region = candidate_region(evidence)
    if region.sum() < cfg.min_region_fraction * h * w:
        # the heuristics found no scan (e.g. a nearly black frame): every pixel above the threshold, or all
        fg = frames.max(axis=0) > cfg.mask_threshold
        return fg if fg.any() else np.ones((h, w), bool)
    fitted = None if region.all() else fit_sector(region)
    if fitted is None and region.all():  # an image cropped to the scan: nothing to fit
        mask = region
    elif fitted is not None and fitted[1]["covered"] >= cfg.min_fit_agreement and fitted[1]["filled"] >= cfg.min_fit_fill:
        mask = fitted[0]
        if frames.shape[0] > 1:  # a clip: its codec flicker widened the edges (stills: without_halo)
            mean = frames[:: max(1, frames.shape[0] // 32)].mean(axis=0, dtype=np.float32)  # as scan_evidence samples
            mask = without_edge_ringing(mask, fitted[1], mean, background_level(frames.max(axis=0)))
    else:  # not sector-like (a crop with an irregular border): the region, or its hull if that agrees
        contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        hull = np.zeros((h, w), np.uint8)
        cv2.fillConvexPoly(hull, cv2.convexHull(np.concatenate(contours)), 1)
        hull = hull.astype(bool)
        mask = hull if region.sum() >= cfg.min_fit_agreement * hull.sum() else region
    mask = without_halo(mask, frames)
    # burned-in text, markers and calipers inside the sector are no ultrasound signal; dilated by ~0.6 % of
    # the side, since the anti-aliased and compressed edges of the strokes flicker with the tissue
    overlay = cv2.dilate(overlay.astype(np.uint8), _disc(max(1, round(0.006 * max(h, w))))).astype(bool) & mask
    if overlay.sum() < 0.05 * mask.sum():
        mask = mask & ~overlay
    return _without_marks(frames, mask)


def _without_marks(frames: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A still's mask less the lines of burned-in text and the caliper crosses over its tissue
    (``text_rows``, ``caliper_crosses``), dilated by a pixel for their anti-aliased edges (a clip's static
    marks are already out: they never change)."""
    if frames.shape[0] != 1:
        return mask
    marks = burned_in_marks(frames[0])
    return mask & ~cv2.dilate(marks.astype(np.uint8), _disc(1)).astype(bool) if marks.any() else mask


def _percentiles_in_mask(gray: np.ndarray, mask: np.ndarray, lo: float, hi: float) -> tuple[int, int]:
    # 256-bin histogram instead of a sort: the same percentiles for uint8 data, ~10x faster
    hist = np.bincount(gray[mask], minlength=256)
    cdf = np.cumsum(hist)
    total = cdf[-1]
    p_lo = int(np.searchsorted(cdf, total * lo / 100.0, side="left"))
    p_hi = int(np.searchsorted(cdf, total * hi / 100.0, side="left"))
    return p_lo, p_hi


def finish_frame(
    gray: np.ndarray, colour: np.ndarray | None, usrc_mask: np.ndarray, cfg: PreprocessConfig
) -> np.ndarray:
    """Inpaint small coloured annotations, then map the 2nd/98th percentiles inside the mask to 0/255."""
    if usrc_mask.shape != gray.shape:
        raise ValueError(f"USrc mask {usrc_mask.shape} does not match the frame {gray.shape}")
    if np.percentile(gray, 99) < cfg.blank_max_level:
        raise FrameRejected("all-black frame")
    if colour is not None and colour.mean() < cfg.inpaint_max_fraction:
        gray = cv2.inpaint(gray, cv2.dilate(colour.astype(np.uint8), _disc(1)), 3, cv2.INPAINT_TELEA)
    p_lo, p_hi = _percentiles_in_mask(gray, usrc_mask, cfg.low_percentile, cfg.high_percentile)
    if p_hi <= p_lo:
        raise FrameRejected(f"flat frame (2nd..98th percentile inside the mask: {p_lo}..{p_hi})")
    lut = np.clip((np.arange(256, dtype=np.float32) - p_lo) * (255.0 / (p_hi - p_lo)), 0, 255).astype(np.uint8)
    return cv2.LUT(gray, lut)


def preprocess_frame(
    frame: np.ndarray, cfg: PreprocessConfig = PreprocessConfig(), usrc_mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One still image, end to end: (gray uint8 [h,w], USrc mask bool [h,w]). Raises FrameRejected."""
    gray, colour = prepare_frame(frame, cfg)
    if usrc_mask is None:
        if np.percentile(gray, 99) < cfg.blank_max_level:
            raise FrameRejected("all-black frame")
        usrc_mask = compute_usrc_mask(gray, cfg)
    elif usrc_mask.shape != gray.shape:
        usrc_mask = cv2.resize(usrc_mask.astype(np.uint8), gray.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    return finish_frame(gray, colour, usrc_mask, cfg), usrc_mask


def encode_sample(gray: np.ndarray, mask: np.ndarray, cfg: PreprocessConfig) -> tuple[bytes, bytes]:
    """JPEG of the frame (8-bit gray, cfg quality) and 1-bit PNG of the mask (decodes to 0/255)."""
    ok1, jpg = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, int(cfg.jpeg_quality)])
    ok2, png = cv2.imencode(".png", mask.astype(np.uint8) * 255, [cv2.IMWRITE_PNG_BILEVEL, 1])
    if not (ok1 and ok2):
        raise RuntimeError("OpenCV failed to encode a sample")
    return jpg.tobytes(), png.tobytes()
