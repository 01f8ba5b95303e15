"""The DALI pipeline: encoded bytes from parallel Python workers → decode → crop/flip/resize → blur → speckle,
on the GPU (``decoders.image(device="mixed")``) or on DALI's CPU backend (same code, ``device_id=None``).

The parallel ``external_source`` runs ``DaliBatchSource`` in ``py_num_workers`` processes in batch mode:
DALI hands iteration ``t`` of pass ``k`` to a worker, which reads that batch's bytes by index offset, decides
every random parameter and the validity grid and block masks (``augment.prepare_batch``), and returns them as
per-sample tensors. What a pass contains is written by the loader into ``pass_<k>.npz`` before the pass starts
(sample ids per batch, the epoch, each batch's position in the epoch order), so the workers stay stateless
and a resumed or re-sliced epoch is just another file.

Design for the CPU backend (SPEC §9 numbers): the mask never enters DALI (it is needed only at patch
resolution and is handled in the worker); crop and flips are one ``resize`` with a (possibly reversed) ROI;
the photometric ops run under DALI conditionals, i.e. only on the samples that drew them; speckle noise is
drawn in the worker by the same function ``corrupt`` uses (``speckle_field``: one-pixel grains, so at output
resolution), or, with ``speckle_on="device"`` (the default on a GPU), after the pipeline on the device
(``device_speckle.py``; the record carries its ε and seed); pixels stay uint8, and contrast + normalisation
(one affine per sample) are left to the loader, on the training device. Every per-sample tensor that crosses from a worker into DALI costs ~7 µs in the
worker and ~10 µs in the pipeline (measured), so a sample travels as five: its JPEG, its speckle gain, its blur
kernel, one float vector of pixel parameters (``PARAMS``) and one byte record of everything DALI only passes
through (``record_dtype``: validity grid, block masks, sample id, affine).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from usjepa.shards.corruptions import blur_kernel, blur_params
from usjepa.shards.augment import DataConfig, MaskDecoder, PreparedBatch, mask_seed, prepare_batch
from usjepa.shards.readers import SampleReader
from usjepa.shards.worker_guard import die_with_parent

def write_pass(plan_dir: str | os.PathLike, k: int, ids: np.ndarray, epoch: int, positions: np.ndarray) -> None:
    """Plan of DALI pass ``k``: ids int64 [n_batches, B], the epoch, and the epoch-order position of each
    batch's first sample (seeds its block masks). Written atomically before the pass is started."""
    path = Path(plan_dir) / f"pass_{k}.npz"
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, ids=np.asarray(ids, np.int64), epoch=np.int64(epoch), positions=np.asarray(positions, np.int64))
    os.replace(tmp, path)


class DaliBatchSource:
    """Batch-mode callable for the parallel ``external_source`` (picklable, stateless per call)."""

    def __init__(self, reader: SampleReader, plan_dir: str, cfg: DataConfig, mask_cfg, seed: int, train: bool):
        self.reader = reader
        self.plan_dir = str(plan_dir)
        self.cfg = cfg
        self.mask_cfg = mask_cfg
        self.seed = seed
        self.train = train
        self._plans: dict[int, tuple[np.ndarray, int, np.ndarray]] = {}
        self._masks: MaskDecoder | None = None
        self._parent = os.getpid()  # the loader's process: its workers must not outlive it
        self._armed = self._parent

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_plans"], d["_masks"], d["_armed"] = {}, None, None
        return d

    def _plan(self, k: int):
        plan = self._plans.get(k)
        if plan is None:
            with np.load(Path(self.plan_dir) / f"pass_{k}.npz") as z:
                plan = (z["ids"], int(z["epoch"]), z["positions"])
            self._plans = {k: plan}  # one pass at a time; the previous one is finished
            _single_threaded_kernels()
        return plan

    def __call__(self, info):
        if self._armed != os.getpid():  # first call in this worker (forked or spawned): die with the loader
            die_with_parent(self._parent)
            self._armed = os.getpid()
        ids, epoch, positions = self._plan(info.epoch_idx)
        t = info.iteration
        if t >= len(ids):
            raise StopIteration
        if self._masks is None:
            self._masks = MaskDecoder(self.cfg.mask_cache)
        seed = mask_seed(self.seed, epoch, int(positions[t]), self.train)
        pb = prepare_batch(ids[t], self.reader, self._masks, self.cfg, self.mask_cfg, self.seed, epoch, seed, self.train)
        return batch_to_dali(pb)


def _single_threaded_kernels() -> None:
    # Loader workers are already one process per core; numba's prange inside each would oversubscribe.
    try:
        import numba

        numba.set_num_threads(1)
    except Exception:  # numba absent or its threading layer refuses: the kernel still runs
        pass


# per-sample float32 vector of pixel parameters, in this order
PARAMS = ("roi_y0", "roi_x0", "roi_y1", "roi_x1", "do_blur", "do_speckle")


def record_dtype(grid: int, kc: int, t: int, kt: int) -> np.dtype:
    """One sample's pass-through record (packed; its first three fields give the batch's mask sizes)."""
    return np.dtype([("kc", "<i4"), ("t", "<i4"), ("kt", "<i4"), ("sid", "<i8"), ("scale", "<f4"), ("bias", "<f4"),
                     ("replaced", "u1"), ("speckle_eps", "<f4"), ("speckle_seed", "<i8"), ("valid", "u1", (grid, grid)),
                     ("ctx", "<i8", (kc,)), ("tgt", "<i8", (t, kt))])


def batch_to_dali(pb: PreparedBatch) -> tuple[list[np.ndarray], ...]:
    """(jpegs, speckle gains, blur kernels, pixel parameters, records): per-sample arrays in ``build_pipeline``'s
    order."""
    n, g = pb.valid.shape[:2]
    t, _, kt = pb.tgt_idx.shape
    rec = np.zeros(n, record_dtype(g, pb.ctx_idx.shape[1], t, kt))
    rec["kc"], rec["t"], rec["kt"] = pb.ctx_idx.shape[1], t, kt
    rec["sid"], rec["scale"], rec["bias"], rec["replaced"] = pb.ids, pb.scale, pb.bias, pb.replaced
    rec["speckle_eps"], rec["speckle_seed"] = pb.speckle_eps, pb.speckle_seed
    rec["valid"], rec["ctx"], rec["tgt"] = pb.valid, pb.ctx_idx, pb.tgt_idx.transpose(1, 0, 2)
    rec_bytes = rec.view(np.uint8).reshape(n, -1)
    params = np.zeros((n, len(PARAMS)), np.float32)
    jpg, gain, kernel = [], [], []
    one = np.ones((1, 1), np.float32)
    for k, (b, p) in enumerate(zip(pb.jpegs, pb.params)):
        jpg.append(np.frombuffer(b, np.uint8))
        blur = blur_params(p.blur_eps).ksize > 1
        f = p.speckle_field
        start, end = p.roi()
        params[k] = (*start, *end, blur, f is not None)
        gain.append(one[:, :, None] if f is None else (f + np.float32(1.0))[:, :, None])
        kernel.append(blur_kernel(p.blur_eps) if blur else one)
    return jpg, gain, kernel, list(params), list(rec_bytes)


def records_to_torch(rec_bytes: np.ndarray, grid: int) -> dict:
    """uint8 [B, record size] (the pipeline's second output) → the batch's non-pixel tensors."""
    kc, t, kt = (int(v) for v in rec_bytes[0, :12].view("<i4"))
    rec = np.ascontiguousarray(rec_bytes).view(record_dtype(grid, kc, t, kt)).reshape(-1)
    return {
        "valid": torch.from_numpy(rec["valid"].astype(bool)),
        "ctx": torch.from_numpy(rec["ctx"].copy()),
        "tgt": torch.from_numpy(rec["tgt"].transpose(1, 0, 2).copy()),
        "sid": torch.from_numpy(rec["sid"].copy()),
        "replaced": torch.from_numpy(rec["replaced"].astype(bool)),
        "scale": torch.from_numpy(rec["scale"].copy()),
        "bias": torch.from_numpy(rec["bias"].copy()),
        "speckle_eps": torch.from_numpy(rec["speckle_eps"].copy()),
        "speckle_seed": torch.from_numpy(rec["speckle_seed"].copy()),
    }


def build_pipeline(source: DaliBatchSource, batch_size: int, cfg: DataConfig, device_id: int | None,
                   start_method: str = "fork"):
    """The DALI pipeline (not yet built). ``device_id=None`` runs everything on DALI's CPU backend."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    size = [cfg.image_size, cfg.image_size]
    at = {name: i for i, name in enumerate(PARAMS)}

    @pipeline_def(enable_conditionals=True)
    def augment_pipeline():
        jpg, gain, kernel, params, records = fn.external_source(
            source=source, num_outputs=5, batch=True, parallel=True, batch_info=True,
            # batches the workers compute ahead: at least one per worker, or some of them sit idle
            prefetch_queue_depth=max(2, cfg.num_workers, cfg.prefetch),
            layout=["", "HWC", "", "", ""],
        )
        img = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.GRAY)
        # crop + flips + resize in one op: a reversed ROI axis is a flip (DALI resize semantics)
        img = fn.resize(img, size=size, roi_start=params[at["roi_y0"] : at["roi_x0"] + 1],
                        roi_end=params[at["roi_y1"] : at["roi_x1"] + 1])
        if params[at["do_blur"]] > 0:
            # a 2-D convolution with the worker's kernel: 2.5x faster than gaussian_blur on DALI's CPU backend
            img = fn.filter(img, kernel, border="reflect_101")
        if gpu:
            gain = gain.gpu()
        if params[at["do_speckle"]] > 0:
            img = fn.cast(img * gain, dtype=types.UINT8)  # rounds and saturates at 0 and 255
        return img, records

    return augment_pipeline(
        batch_size=batch_size,
        num_threads=max(1, cfg.num_workers),
        device_id=device_id,
        py_num_workers=max(1, cfg.num_workers),
        py_start_method=start_method,
        prefetch_queue_depth=max(1, cfg.prefetch),
    )
