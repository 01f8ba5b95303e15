"""Augmentation parameters, the mask co-transform and batch preparation, shared by both loader backends.

Everything random about a sample is decided here, in the CPU worker, from a generator keyed by
(seed, epoch, sample id): the crop window, the flips, and the blur / speckle / contrast severities (paper
Table 5; the corruption functions of ``corruptions.py``). The DALI pipeline and the OpenCV baseline then
apply the *same* parameters, so they differ only in how pixels are computed, and a resumed run or another
world size reproduces every augmentation exactly.

The mask never goes near the pixel pipeline: it is decoded here (1-bit PNG, cached by its bytes because
frames of one video share their mask), mapped through the crop and flips with nearest-neighbour sampling at
the 224² output pixel centres (the exact mapping DALI's and OpenCV's resize use), and reduced to the 14×14
validity grid (a patch is valid if any of its pixels is). The block masks are sampled from those grids
(``usjepa.kernels.block_masks``) in the same worker, off the GPU's critical path.

Pixels: the backends render uint8 frames (decode, crop + flips + resize, blur, speckle, each rounded to gray
levels like the source JPEG; with ``speckle_on="device"`` the worker draws only the speckle seed and the
loader applies the noise on the device, ``device_speckle.py``); contrast and normalisation are one affine ``x·scale + bias`` per sample
(``PreparedBatch.scale/bias``) that the loader applies on the training device. A uint8 batch is a quarter of
the bytes to copy between processes and to the GPU, and an affine is free on any device but costly in DALI's
CPU arithmetic (SPEC §9).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import cv2
import numpy as np

from usjepa.shards import corruptions as C
from usjepa.shards.readers import BadSample, SampleReader


SPECKLE_ON = ("auto", "worker", "device")
DECODE_ON = ("worker", "device")


@dataclass(frozen=True)
class DataConfig:
    """Loader and augmentation settings (trainer YAML ``data:`` section → ``DataConfig.from_dict``).

    Each photometric augmentation fires with its probability ``*_p`` and then draws its severity ε uniformly
    from ``*_eps`` (the ε of ``corruptions.corrupt``: blur σ = ε; contrast α(ε); speckle σ_noise = 0.35ε).
    """

    image_size: int = 224
    patch_size: int = 16
    crop_scale: tuple[float, float] = (0.6, 1.0)  # paper Table 5
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect range of the crop window (torchvision default)
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    blur_p: float = 0.5
    blur_eps: tuple[float, float] = (0.1, 2.0)
    speckle_p: float = 0.5
    speckle_eps: tuple[float, float] = (0.5, 2.0)  # std(η_corr) 0.06 … 0.18
    contrast_p: float = 0.5
    contrast_eps: tuple[float, float] = (0.25, 1.5)
    mean: float = 0.449  # ImageNet channel means averaged for grayscale
    std: float = 0.226
    cap: int | None = 50_000  # N_t of Eq. 6 (training split; validation takes every sample)
    # CPU worker processes (DALI py_num_workers / DataLoader num_workers) and DALI's own CPU threads; None:
    # from this rank's share of the cores, less the trainer's (``worker_budget``)
    num_workers: int | None = None
    dali_threads: int | None = None
    prefetch: int = 2  # batches queued ahead per pipeline
    mask_cache: int = 4096  # decoded masks kept per worker
    # Where speckle noise is drawn: "worker" (OpenCV, in the CPU workers, before the pixels cross to the
    # device), "device" (torch, on the training device after the pipeline: no CPU time and no 200 KB field
    # per sample to copy), "auto" = "device" when the loader's device is a GPU, else "worker".
    speckle_on: str = "auto"
    # Where the torch backend decodes, crops, resizes and blurs: "worker" (OpenCV in the CPU workers) or
    # "device" (nvJPEG + roi_align on the GPU, gpu_decode.py; needs CUDA and torchvision, else the loader
    # warns and uses "worker"). DALI decodes on the GPU itself ("mixed").
    decode_on: str = "worker"

    def __post_init__(self):
        for name in ("crop_scale", "crop_ratio", "blur_eps", "speckle_eps", "contrast_eps"):
            lo, hi = (float(v) for v in getattr(self, name))
            if lo > hi or lo < 0:
                raise ValueError(f"DataConfig.{name} must be a pair 0 <= low <= high, got {getattr(self, name)!r}")
            object.__setattr__(self, name, (lo, hi))
        for name in ("hflip_p", "vflip_p", "blur_p", "speckle_p", "contrast_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"DataConfig.{name} must be a probability, got {getattr(self, name)!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.std <= 0:
            raise ValueError("DataConfig.std must be > 0")
        if self.speckle_on not in SPECKLE_ON:
            raise ValueError(f"DataConfig.speckle_on must be one of {SPECKLE_ON}, got {self.speckle_on!r}")
        if self.decode_on not in DECODE_ON:
            raise ValueError(f"DataConfig.decode_on must be one of {DECODE_ON}, got {self.decode_on!r}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "DataConfig":
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown data config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def without_photometric(self) -> "DataConfig":
        return dataclasses.replace(self, blur_p=0.0, speckle_p=0.0, contrast_p=0.0)

    def for_device(self, device_type: str, backend: str = "dali") -> "DataConfig":
        """``speckle_on="auto"`` and the worker budget resolved for a ``backend`` loader on ``device_type``
        ("cuda", "cpu", ...)."""
        speckle = self.speckle_on
        if speckle == "auto":
            speckle = "device" if device_type == "cuda" else "worker"
        workers, threads = worker_budget(device_type, backend)
        return dataclasses.replace(self, speckle_on=speckle,
                                   num_workers=workers if self.num_workers is None else self.num_workers,
                                   dali_threads=threads if self.dali_threads is None else self.dali_threads)


# Cores a rank keeps for the trainer itself: on a GPU its Python thread (which also feeds DALI) and the
# CUDA/NCCL host threads; on a CPU its compute threads are the job, so the loader takes one core.
TRAINER_CORES = {"cuda": 2}


def worker_budget(device_type: str, backend: str = "dali", cores: int | None = None,
                  local_ranks: int | None = None) -> tuple[int, int]:
    """(worker processes, DALI threads) for one rank: its share of this process's cores (``LOCAL_WORLD_SIZE``
    ranks per node) less the trainer's. On a GPU DALI's threads get a quarter of it (there they only feed the
    decoder: the Huffman pass of the JPEGs nvJPEG's hardware engine does not take) and the torch backend, which
    has none, all of it. On a CPU: one of each (CPU training is for tests and demos)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if local_ranks is None:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device_type != "cuda":
        return 1, 1  # CPU training: the trainer's threads do the work; tests and demos
    budget = max(2, cores // max(1, local_ranks) - TRAINER_CORES["cuda"])
    if backend != "dali":
        return budget, 0
    threads = max(1, budget // 4)
    return budget - threads, threads


@dataclass
class SampleParams:
    """What the pixel pipeline does to one sample (integer crop window in source pixels)."""

    crop: tuple[int, int, int, int]  # y0, x0, h, w
    hflip: bool = False
    vflip: bool = False
    blur_eps: float = 0.0  # 0 = no blur
    speckle_eps: float = 0.0  # 0 = no speckle
    speckle_field: np.ndarray | None = None  # η_corr at the output size (corruptions.speckle_field)
    speckle_seed: int = 0  # seeds the device's draw instead (speckle_on="device"; device_speckle.py)
    alpha: float = 1.0  # contrast factor α(ε)
    mu: float = 0.0  # contrast centre: median inside the USrc mask

    def roi(self) -> tuple[np.ndarray, np.ndarray]:
        """DALI resize ROI (y, x) start/end; start > end flips that axis."""
        y0, x0, h, w = self.crop
        ys, ye = (y0 + h, y0) if self.vflip else (y0, y0 + h)
        xs, xe = (x0 + w, x0) if self.hflip else (x0, x0 + w)
        return np.array([ys, xs], np.float32), np.array([ye, xe], np.float32)

    def affine(self, cfg: DataConfig) -> tuple[float, float]:
        """Contrast and normalisation folded into one ``x·scale + bias`` on the 0..255 image."""
        scale = self.alpha / (255.0 * cfg.std)
        bias = (self.mu * (1.0 - self.alpha) / 255.0 - cfg.mean) / cfg.std
        return scale, bias


def sample_rng(seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    # Philox keyed by the triple: the stream of a sample depends on nothing else (rank, worker, backend).
    key = (int(seed) & 0xFFFFFFFF) | ((int(epoch) & 0xFFFFFFFF) << 32)
    return np.random.Generator(np.random.Philox(key=[key, int(sample_id) & 0xFFFFFFFFFFFFFFFF]))


def random_crop_window(rng: np.random.Generator, h: int, w: int, scale, ratio) -> tuple[int, int, int, int]:
    """Random-resized-crop window (torchvision's rule: 10 tries at area × log-uniform aspect, then centre)."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            y0 = int(rng.integers(0, h - ch + 1))
            x0 = int(rng.integers(0, w - cw + 1))
            return y0, x0, ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def draw_params(rng: np.random.Generator, hw: tuple[int, int], cfg: DataConfig, train: bool) -> SampleParams:
    h, w = hw
    if not train:
        return SampleParams(crop=(0, 0, h, w))
    p = SampleParams(crop=random_crop_window(rng, h, w, cfg.crop_scale, cfg.crop_ratio))
    u = rng.random(5)  # one draw per decision, always consumed: params do not shift when a probability changes
    p.hflip = bool(u[0] < cfg.hflip_p)
    p.vflip = bool(u[1] < cfg.vflip_p)
    e = rng.uniform(size=3)
    if u[2] < cfg.blur_p:
        p.blur_eps = cfg.blur_eps[0] + e[0] * (cfg.blur_eps[1] - cfg.blur_eps[0])
    if u[3] < cfg.speckle_p:
        p.speckle_eps = cfg.speckle_eps[0] + e[1] * (cfg.speckle_eps[1] - cfg.speckle_eps[0])
        if p.speckle_eps > 0:
            if cfg.speckle_on == "device":  # the one draw speckle_field makes: later draws stay where they were
                p.speckle_seed = int(rng.integers(1, 2**31))
            else:
                p.speckle_field = C.speckle_field((cfg.image_size, cfg.image_size), p.speckle_eps, rng)
    if u[4] < cfg.contrast_p:
        eps = cfg.contrast_eps[0] + e[2] * (cfg.contrast_eps[1] - cfg.contrast_eps[0])
        p.alpha = C.contrast_alpha(eps)
    return p


def output_source_index(start: int, length: int, out: int) -> np.ndarray:
    """Source pixel that nearest-neighbour resize takes for each output pixel (half-pixel centres)."""
    return start + np.floor((np.arange(out) + 0.5) * (length / out)).astype(np.int64)


def validity_grid(mask: np.ndarray, p: SampleParams, cfg: DataConfig) -> np.ndarray:
    """bool [G, G]: the mask through the same crop + flips as the image, then any-pooled over each patch.

    Exact, without building the 224² mask: any over a patch's sampled source rows first (a row gather and an
    OR over 16 rows), then over its sampled source columns. A flip maps whole patches onto mirrored patches
    (224 is a multiple of 16), so it is a flip of the grid."""
    y0, x0, h, w = p.crop
    n, g, ps = cfg.image_size, cfg.grid, cfg.patch_size
    rows = np.minimum(output_source_index(y0, h, n), mask.shape[0] - 1)
    cols = np.minimum(output_source_index(x0, w, n), mask.shape[1] - 1)
    band = mask[rows, x0 : x0 + w].reshape(g, ps, -1).any(axis=1)  # [G, w]: per patch row, per source column
    grid = band[:, cols - x0].reshape(g, g, ps).any(axis=2)
    if p.vflip:
        grid = grid[::-1]
    if p.hflip:
        grid = grid[:, ::-1]
    return np.ascontiguousarray(grid)


def validity_grid_dense(mask: np.ndarray, p: SampleParams, cfg: DataConfig) -> np.ndarray:
    """Reference for ``validity_grid``: the full 224² nearest-neighbour mask, flipped, then pooled."""
    y0, x0, h, w = p.crop
    n = cfg.image_size
    rows = np.minimum(output_source_index(y0, h, n), mask.shape[0] - 1)
    cols = np.minimum(output_source_index(x0, w, n), mask.shape[1] - 1)
    m = mask[np.ix_(rows, cols)]
    if p.vflip:
        m = m[::-1]
    if p.hflip:
        m = m[:, ::-1]
    g, ps = cfg.grid, cfg.patch_size
    return m.reshape(g, ps, g, ps).any(axis=(1, 3))


def median_in_mask(jpeg: bytes, mask: np.ndarray) -> float:
    """Contrast centre μ: median brightness inside the USrc mask, from a 1/4-scale JPEG decode (libjpeg
    scales in the DCT, so this costs a fraction of a full decode; a median barely moves under 4×4 averaging)."""
    small = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_4)
    if small is None:
        raise BadSample("image member does not decode")
    m = cv2.resize(mask.view(np.uint8), (small.shape[1], small.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    return C.masked_median(small, m)


def contrast_centre(reader: SampleReader, i: int, jpeg: bytes, mask: np.ndarray) -> float:
    """μ of sample ``i``: the median stored at ingest, else (older corpora) measured from a 1/4-scale decode,
    which costs as much as a full decode's entropy pass (~0.35 ms)."""
    if i < 0:  # the black placeholder
        return 0.0
    mu = reader.median(i)
    return median_in_mask(jpeg, mask) if mu is None else mu


class MaskDecoder:
    """Decodes 1-bit PNG masks to bool arrays, caching by the PNG bytes (a video's frames share one mask)."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._cache: dict[bytes, np.ndarray] = {}

    def __call__(self, png: bytes) -> np.ndarray:
        m = self._cache.get(png)
        if m is None:
            img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
            if img is None:
                raise BadSample("mask member does not decode")
            m = img > 0
            m.setflags(write=False)
            if len(self._cache) >= self.capacity:
                self._cache.pop(next(iter(self._cache)))  # oldest first (dicts keep insertion order)
            self._cache[png] = m
        return m


_PLACEHOLDER: tuple[bytes, bytes] | None = None


def placeholder_sample() -> tuple[bytes, bytes]:
    """A black 32×32 frame with an empty mask: stands in when every sample of a batch is unreadable."""
    global _PLACEHOLDER
    if _PLACEHOLDER is None:
        z = np.zeros((32, 32), np.uint8)
        _PLACEHOLDER = (cv2.imencode(".jpg", z)[1].tobytes(), cv2.imencode(".png", z)[1].tobytes())
    return _PLACEHOLDER


@dataclass
class PreparedBatch:
    """One batch decided in a CPU worker; the backends turn ``jpegs`` + ``params`` into pixels."""

    ids: np.ndarray  # int64 [B] sample ids actually used (-1 = placeholder)
    replaced: np.ndarray  # bool [B] the planned sample was unreadable and got replaced
    jpegs: list[bytes]
    params: list[SampleParams]
    valid: np.ndarray  # bool [B, G, G]
    ctx_idx: np.ndarray  # int64 [B, Kc]
    tgt_idx: np.ndarray  # int64 [T, B, Kt]
    scale: np.ndarray  # float32 [B] contrast + normalisation as x·scale + bias on the uint8 pixels
    bias: np.ndarray  # float32 [B]
    speckle_eps: np.ndarray  # float32 [B] speckle ε left to the device (0: none, or drawn in the worker)
    speckle_seed: np.ndarray  # int64 [B] seeds of those device draws
    errors: list[str] = field(default_factory=list)


def mask_seed(seed: int, epoch: int, first_position: int, train: bool) -> int:
    """Block-mask seed of a batch: a pure function of where the batch starts in the epoch order (so resume
    reproduces it); validation ignores the epoch, so its masks are the same every time."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch if train else 0) & 0xFFFFFFFF,
                                 int(first_position) & 0xFFFFFFFF, int(first_position) >> 32, 0xB10C])
    return int(ss.generate_state(2, np.uint64)[0] >> np.uint64(1))


def prepare_batch(
    ids: np.ndarray,
    reader: SampleReader,
    masks: MaskDecoder,
    cfg: DataConfig,
    mask_cfg,
    seed: int,
    epoch: int,
    batch_seed: int,
    train: bool,
) -> PreparedBatch:
    from usjepa.kernels.block_masks import sample_block_masks

    n = len(ids)
    raw: list[tuple[bytes, np.ndarray] | None] = []
    errors: list[str] = []
    reader.prefetch(ids)  # issue 21.2: a remote corpus fetches the batch's members in coalesced ranges
    for i in ids:
        try:
            jpg, png = reader.read(int(i))
            raw.append((jpg, masks(png)))
        except BadSample as e:
            errors.append(str(e))
            raw.append(None)
    used = np.asarray(ids, np.int64).copy()
    replaced = np.array([r is None for r in raw])
    if replaced.any():
        good = [k for k, r in enumerate(raw) if r is not None]
        for k in np.flatnonzero(replaced):
            if good:  # a duplicate of a readable sample of the same batch keeps the batch full and real
                src = good[k % len(good)]
                raw[k], used[k] = raw[src], used[src]
            else:
                jpg, png = placeholder_sample()
                raw[k], used[k] = (jpg, masks(png)), -1
    jpegs, params = [], []
    g = cfg.grid
    valid = np.empty((n, g, g), bool)
    for k, (jpg, mask) in enumerate(raw):
        rng = sample_rng(seed, epoch if train else 0, int(used[k]))
        p = draw_params(rng, mask.shape, cfg, train)
        if p.alpha != 1.0:
            p.mu = contrast_centre(reader, int(used[k]), jpg, mask)
        valid[k] = validity_grid(mask, p, cfg)
        jpegs.append(jpg)
        params.append(p)
    ctx, tgt = sample_block_masks(valid, mask_cfg, batch_seed)
    scale, bias = np.array([p.affine(cfg) for p in params], np.float32).reshape(n, 2).T.copy()
    on_device = [p.speckle_field is None and p.speckle_eps > 0 for p in params]
    speckle_eps = np.array([p.speckle_eps if d else 0.0 for p, d in zip(params, on_device)], np.float32)
    speckle_seed = np.array([p.speckle_seed if d else 0 for p, d in zip(params, on_device)], np.int64)
    return PreparedBatch(used, replaced, jpegs, params, valid, np.asarray(ctx, np.int64), np.asarray(tgt, np.int64),
                         scale, bias, speckle_eps, speckle_seed, errors)
