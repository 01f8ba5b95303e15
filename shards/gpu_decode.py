"""The torch backend's GPU path (``DataConfig.decode_on="device"``): nvJPEG decode and the pixel ops on the GPU.

Without DALI (the lent GPU machine has none) the torch backend decodes, crops, resizes and blurs every frame
with OpenCV in its CPU workers. With ``decode_on="device"`` the workers do everything else as before
(``augment.prepare_batch``: bytes, random parameters, validity grids, block masks) and hand over the JPEG
bytes; the loader then, on the GPU, with what torchvision brings and nothing else:

* decodes the batch with ``torchvision.io.decode_jpeg(device="cuda")`` (batched nvJPEG), grayscale;
* crops + resizes each frame to S² with ``torchvision.ops.roi_align`` (``aligned=True``: the crop window
  covers exactly its source pixels; ``sampling_ratio=0``: ceil(crop / S) bilinear samples per output pixel
  and axis, averaged — an area-style antialiased downscale, bilinear when upscaling, as OpenCV's INTER_AREA /
  INTER_LINEAR in the worker path), one call per distinct frame size in the batch; rounds to gray levels;
* flips (one batched ``where`` per axis), blurs with each sample's Gaussian (``corruptions.blur_kernel``,
  zero-padded to the batch's widest, reflect-101 border, one grouped convolution), rounds again.

Speckle, contrast and normalisation then follow as on every path (``loader._to_batch``). A JPEG nvJPEG
rejects is replaced by a decodable sample of the batch (``baseline.replace_undecodable``), as in the worker
path. torchvision is imported here only (it has no CPU build on the CI machines); ``available()`` says
whether this path can run, and ``build_loader`` falls back to the worker path with a warning where not.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from usjepa.shards.augment import DataConfig, PreparedBatch
from usjepa.shards.baseline import batch_tensors, replace_undecodable
from usjepa.shards.corruptions import blur_kernel, blur_params
from usjepa.shards.transfer import to_device


def available() -> bool:
    """CUDA and a torchvision with nvJPEG decode and roi_align."""
    if not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
        from torchvision.ops import roi_align  # noqa: F401
    except Exception:  # absent, or built for another torch
        return False
    return True


def encoded_batch(pb: PreparedBatch, cfg: DataConfig) -> dict:
    """What a worker hands over on this path: the JPEG bytes and pixel parameters instead of pixels."""
    n = len(pb.jpegs)
    crop = np.array([p.crop for p in pb.params], np.float32).reshape(n, 4)  # y0, x0, h, w
    flips = np.array([(p.vflip, p.hflip) for p in pb.params], bool).reshape(n, 2)
    blur = np.array([p.blur_eps for p in pb.params], np.float32)
    return {"jpeg": [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in pb.jpegs],
            "crop": torch.from_numpy(crop), "flips": torch.from_numpy(flips), "blur_eps": torch.from_numpy(blur),
            **batch_tensors(pb)}


def _host_to(device: torch.device, a: np.ndarray) -> torch.Tensor:
    return to_device(torch.from_numpy(np.ascontiguousarray(a)), device)


def decode(jpegs: list[torch.Tensor], device: torch.device) -> tuple[list[torch.Tensor | None], list[int]]:
    """Grayscale [1, H, W] uint8 frames on ``device``; the indices nvJPEG rejected come back as None."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(jpegs, mode=ImageReadMode.GRAY, device=device), []
    except RuntimeError:  # one bad frame fails the batched call: find it, keep the others
        frames, bad = [], []
        for k, j in enumerate(jpegs):
            try:
                frames.append(decode_jpeg(j, mode=ImageReadMode.GRAY, device=device))
            except RuntimeError:
                frames.append(None)
                bad.append(k)
        return frames, bad


def render_on_device(raw: dict, cfg: DataConfig, device: torch.device) -> dict:
    """``raw`` from ``encoded_batch`` → the same dict with ``"image"``: uint8 [B, 1, S, S] on ``device``."""
    from torchvision.ops import roi_align

    s = cfg.image_size
    frames, bad = decode(raw.pop("jpeg"), device)
    crop, flips, blur = raw.pop("crop").numpy(), raw.pop("flips").numpy(), raw.pop("blur_eps").numpy()
    n = len(frames)
    out = torch.zeros((n, 1, s, s), dtype=torch.float32, device=device)
    by_size: dict[tuple[int, int], list[int]] = {}
    for k, f in enumerate(frames):
        if f is not None:
            by_size.setdefault(tuple(f.shape[-2:]), []).append(k)
    for ks in by_size.values():
        y0, x0, h, w = crop[ks].T
        boxes = np.stack([np.arange(len(ks)), x0, y0, x0 + w, y0 + h], axis=1).astype(np.float32)
        stack = torch.stack([frames[k] for k in ks]).float()
        resized = roi_align(stack, _host_to(device, boxes), output_size=(s, s), spatial_scale=1.0,
                            sampling_ratio=0, aligned=True)
        if len(ks) == n:
            out = resized
        else:
            out.index_copy_(0, _host_to(device, np.array(ks, np.int64)), resized)
    out.round_().clamp_(0.0, 255.0)
    if flips.any():
        f = _host_to(device, flips)
        out = torch.where(f[:, 0].view(-1, 1, 1, 1), out.flip(-2), out)
        out = torch.where(f[:, 1].view(-1, 1, 1, 1), out.flip(-1), out)
    sizes = [blur_params(e).ksize if e > 0 else 1 for e in blur]
    if max(sizes) > 1:
        out = blur_on_device(out, blur, sizes, device)
    raw["image"] = out.to(torch.uint8)
    replace_undecodable(raw, bad, cfg)
    return raw


def blur_on_device(x: torch.Tensor, eps: np.ndarray, sizes: list[int], device: torch.device) -> torch.Tensor:
    """Each sample blurred with its own ``blur_kernel`` (identity where it drew none), rounded to gray levels."""
    n, _, h, w = x.shape
    k = max(sizes)
    half = k // 2
    kernels = np.zeros((n, k, k), np.float32)
    for i, (e, size) in enumerate(zip(eps, sizes)):
        lo = half - size // 2
        kernels[i, lo : lo + size, lo : lo + size] = blur_kernel(float(e)) if size > 1 else 1.0
    padded = F.pad(x.reshape(1, n, h, w), (half, half, half, half), mode="reflect")  # reflect-101, as OpenCV
    y = F.conv2d(padded, _host_to(device, kernels).view(n, 1, k, k), groups=n)
    return y.reshape(n, 1, h, w).round_().clamp_(0.0, 255.0)
