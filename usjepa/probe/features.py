"""Labelled items -> frames as ingest preprocesses them -> encoder input -> pooled features, cached on disk.

Frames go through ingest's own functions (``usjepa.ingest.readers.open_frames``, and
``usjepa.ingest.preprocess``: ``preprocess_frame`` for a still; for a video or volume, as ingest's
pipeline does, ``prepare_frame`` on every frame, one ``compute_usrc_mask`` over the clip, ``finish_frame``
on the frames kept). A video or volume gives ``frames_per_video`` evenly spaced frames (or the frames a CSV
names); ingest's shards hold frames already preprocessed, which are only decoded. Each frame is then
resized to the encoder's square input (area interpolation; the mask nearest-neighbour), as the validation
path of training does. For robustness, the corruption (``usjepa.shards.corruptions``) is applied to that
encoder-sized image with its mask, with noise seeded from the item's path and frame.

Bad input never aborts: a file that cannot be read, or a frame that preprocessing rejects (all black,
flat), is skipped and listed in ``FeatureTable.skipped`` with its reason (the report counts them, the CLI
exits 3).

Speed: decoding and preprocessing run in ``workers`` threads (OpenCV and NumPy release the GIL) while the
encoder runs batched under ``torch.inference_mode`` with every usable core, in bf16 where the hardware
runs it natively (``precision="auto"``: CUDA, or a CPU with AVX-512 BF16 / AMX), else fp32.

Cache: one safetensors file per (encoder weights sha256, input normalisation, precision, input files
with sizes and mtimes and the frames asked of them, preprocessing, frames per video, pooling, corruption),
named by the sha256 of all of them (``feature_cache_key``); the key is also stored in the file and checked
on load. No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from usjepa.probe.data import DEFAULT_FRAMES_PER_VIDEO, LabelledItem, LabelledSet, evenly_spaced
from usjepa.probe.encoders import ProbeEncoder

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
PRECISIONS = ("auto", "fp32", "bf16")
MASK_FRAMES = 256  # a clip's USrc mask is computed over at most ~2x this many evenly spaced frames (bounds RAM)
# ingest's video reader captures FFmpeg's messages by pointing file descriptor 2 at a temporary file around
# each frame: a process-wide switch, so two clips decoding in two threads would swap each other's messages
# (and skip reasons). Clips decode one at a time; stills and shard samples still run in parallel.
_CLIP_DECODE = threading.Lock()


class ImageReadError(ValueError):
    """A labelled file or frame that cannot be used (unreadable, rejected by preprocessing)."""


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """Preprocessing threads: two keep the encoder fed on a small machine; more help on a big one."""
    return max(2, min(8, usable_cores() // 2))


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 where it is native and fast (CUDA with bf16, CPUs with AVX-512 BF16 or AMX), else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text().split()
        except OSError:
            return "fp32"
        return "bf16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "fp32"
    return "fp32"


# ------------------------------------------------------------------------------------ frames of an item


@dataclass
class ItemFrames:
    frames: list[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=list)  # (index, gray, mask)
    skipped: list[tuple[int | None, str]] = field(default_factory=list)  # (frame or None for the file, reason)


def _read_mask_file(path: Path) -> np.ndarray:
    m = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise ImageReadError(f"cannot decode scan mask {path}")
    return m > 0


def _still(item: LabelledItem, cfg, out: ItemFrames) -> None:
    from usjepa.ingest.preprocess import FrameRejected, preprocess_frame
    from usjepa.ingest.readers import open_frames

    for index, frame in open_frames(item.path, max_pixels=cfg.max_pixels):
        usrc = None
        if item.scan_mask is not None:  # preprocess_frame resizes it to the prepared frame
            usrc = _read_mask_file(item.scan_mask)
        try:
            gray, mask = preprocess_frame(frame, cfg, usrc_mask=usrc)
        except FrameRejected as e:
            out.skipped.append((index, e.reason))
            continue
        out.frames.append((index, gray, mask))


class _EvenBuffer:
    """Frames of a stream of unknown length, thinned to stay evenly spaced within ``2 * cap`` entries."""

    def __init__(self, cap: int):
        self.cap, self.step, self.items = cap, 1, []
        self._seen = 0

    def offer(self, make):
        if self._seen % self.step == 0:
            self.items.append(make())
            if len(self.items) >= 2 * self.cap:
                self.items = self.items[::2]
                self.step *= 2
        self._seen += 1


def _clip(item: LabelledItem, cfg, frames_per_video: int, out: ItemFrames) -> None:
    from usjepa.ingest.preprocess import FrameRejected, compute_usrc_mask, finish_frame, prepare_frame
    from usjepa.ingest.readers import open_frames

    wanted = set(item.frames) if item.frames is not None else None
    kept: dict[int, tuple] = {}  # frames to finish: index -> (gray, colour)
    spread = _EvenBuffer(max(MASK_FRAMES, frames_per_video))  # evenly spaced prepared frames (mask, selection)
    for index, frame in open_frames(item.path, max_pixels=cfg.max_pixels):
        try:
            gray, colour = prepare_frame(frame, cfg)
        except FrameRejected as e:
            if wanted is None or index in wanted:
                out.skipped.append((index, e.reason))
            continue
        spread.offer(lambda: (index, gray, colour))
        if wanted is not None and index in wanted:
            kept[index] = (gray, colour)
    if wanted is not None:
        out.skipped += [(i, "frame not in the file") for i in sorted(wanted - kept.keys())]
    else:
        picks = evenly_spaced(len(spread.items), frames_per_video)
        kept = {spread.items[p][0]: spread.items[p][1:] for p in picks}
    grays = [g for _, g, _ in spread.items]
    shared = compute_usrc_mask(np.stack(grays), cfg) if grays and len({g.shape for g in grays}) == 1 else None
    for index in sorted(kept):
        gray, colour = kept[index]
        mask = shared if shared is not None and shared.shape == gray.shape else compute_usrc_mask(gray, cfg)
        try:
            out.frames.append((index, finish_frame(gray, colour, mask, cfg), mask))
        except FrameRejected as e:
            out.skipped.append((index, e.reason))


def _shard(item: LabelledItem, out: ItemFrames) -> None:
    from usjepa.shards.format import read_member

    for sf in item.shard_frames:
        with open(sf.tar, "rb") as f:
            jpg, png = read_member(f, *sf.image), read_member(f, *sf.mask)
        gray = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_GRAYSCALE)
        mask = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
        if gray is None or mask is None:
            out.skipped.append((sf.frame, "undecodable shard sample"))
            continue
        out.frames.append((sf.frame, gray, mask > 0))


def frames_of_item(item: LabelledItem, preprocess_cfg, frames_per_video: int = DEFAULT_FRAMES_PER_VIDEO) -> ItemFrames:
    """The frames of one labelled item as ingest preprocesses them; unreadable input is listed, never raised."""
    from usjepa.ingest.readers import SourceUnreadable
    from usjepa.shards.format import ShardFormatError

    out = ItemFrames()
    try:
        if item.kind == "shard":
            _shard(item, out)
        elif item.kind == "still":
            _still(item, preprocess_cfg, out)
        else:
            with _CLIP_DECODE:
                _clip(item, preprocess_cfg, frames_per_video, out)
    except SourceUnreadable as e:
        out.skipped.append((None, e.reason))
    except (ImageReadError, ShardFormatError, OSError) as e:
        out.skipped.append((None, str(e)))
    except Exception as e:  # a reader library failing in its own way on one file must not end the run
        out.skipped.append((None, f"{type(e).__name__}: {e}"))
    return out


def to_encoder_size(gray: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    img = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)
    m = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)
    return img, m


def corrupted(img: np.ndarray, mask: np.ndarray, kind: str, eps: float, seed_text: str) -> np.ndarray:
    """The test-time corruption (shared with the augmentations), as uint8, with per-image seeded noise."""
    from usjepa.shards.corruptions import corrupt

    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little"))
    out = np.asarray(corrupt(img, kind, eps, mask=mask, rng=rng))
    if out.dtype != np.uint8:
        out = np.clip(np.rint(out.astype(np.float64)), 0, 255).astype(np.uint8)
    return out


def encoder_inputs(item: LabelledItem, preprocess_cfg, size: int, corruption: tuple[str, float] | None,
                   frames_per_video: int) -> tuple[list[tuple[int, np.ndarray]], list[tuple[int | None, str]]]:
    """One item -> ([(frame index, uint8 [size, size])], skipped)."""
    got = frames_of_item(item, preprocess_cfg, frames_per_video)
    images = []
    for index, gray, mask in got.frames:
        img, m = to_encoder_size(gray, mask, size)
        if corruption is not None:
            kind, eps = corruption
            img = corrupted(img, m, kind, eps, f"{kind}\0{eps}\0{item.rel}\0{index}")
        images.append((index, img))
    return images, got.skipped


# ------------------------------------------------------------------------------------------ the cache


def preprocess_dict(preprocess_cfg) -> dict:
    if is_dataclass(preprocess_cfg):
        return asdict(preprocess_cfg)
    return dict(vars(preprocess_cfg))


def feature_cache_key(encoder: ProbeEncoder, data: LabelledSet, indices: np.ndarray, preprocess_cfg,
                      pooling: str, corruption: tuple[str, float] | None, frames_per_video: int,
                      precision: str) -> str:
    parts = {
        "format": CACHE_FORMAT,
        "encoder": encoder.identity,
        "input": [encoder.img_size, encoder.in_chans, list(encoder.mean), list(encoder.std)],
        "precision": precision,
        "files": data.input_digest(),
        "indices": hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest(),
        "preprocess": preprocess_dict(preprocess_cfg),
        "frames_per_video": frames_per_video,
        "pooling": pooling,
        "corruption": list(corruption) if corruption else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class FeatureTable:
    features: np.ndarray  # float32 [n_frames, D]
    item: np.ndarray  # int64 [n_frames]: position in data.items of each row
    frame: np.ndarray  # int64 [n_frames]: frame index within its item's file
    skipped: list[dict]  # {"path", "frame", "reason"}
    key: str
    path: Path | None
    from_cache: bool
    frames_per_s: float | None = None  # extraction throughput (None from the cache)


def _load_cached(path: Path, key: str) -> FeatureTable | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            t = {k: f.get_tensor(k).numpy() for k in ("features", "item", "frame")}
            skipped = json.loads(meta.get("skipped", "[]"))
    except Exception as e:  # a truncated or foreign file: re-extract, never trust it
        log.warning("ignoring unreadable feature cache %s (%s)", path, e)
        return None
    if t["features"].ndim != 2 or not (len(t["features"]) == len(t["item"]) == len(t["frame"])):
        return None
    return FeatureTable(t["features"], t["item"], t["frame"], skipped, key, path, from_cache=True)


def _save(table: FeatureTable, path: Path, encoder: ProbeEncoder, data: LabelledSet, pooling: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two runs sharing a cache never collide
    save_file({"features": torch.from_numpy(table.features), "item": torch.from_numpy(table.item),
               "frame": torch.from_numpy(table.frame)}, str(tmp),
              metadata={"key": table.key, "encoder": encoder.spec, "dataset": data.name, "pooling": pooling,
                        "skipped": json.dumps(table.skipped)})
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- extraction


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _prefetched(fn, jobs, workers: int):
    """``map(fn, jobs)`` in order, computed ``workers`` at a time ahead of the consumer (bounded memory)."""
    if workers <= 0:
        yield from map(fn, jobs)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="probe-prep") as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(fn, job))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def extract_features(encoder: ProbeEncoder, data: LabelledSet, indices: np.ndarray, preprocess_cfg, *,
                     pooling: str = "mean", corruption: tuple[str, float] | None = None,
                     cache_dir: str | os.PathLike | None = None, batch_size: int = 32,
                     workers: int | None = None, frames_per_video: int = DEFAULT_FRAMES_PER_VIDEO,
                     precision: str = "auto", progress: bool = False) -> FeatureTable:
    """Pooled features of the frames of ``data.items[indices]`` (optionally corrupted); from the cache when
    the key matches. Rows follow ``indices`` and, within an item, its frame order."""
    import time

    indices = np.asarray(indices, dtype=np.int64)
    precision = resolve_precision(precision, encoder.device)
    key = feature_cache_key(encoder, data, indices, preprocess_cfg, pooling, corruption, frames_per_video, precision)
    path = Path(cache_dir) / f"{key[:32]}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        table = _load_cached(path, key)
        if table is not None:
            return table

    def prepare(i: int):
        return i, encoder_inputs(data.items[i], preprocess_cfg, encoder.img_size, corruption, frames_per_video)

    bar = None
    if progress:
        from tqdm import tqdm

        what = f"{corruption[0]} eps={corruption[1]:g}" if corruption else "clean"
        bar = tqdm(total=len(indices), desc=f"features {data.name} {what}", unit="file", leave=False)
    chunks, rows_item, rows_frame, skipped = [], [], [], []
    batch: list[np.ndarray] = []
    cpu_threads = usable_cores() if encoder.device.type == "cpu" else torch.get_num_threads()

    def flush():
        if batch:
            x = torch.from_numpy(np.stack(batch))
            chunks.append(encoder.pooled_features(x, pooling, precision=precision).cpu().numpy())
            batch.clear()

    t0 = time.perf_counter()
    with torch_threads(cpu_threads):
        for i, (images, skips) in _prefetched(prepare, indices.tolist(), default_workers() if workers is None
                                              else workers):
            for frame, img in images:
                rows_item.append(i)
                rows_frame.append(frame)
                batch.append(img)
                if len(batch) >= batch_size:
                    flush()
            skipped += [{"path": data.items[i].rel, "frame": f, "reason": r} for f, r in skips]
            if bar is not None:
                bar.update(1)
        flush()
    elapsed = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    for s in skipped:
        where = s["path"] + (f" frame {s['frame']}" if s["frame"] is not None else "")
        log.warning("skipped %s: %s", where, s["reason"])
    feats = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, 0), np.float32)
    if not np.isfinite(feats).all():
        raise FloatingPointError(f"encoder {encoder.spec!r} produced non-finite features on {data.name}")
    table = FeatureTable(feats, np.asarray(rows_item, np.int64), np.asarray(rows_frame, np.int64), skipped, key,
                         path, from_cache=False, frames_per_s=len(rows_item) / elapsed if elapsed > 0 else None)
    if path is not None:
        _save(table, path, encoder, data, pooling)
    return table
