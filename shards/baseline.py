"""The plain PyTorch ``DataLoader`` + OpenCV/NumPy backend over the same shards and the same augmentations.

It is the benchmark baseline and the fallback when DALI is not installed. Each DataLoader item is a
whole batch (``batch_size=None``), so batch ``t`` goes to worker ``t mod num_workers`` exactly as in the DALI
pipeline, and the worker runs the same ``augment.prepare_batch``: only the pixel code differs.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from usjepa.shards import corruptions as C
from usjepa.shards.augment import DataConfig, MaskDecoder, PreparedBatch, SampleParams, mask_seed, prepare_batch
from usjepa.shards.readers import BadSample, SampleReader


def render_opencv(jpeg: bytes, p: SampleParams, cfg: DataConfig) -> np.ndarray:
    """Decode + crop + flips + resize + blur + speckle with OpenCV: uint8 [S, S] (contrast and normalisation
    are the batch's ``scale``/``bias``, applied by the loader)."""
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise BadSample("image member does not decode")
    s = cfg.image_size
    y0, x0, h, w = p.crop
    crop = img[y0 : y0 + h, x0 : x0 + w]
    # INTER_AREA is OpenCV's antialiased downscale (DALI's resize antialiases when shrinking too)
    interp = cv2.INTER_AREA if h >= s and w >= s else cv2.INTER_LINEAR
    x = cv2.resize(crop, (s, s), interpolation=interp)
    if p.vflip or p.hflip:
        x = cv2.flip(x, -1 if p.vflip and p.hflip else 0 if p.vflip else 1)
    if p.blur_eps > 0:
        x = C.apply_blur(x, p.blur_eps)
    if p.speckle_field is not None:
        x = C.apply_speckle_u8(x, p.speckle_field)
    return x


def render_batch(pb: PreparedBatch, cfg: DataConfig) -> dict:
    """Render a prepared batch with OpenCV. A JPEG that passed the marker checks but does not decode is
    replaced, with its grid, mask rows and affine, by a decodable sample of the same batch (black if none is)."""
    s = cfg.image_size
    images = np.empty((len(pb.jpegs), 1, s, s), np.uint8)
    bad = []
    for k, (jpg, p) in enumerate(zip(pb.jpegs, pb.params)):
        try:
            images[k, 0] = render_opencv(jpg, p, cfg)
        except BadSample as e:
            bad.append(k)
            pb.errors.append(str(e))
    raw = {"image": torch.from_numpy(images), **batch_tensors(pb)}
    replace_undecodable(raw, bad, cfg)
    return raw


def batch_tensors(pb: PreparedBatch) -> dict:
    """The batch's non-pixel tensors, as the loader takes them from either backend (sharing pb's arrays)."""
    return {
        "scale": torch.from_numpy(pb.scale),
        "bias": torch.from_numpy(pb.bias),
        "valid": torch.from_numpy(pb.valid),
        "ctx": torch.from_numpy(pb.ctx_idx),
        "tgt": torch.from_numpy(pb.tgt_idx),
        "sid": torch.from_numpy(pb.ids),
        "replaced": torch.from_numpy(pb.replaced),
        "speckle_eps": torch.from_numpy(pb.speckle_eps),
        "speckle_seed": torch.from_numpy(pb.speckle_seed),
    }


def replace_undecodable(raw: dict, bad: list[int], cfg: DataConfig) -> None:
    """In place: each sample in ``bad`` becomes a copy (pixels, grid, masks, affine, speckle) of a decodable
    sample of the same batch, or a black placeholder if none decoded; marked ``replaced``. ``raw["image"]``
    may live on the GPU (device decode), everything else is on the host."""
    good = [k for k in range(len(raw["sid"])) if k not in bad]
    for k in bad:
        if good:
            src = good[k % len(good)]
            for key in ("image", "valid", "sid", "ctx", "scale", "bias", "speckle_eps", "speckle_seed"):
                raw[key][k] = raw[key][src]
            raw["tgt"][:, k] = raw["tgt"][:, src]
        else:
            raw["image"][k] = 0
            raw["scale"][k], raw["bias"][k] = SampleParams((0, 0, 1, 1)).affine(cfg)
            raw["speckle_eps"][k] = 0.0
            raw["sid"][k] = -1
        raw["replaced"][k] = True


class BatchDataset(Dataset):
    """Item ``t`` = batch ``t`` of the current pass, rendered with OpenCV."""

    def __init__(self, reader: SampleReader, ids: np.ndarray, positions: np.ndarray, epoch: int,
                 cfg: DataConfig, mask_cfg, seed: int, train: bool):
        self.reader, self.ids, self.positions, self.epoch = reader, ids, positions, epoch
        self.cfg, self.mask_cfg, self.seed, self.train = cfg, mask_cfg, seed, train
        self._masks: MaskDecoder | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, t: int) -> dict:
        if self._masks is None:
            self._masks = MaskDecoder(self.cfg.mask_cache)
        bseed = mask_seed(self.seed, self.epoch, int(self.positions[t]), self.train)
        pb = prepare_batch(self.ids[t], self.reader, self._masks, self.cfg, self.mask_cfg, self.seed,
                           self.epoch, bseed, self.train)
        if self.cfg.decode_on == "device":  # pixels are made on the GPU by the loader (gpu_decode.py)
            from usjepa.shards.gpu_decode import encoded_batch

            return encoded_batch(pb, self.cfg)
        return render_batch(pb, self.cfg)


def _worker_init(_):
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        import numba

        numba.set_num_threads(1)
    except Exception:
        pass


def make_dataloader(dataset: BatchDataset, cfg: DataConfig, pin_memory: bool) -> DataLoader:
    nw = max(0, cfg.num_workers)
    return DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=nw,
        pin_memory=pin_memory,
        prefetch_factor=max(1, cfg.prefetch) if nw else None,
        worker_init_fn=_worker_init if nw else None,
    )
