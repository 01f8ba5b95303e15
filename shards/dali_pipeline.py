"""The DALI pipeline: encoded bytes from parallel Python workers → decode → crop/flip/resize → blur → speckle,
on the GPU (``decoders.image(device="mixed")``) or on DALI's CPU backend (same code, ``device_id=None``).

The parallel ``external_source`` runs ``DaliBatchSource`` in ``py_num_workers`` processes in batch mode:
DALI hands iteration ``t`` of pass ``k`` to a worker, which reads that batch's bytes by index offset, decides
every random parameter and the validity grid and block masks (``augment.prepare_batch``), and returns them.
What a pass contains is written by the loader into ``pass_<k>.npz`` before the pass starts (sample ids per
batch, the epoch, each batch's position in the epoch order), so the workers stay stateless and a resumed or
re-sliced epoch is just another file; a ``stop_<k>`` file ends pass ``k`` early (a loop that broke off).

Start-up: the loader starts the workers when it is built (``start_workers``), by fork while CUDA is not yet
initialised in the process (DALI cannot fork after), so each costs milliseconds and inherits the sample table
and the Numba kernels compiled in the parent (``warm_kernels``). A worker started later (a dead one replaced
after CUDA is up) is spawned: its payload is the corpus root, the split and a few numbers
(``DaliBatchSource.__getstate__``), far below the 64 KiB a pipe takes without blocking, so the new workers
start side by side instead of one after another, and they import no torch (this module does not).

What crosses from a worker into DALI (each per-sample tensor costs ~7 µs in the worker and ~10 µs in the
trainer's main thread, which feeds DALI): the JPEGs as a list (their lengths differ), then batch-shaped arrays,
one tensor each: pixel parameters float32 [B, 6] (``PARAMS``), 1-D Gaussian blur taps float32 [B, K] (zero-padded
to the batch's widest; the blur is separable and runs as a row then a column ``filter``) and one byte record per
sample uint8 [B, R] of everything DALI only passes through (``record_dtype``: validity grid, block masks, sample
id, affine). With speckle drawn in the worker (the CPU default) a list of speckle gains follows, [S, S, 1] for the
speckled samples and [1, 1, 1] for the others; with ``speckle_on="device"`` (the default on a GPU) there is none.

Design for the CPU backend (SPEC §9 numbers): the mask never enters DALI (it is needed only at patch
resolution and is handled in the worker); crop and flips are one ``resize`` with a (possibly reversed) ROI;
the photometric ops run under DALI conditionals, i.e. only on the samples that drew them; pixels stay uint8,
and contrast + normalisation (one affine per sample) are left to the loader, on the training device.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from usjepa.shards.augment import DataConfig, MaskDecoder, PreparedBatch, mask_seed, prepare_batch
from usjepa.shards.corruptions import blur_params, blur_taps
from usjepa.shards.worker_guard import die_with_parent


def write_pass(plan_dir: str | os.PathLike, k: int, ids: np.ndarray, epoch: int, positions: np.ndarray) -> None:
    """Plan of DALI pass ``k``: ids int64 [n_batches, B], the epoch, and the epoch-order position of each
    batch's first sample (seeds its block masks). Written atomically before the pass is started."""
    path = Path(plan_dir) / f"pass_{k}.npz"
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, ids=np.asarray(ids, np.int64), epoch=np.int64(epoch), positions=np.asarray(positions, np.int64))
    os.replace(tmp, path)
    stop_path(plan_dir, k).unlink(missing_ok=True)  # left by an earlier pipeline that also had a pass k


def stop_path(plan_dir: str | os.PathLike, k: int) -> Path:
    """Its existence ends pass ``k`` at the next batch a worker starts (a loop that broke off mid-pass)."""
    return Path(plan_dir) / f"stop_{k}"


class DaliBatchSource:
    """Batch-mode callable for the parallel ``external_source`` (stateless per call).

    It finds its samples from ``root``, ``split`` and ``val_from_train`` alone: a forked worker inherits the
    parent's open ``reader``; a spawned one receives only those (``__getstate__``) and opens the table itself.
    For a corpus in object storage ``root`` is its URL and ``cache_dir`` / ``cache_limit_gb`` come along, so
    the worker opens the same mirror and table and reads through the same bounded shard cache (issue 21.2)."""

    def __init__(self, root, split: str, val_from_train: float, plan_dir: str, cfg: DataConfig, mask_cfg,
                 seed: int, train: bool, reader=None, cache_dir: str | None = None,
                 cache_limit_gb: float | None = None):
        self.root, self.split, self.val_from_train = str(root), split, float(val_from_train)
        self.cache_dir, self.cache_limit_gb = cache_dir, cache_limit_gb
        self.plan_dir = str(plan_dir)
        self.cfg = cfg
        self.mask_cfg = mask_cfg
        self.seed = seed
        self.train = train
        self._reader = reader
        self._plans: dict[int, tuple[np.ndarray, int, np.ndarray]] = {}
        self._masks: MaskDecoder | None = None
        self._parent = os.getpid()  # the loader's process: its workers must not outlive it
        self._armed = self._parent

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_reader"], d["_plans"], d["_masks"], d["_armed"] = None, {}, None, None
        return d

    @property
    def reader(self):
        if self._reader is None:
            from usjepa.shards.readers import open_sample_table

            remote = {} if self.cache_limit_gb is None else {"cache_dir": self.cache_dir,
                                                             "cache_limit_gb": self.cache_limit_gb}
            self._reader = open_sample_table(self.root, self.split, self.val_from_train, **remote).reader_view()
        return self._reader

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
        if t >= len(ids) or stop_path(self.plan_dir, info.epoch_idx).exists():
            raise StopIteration
        if self._masks is None:
            self._masks = MaskDecoder(self.cfg.mask_cache)
        seed = mask_seed(self.seed, epoch, int(positions[t]), self.train)
        pb = prepare_batch(ids[t], self.reader, self._masks, self.cfg, self.mask_cfg, self.seed, epoch, seed, self.train)
        return batch_to_dali(pb, with_gains=self.cfg.speckle_on == "worker")


def _single_threaded_kernels() -> None:
    # Loader workers are already one process per core; numba's prange inside each would oversubscribe.
    try:
        import numba

        numba.set_num_threads(1)
    except Exception:  # numba absent or its threading layer refuses: the kernel still runs
        pass


def warm_kernels(mask_cfg) -> None:
    """Compile (or load from Numba's cache) the block-mask kernel in this process, so that forked workers
    inherit it instead of each compiling it at its first batch (tens of seconds on a busy machine). Runs
    the serial kernel only: no Numba thread pool is started before the fork."""
    from usjepa.kernels.block_masks import sample_block_masks

    sample_block_masks(np.ones((1, mask_cfg.grid, mask_cfg.grid), bool), mask_cfg, 0)


def worker_start_method() -> str:
    """``"fork"`` while no CUDA driver is initialised in this process, else ``"spawn"`` (DALI refuses to fork
    then: a forked child cannot use a CUDA context it inherits)."""
    from nvidia.dali.backend import IsDriverInitialized

    return "spawn" if IsDriverInitialized() else "fork"


# per-sample float32 vector of pixel parameters, in this order
PARAMS = ("roi_y0", "roi_x0", "roi_y1", "roi_x1", "do_blur", "do_speckle")


def record_dtype(grid: int, kc: int, t: int, kt: int) -> np.dtype:
    """One sample's pass-through record; its first three fields give the batch's mask sizes. Aligned as a C
    struct (size a multiple of 8), so each field of a [B, size] byte buffer can be viewed in place with its
    own dtype, on the host or, after one copy, on the device."""
    return np.dtype([("kc", "<i4"), ("t", "<i4"), ("kt", "<i4"), ("sid", "<i8"), ("scale", "<f4"), ("bias", "<f4"),
                     ("replaced", "u1"), ("speckle_eps", "<f4"), ("speckle_seed", "<i8"), ("valid", "u1", (grid, grid)),
                     ("ctx", "<i8", (kc,)), ("tgt", "<i8", (t, kt))], align=True)


def batch_record_dtype(rec_bytes: np.ndarray, grid: int) -> np.dtype:
    """The record dtype of a uint8 [B, size] batch of records (read from its first row)."""
    kc, t, kt = (int(v) for v in np.ascontiguousarray(rec_bytes[0, :12]).view("<i4"))
    return record_dtype(grid, kc, t, kt)


def batch_to_dali(pb: PreparedBatch, with_gains: bool) -> tuple:
    """(jpegs, pixel parameters, blur taps, records[, speckle gains]) in ``build_pipeline``'s order: the JPEGs
    (and gains) as per-sample lists, the rest as batch-shaped arrays."""
    n, g = pb.valid.shape[:2]
    t, _, kt = pb.tgt_idx.shape
    rec = np.zeros(n, record_dtype(g, pb.ctx_idx.shape[1], t, kt))
    rec["kc"], rec["t"], rec["kt"] = pb.ctx_idx.shape[1], t, kt
    rec["sid"], rec["scale"], rec["bias"], rec["replaced"] = pb.ids, pb.scale, pb.bias, pb.replaced
    rec["speckle_eps"], rec["speckle_seed"] = pb.speckle_eps, pb.speckle_seed
    rec["valid"], rec["ctx"], rec["tgt"] = pb.valid, pb.ctx_idx, pb.tgt_idx.transpose(1, 0, 2)
    params = np.zeros((n, len(PARAMS)), np.float32)
    taps = [blur_taps(p.blur_eps) if blur_params(p.blur_eps).ksize > 1 else None for p in pb.params]
    width = max((len(k) for k in taps if k is not None), default=1)
    kernel = np.zeros((n, width), np.float32)
    kernel[:, width // 2] = 1.0
    gains, one = [], np.ones((1, 1, 1), np.float32)
    for k, p in enumerate(pb.params):
        f = p.speckle_field
        start, end = p.roi()
        params[k] = (*start, *end, taps[k] is not None, f is not None)
        if taps[k] is not None:  # centred, zero-padded: the extra taps add exact zeros
            pad = (width - len(taps[k])) // 2
            kernel[k] = 0.0
            kernel[k, pad:pad + len(taps[k])] = taps[k]
        if with_gains:
            gains.append(one if f is None else (f + np.float32(1.0))[:, :, None])
    out = ([np.frombuffer(b, np.uint8) for b in pb.jpegs], params, kernel, rec.view(np.uint8).reshape(n, -1))
    return (*out, gains) if with_gains else out


def build_pipeline(source: DaliBatchSource, batch_size: int, cfg: DataConfig, device_id: int | None,
                   start_method: str = "fork"):
    """The DALI pipeline (not yet built). ``device_id=None`` runs everything on DALI's CPU backend."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    with_gains = cfg.speckle_on == "worker"
    size = [cfg.image_size, cfg.image_size]
    at = {name: i for i, name in enumerate(PARAMS)}

    @pipeline_def(enable_conditionals=True)
    def augment_pipeline():
        outs = fn.external_source(
            source=source, num_outputs=5 if with_gains else 4, batch=True, parallel=True, batch_info=True,
            # batches the workers compute ahead: one per worker, or some of them sit idle
            prefetch_queue_depth=max(2, cfg.num_workers),
            layout=["", "", "", "", "HWC"][: 5 if with_gains else 4],
        )
        jpg, params, taps, records = outs[:4]
        img = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.GRAY)
        # crop + flips + resize in one op: a reversed ROI axis is a flip (DALI resize semantics)
        img = fn.resize(img, size=size, roi_start=params[at["roi_y0"] : at["roi_x0"] + 1],
                        roi_end=params[at["roi_y1"] : at["roi_x1"] + 1])
        if params[at["do_blur"]] > 0:
            # the worker's separable Gaussian, a row then a column filter; float between the passes, so the
            # image is rounded to gray levels once, as by a 2-D filter
            img = fn.filter(img, fn.reshape(taps, shape=[1, -1]), border="reflect_101", dtype=types.FLOAT)
            img = fn.filter(img, fn.reshape(taps, shape=[-1, 1]), border="reflect_101")
            img = fn.cast(img, dtype=types.UINT8)  # rounds and saturates at 0 and 255
        if with_gains:
            gain = outs[4].gpu() if gpu else outs[4]
            if params[at["do_speckle"]] > 0:
                img = fn.cast(img * gain, dtype=types.UINT8)
        return img, records

    return augment_pipeline(
        batch_size=batch_size,
        num_threads=max(1, cfg.dali_threads),
        device_id=device_id,
        py_num_workers=max(1, cfg.num_workers),
        py_start_method=start_method,
        prefetch_queue_depth=max(1, cfg.prefetch),
    )
