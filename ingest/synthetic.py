"""A synthetic ultrasound corpus: the embedded default for ``make demo`` and the tests.

It is not meant to fool a radiologist, but to exercise everything real data does: convex (fan) and linear
scan geometries inside black borders, Rayleigh speckle over tissue-like structures with depth attenuation,
burned-in text and a depth ruler, a small coloured annotation on some frames, grayscale content stored as
colour, and real files — PNG/JPEG/BMP/TIFF stills, MP4 (mp4v) and AVI (MJPG) videos, NIfTI volumes.

Each dataset is laid out folder-per-class (``<dataset>/<class>/<file>``) and the class changes the anatomy
(a cyst, a solid mass, A-lines vs B-lines, a liver lesion), so the same files are a labelled probe set.
File names carry a patient id (``..._p007_...``) for grouped splits.

``make_synthetic_corpus`` writes ``datasets.yaml``::

    datasets:
      - {name: syn_breast, root: syn_breast, anatomy: breast, kind: image}
      ...

with each ``root`` relative to the YAML's folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml


@dataclass(frozen=True)
class _Preset:
    height: int
    width: int
    stills_per_class: int
    videos_per_class: int
    frames_per_video: int
    volumes_per_class: int
    slices_per_volume: int


PRESETS = {
    "tiny": _Preset(height=120, width=160, stills_per_class=2, videos_per_class=1, frames_per_video=6,
                    volumes_per_class=1, slices_per_volume=4),
    "demo": _Preset(height=240, width=320, stills_per_class=48, videos_per_class=5, frames_per_video=40,
                    volumes_per_class=3, slices_per_volume=24),
}

BREAST_CLASSES = ("normal", "cyst", "solid")
LUNG_CLASSES = ("alines", "blines")
LIVER_CLASSES = ("normal", "lesion")
_STILL_EXTS = (".png", ".jpg", ".bmp", ".tif")


# --------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Geometry:
    inside: np.ndarray  # bool [H,W]: the scan region
    depth: np.ndarray  # float [H,W]: 0 at the transducer, 1 at the deepest point
    lateral: np.ndarray  # float [H,W]: -1..1 across the scan


def _convex_geometry(h: int, w: int, rng: np.random.Generator) -> _Geometry:
    half_angle = np.deg2rad(rng.uniform(28, 40))
    apex_x, apex_y = w / 2 + rng.uniform(-0.03, 0.03) * w, -0.12 * h
    r0, r1 = 0.2 * h, h * rng.uniform(0.98, 1.08)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot(xx - apex_x, yy - apex_y)
    theta = np.arctan2(xx - apex_x, yy - apex_y)
    inside = (r >= r0) & (r <= r1) & (np.abs(theta) <= half_angle)
    return _Geometry(inside, np.clip((r - r0) / (r1 - r0), 0, 1), np.clip(theta / half_angle, -1, 1))


def _linear_geometry(h: int, w: int, rng: np.random.Generator) -> _Geometry:
    x0, x1 = int(w * rng.uniform(0.1, 0.16)), int(w * rng.uniform(0.84, 0.9))
    y0, y1 = int(h * 0.1), int(h * rng.uniform(0.9, 0.97))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    inside = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    return _Geometry(inside, np.clip((yy - y0) / (y1 - y0), 0, 1), np.clip(2 * (xx - x0) / (x1 - x0) - 1, -1, 1))


# ---------------------------------------------------------------------------------------------- tissue


def _smooth_field(h: int, w: int, rng: np.random.Generator, cells: int = 6) -> np.ndarray:
    low = rng.normal(size=(cells, cells)).astype(np.float32)
    return cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)


def _ellipse(g: _Geometry, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return ((g.lateral - cx) / rx) ** 2 + ((g.depth - cy) / ry) ** 2 <= 1.0


def _echogenicity(anatomy: str, cls: str, g: _Geometry, rng: np.random.Generator, phase: float,
                  lesion: tuple[float, float, float]) -> np.ndarray:
    """Mean echo strength map (before speckle) for one class; ``phase`` moves structures over time."""
    h, w = g.inside.shape
    d = g.depth + 0.01 * np.sin(phase)
    e = 0.55 + 0.12 * _smooth_field(h, w, rng)
    cx, cy, rad = lesion
    if anatomy == "breast":
        e += 0.18 * np.sin(d * rng.uniform(18, 26) + 2 * g.lateral)  # fibroglandular layers
        if cls == "cyst":
            m = _ellipse(g, cx, cy, rad, rad * 0.8)
            e = np.where(m, 0.04, e)
            e = np.where(_ellipse(g, cx, cy + 2.5 * rad, rad, 1.6 * rad) & ~m, e * 1.5, e)  # enhancement
        elif cls == "solid":
            wobble = 1 + 0.25 * np.sin(6 * np.arctan2(d - cy, g.lateral - cx))
            m = ((g.lateral - cx) / (rad * wobble)) ** 2 + ((d - cy) / (0.7 * rad * wobble)) ** 2 <= 1
            e = np.where(m, 0.25, e)
            e = np.where((np.abs(g.lateral - cx) < rad) & (d > cy), e * 0.45, e)  # posterior shadow
    elif anatomy == "lung":
        pleura = 0.18 + 0.005 * np.sin(phase)
        e = 0.25 + 0.05 * _smooth_field(h, w, rng)
        e = np.where(d < pleura, 0.6 + 0.15 * np.sin(d * 60), e)  # chest wall
        e += 1.6 * np.exp(-(((d - pleura) / 0.012) ** 2))  # pleural line
        if cls == "alines":
            for k in (2, 3, 4):  # reverberations at multiples of the pleural depth
                e += (0.9 / k) * np.exp(-(((d - k * pleura) / 0.012) ** 2))
        else:
            for x in rng.uniform(-0.7, 0.7, size=rng.integers(2, 4)):  # comet-tail B-lines
                e = np.where((np.abs(g.lateral - x - 0.02 * np.sin(phase)) < 0.05) & (d > pleura), 1.3, e)
    else:  # liver
        e += 0.1 * np.sin(d * 9)
        for vx, vy in rng.uniform([-0.6, 0.2], [0.6, 0.9], size=(3, 2)):
            e = np.where(_ellipse(g, vx, vy, 0.04, 0.03), 0.05, e)  # vessels
        if cls == "lesion":
            e = np.where(_ellipse(g, cx, cy + 0.01 * np.sin(phase), rad, rad), 1.25, e)
    return np.clip(e, 0.02, None) * (1.0 - 0.45 * g.depth)  # attenuation with depth


def _speckle_field(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Complex circular Gaussian field: its magnitude is Rayleigh distributed (fully developed speckle)."""
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64) / np.sqrt(2)


def _render(e: np.ndarray, z: np.ndarray, g: _Geometry, rng: np.random.Generator) -> np.ndarray:
    amp = e * np.abs(z)
    amp = cv2.GaussianBlur(amp.astype(np.float32), (0, 0), sigmaX=0.8, sigmaY=0.5)  # speckle grain size
    img = 255.0 * np.log1p(4.0 * amp) / np.log1p(4.0 * 2.2)  # log compression
    img = np.where(g.inside, img, rng.uniform(0, 3, size=img.shape))
    return np.clip(img, 0, 255).astype(np.uint8)


# A 5x7 bitmap font for the burned-in labels, drawn by this module rather than cv2.putText: OpenCV 5.1
# replaced putText's glyph rendering, which moved the corpus's text (and the USrc fit scored on it) under
# the project; scanners print bitmap fonts like this one anyway. One string of 7 rows per glyph.
_FONT_5X7 = {
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11110 00001 00001 01110 00001 00001 11110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    "S": "01111 10000 10000 01110 00001 00001 11110", "Y": "10001 10001 01010 00100 00100 00100 00100",
    "N": "10001 11001 10101 10011 10001 10001 10001", "M": "10001 11011 10101 10101 10001 10001 10001",
    "H": "10001 10001 10001 11111 10001 10001 10001", "D": "11100 10010 10001 10001 10001 10010 11100",
    "G": "01110 10001 10000 10111 10001 10001 01111", "z": "00000 00000 11111 00010 00100 01000 11111",
    "c": "00000 00000 01110 10000 10000 10001 01110", "m": "00000 00000 11010 10101 10101 10001 10001",
    ".": "00000 00000 00000 00000 00000 01100 01100", " ": "00000 00000 00000 00000 00000 00000 00000",
}
_SUPERSAMPLE = 4


def _draw_text(img: np.ndarray, text: str, x: float, baseline: float, height: float, level: int) -> None:
    """Burn ``text`` into ``img`` (BGR, in place) in the 5x7 font, ``height`` px tall from ``baseline``:
    each glyph pixel a block of a 4x supersampled canvas, averaged back down so stroke edges are
    anti-aliased as a scanner's display output is. Pure numpy, so every OpenCV version draws the same."""
    px = height / 7.0  # one font pixel, in image pixels
    h, w = img.shape[:2]
    s = _SUPERSAMPLE
    canvas = np.zeros((h * s, w * s), np.float32)
    top = baseline - height
    for k, ch in enumerate(text):
        rows = _FONT_5X7[ch].split()
        x0 = x + k * 6 * px  # 5 columns and 1 of spacing
        for r, bits in enumerate(rows):
            for c, bit in enumerate(bits):
                if bit == "1":
                    y1, y2 = round((top + r * px) * s), round((top + (r + 1) * px) * s)
                    x1, x2 = round((x0 + c * px) * s), round((x0 + (c + 1) * px) * s)
                    canvas[max(0, y1) : max(0, y2), max(0, x1) : max(0, x2)] = 1.0
    cover = canvas.reshape(h, s, w, s).mean(axis=(1, 3))[..., None]
    img[:] = np.round(img * (1.0 - cover) + level * cover).astype(np.uint8)


def _burn_in_overlays(gray: np.ndarray, g: _Geometry, rng: np.random.Generator, colour_note: bool) -> np.ndarray:
    """Text, depth ruler and (optionally) a small coloured annotation; returns BGR like real exports."""
    h, w = gray.shape
    img = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    cap = max(5.0, 0.045 * h)  # cap height of the labels (a scanner's small print)
    _draw_text(img, f"SYN {rng.uniform(2, 12):.1f}MHz", 3, max(10, int(0.05 * h)), cap, 230)
    _draw_text(img, f"D{rng.integers(4, 16)}cm G{rng.integers(30, 70)}", int(0.72 * w), int(0.97 * h), 0.9 * cap, 200)
    for k in range(1, 6):  # depth ruler ticks along the right edge
        y = int(k * h / 6)
        cv2.line(img, (w - 6, y), (w - 2, y), (220, 220, 220), 1)
    if colour_note:
        ys, xs = np.nonzero(g.inside)
        i = rng.integers(len(ys))
        cx, cy, s = int(xs[i]), int(ys[i]), max(3, h // 40)
        colour = [(0, 255, 255), (255, 255, 0), (0, 255, 0)][rng.integers(3)]
        cv2.line(img, (cx - s, cy), (cx + s, cy), colour, 1)
        cv2.line(img, (cx, cy - s), (cx, cy + s), colour, 1)
    return img


def _lesion(rng: np.random.Generator) -> tuple[float, float, float]:
    return rng.uniform(-0.4, 0.4), rng.uniform(0.35, 0.65), rng.uniform(0.12, 0.2)


# ---------------------------------------------------------------------------------------------- writers


def _frames(anatomy: str, cls: str, n: int, p: _Preset, rng: np.random.Generator, convex: bool):
    """A clip of n frames: structures breathe, speckle decorrelates partially from frame to frame."""
    g = (_convex_geometry if convex else _linear_geometry)(p.height, p.width, rng)
    lesion = _lesion(rng)
    struct_seed = int(rng.integers(2**31))
    z = _speckle_field(g.inside.shape, rng)
    for t in range(n):
        phase = 2 * np.pi * t / max(n, 8)
        e = _echogenicity(anatomy, cls, g, np.random.default_rng(struct_seed), phase, lesion)
        z = 0.9 * z + np.sqrt(1 - 0.81) * _speckle_field(g.inside.shape, rng)
        yield g, _render(e, z, g, rng)


def corpus_scan(anatomy: str, cls: str, p: _Preset, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """One file of the corpus before it is written, and its scan region (the known geometry, bool [H,W]):
    a breast still (linear probe, overlays; one BGR frame), a lung clip (convex, overlays; BGR frames)
    or a liver volume (convex, no overlays; gray slices). The USrc benchmark scores masks against it."""
    if anatomy == "breast":
        (g, gray), = _frames("breast", cls, 1, p, rng, convex=False)
        return [_burn_in_overlays(gray, g, rng, colour_note=rng.random() < 0.3)], g.inside
    if anatomy == "lung":
        note = rng.random() < 0.5
        frames = []
        for g, f in _frames("lung", cls, p.frames_per_video, p, rng, True):  # overlays drawn frame by frame
            frames.append(_burn_in_overlays(f, g, rng, note))
        return frames, g.inside
    clip = list(_frames("liver", cls, p.slices_per_volume, p, rng, True))
    return [f for _, f in clip], clip[0][0].inside


def _write_video(path: Path, frames: list[np.ndarray], fourcc: str) -> None:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 20.0, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {fourcc} video to {path}")
    for f in frames:
        writer.write(f)
    writer.release()


def _write_nifti(path: Path, slices: list[np.ndarray]) -> None:
    import nibabel as nib

    vol = np.stack(slices, axis=-1)  # [H, W, D]: one 2-D frame per slice along the last axis
    nib.save(nib.Nifti1Image(vol.astype(np.uint8), affine=np.diag([0.3, 0.3, 1.0, 1.0])), str(path))


def make_synthetic_corpus(root: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write the corpus under ``root`` and return the path of its ``datasets.yaml``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    root = Path(root)
    rng = np.random.default_rng(seed)
    patient = 0

    for ci, cls in enumerate(BREAST_CLASSES):  # stills, linear probe, four image formats
        d = root / "syn_breast" / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(p.stills_per_class):
            patient += 1
            (img,), _ = corpus_scan("breast", cls, p, rng)
            ext = _STILL_EXTS[(i + ci) % len(_STILL_EXTS)]
            cv2.imwrite(str(d / f"{cls}_p{patient:03d}_{i}{ext}"), img)

    for ci, cls in enumerate(LUNG_CLASSES):  # videos, convex probe, MP4 and AVI
        d = root / "syn_lung" / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(p.videos_per_class):
            patient += 1
            frames, _ = corpus_scan("lung", cls, p, rng)
            ext, fourcc = ((".mp4", "mp4v"), (".avi", "MJPG"))[(i + ci) % 2]
            _write_video(d / f"{cls}_p{patient:03d}_clip{i}{ext}", frames, fourcc)

    for cls in LIVER_CLASSES:  # volumes (NIfTI), convex slices without overlays
        d = root / "syn_liver" / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(p.volumes_per_class):
            patient += 1
            slices, _ = corpus_scan("liver", cls, p, rng)
            _write_nifti(d / f"{cls}_p{patient:03d}_vol{i}.nii.gz", slices)

    spec = {"datasets": [
        {"name": "syn_breast", "root": "syn_breast", "anatomy": "breast", "kind": "image"},
        {"name": "syn_lung", "root": "syn_lung", "anatomy": "lung", "kind": "video"},
        {"name": "syn_liver", "root": "syn_liver", "anatomy": "liver", "kind": "volume"},
    ]}
    out = root / "datasets.yaml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Write the synthetic ultrasound corpus.")
    ap.add_argument("root", help="output folder")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(make_synthetic_corpus(a.root, a.preset, a.seed))


if __name__ == "__main__":
    main()
