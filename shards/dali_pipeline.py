"""The DALI pipeline: encoded bytes from parallel Python workers → decode → crop/flip → blur → speckle →
contrast + normalisation, on the GPU (``decoders.image(device="mixed")``) or on DALI's CPU backend (same
code, ``device_id=None``).

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
resolution); speckle, contrast and normalisation are one fused arithmetic expression.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from usjepa.shards.corruptions import blur_params
from usjepa.shards.augment import DataConfig, MaskDecoder, PreparedBatch, mask_seed, prepare_batch
from usjepa.shards.readers import SampleReader

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

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_plans"], d["_masks"] = {}, None
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
        ids, epoch, positions = self._plan(info.epoch_idx)
        t = info.iteration
        if t >= len(ids):
            raise StopIteration
        if self._masks is None:
            self._masks = MaskDecoder(self.cfg.mask_cache)
        seed = mask_seed(self.seed, epoch, int(positions[t]), self.train)
        pb = prepare_batch(ids[t], self.reader, self._masks, self.cfg, self.mask_cfg, self.seed, epoch, seed, self.train)
        return batch_to_dali(pb, self.cfg)


def _single_threaded_kernels() -> None:
    # Loader workers are already one process per core; numba's prange inside each would oversubscribe.
    try:
        import numba

        numba.set_num_threads(1)
    except Exception:  # numba absent or its threading layer refuses: the kernel still runs
        pass


def batch_to_dali(pb: PreparedBatch, cfg: DataConfig) -> tuple[list[np.ndarray], ...]:
    """Per-sample arrays in the order ``build_pipeline`` declares them."""
    jpg, rs, re_, bs, bk, db, fld, ds, sc, bi = ([] for _ in range(10))
    empty_field = np.zeros((1, 1, 1), np.float32)
    for b, p in zip(pb.jpegs, pb.params):
        jpg.append(np.frombuffer(b, np.uint8))
        s, e = p.roi()
        rs.append(s)
        re_.append(e)
        bp = blur_params(p.blur_eps)
        bs.append(np.array(max(bp.sigma, 1e-3), np.float32))
        bk.append(np.array(bp.ksize, np.int32))
        db.append(np.array(bp.ksize > 1))
        f = p.speckle_field
        fld.append(empty_field if f is None else f[:, :, None])
        ds.append(np.array(f is not None))
        scale, bias = p.affine(cfg)
        sc.append(np.array(scale, np.float32))
        bi.append(np.array(bias, np.float32))
    n = len(pb.jpegs)
    valid = [pb.valid[i].astype(np.uint8) for i in range(n)]
    ctx = [pb.ctx_idx[i] for i in range(n)]
    tgt = [np.ascontiguousarray(pb.tgt_idx[:, i]) for i in range(n)]
    sid = [np.array(x, np.int64) for x in pb.ids]
    rep = [np.array(bool(x)) for x in pb.replaced]
    return jpg, rs, re_, bs, bk, db, fld, ds, sc, bi, valid, ctx, tgt, sid, rep


def build_pipeline(source: DaliBatchSource, batch_size: int, cfg: DataConfig, device_id: int | None,
                   start_method: str = "fork"):
    """The DALI pipeline (not yet built). ``device_id=None`` runs everything on DALI's CPU backend."""
    from nvidia.dali import fn, pipeline_def, types
    import nvidia.dali.math as dmath

    gpu = device_id is not None
    size = [cfg.image_size, cfg.image_size]

    @pipeline_def(enable_conditionals=True)
    def augment_pipeline():
        (jpg, roi_start, roi_end, blur_sigma, blur_ksize, do_blur, field, do_speckle, scale, bias,
         valid, ctx, tgt, sid, replaced) = fn.external_source(
            source=source, num_outputs=15, batch=True, parallel=True, batch_info=True,
            # batches the workers compute ahead: at least one per worker, or some of them sit idle
            prefetch_queue_depth=max(2, cfg.num_workers, cfg.prefetch),
            layout=["", "", "", "", "", "", "HWC", "", "", "", "", "", "", "", ""],
        )
        img = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.GRAY)
        # crop + flips + resize in one op: a reversed ROI axis is a flip (DALI resize semantics)
        # uint8 through resize and blur (cheaper than float on DALI's CPU kernels); arithmetic promotes below
        img = fn.resize(img, size=size, roi_start=roi_start, roi_end=roi_end)
        if do_blur:
            img = fn.gaussian_blur(img, sigma=blur_sigma, window_size=blur_ksize)
        if gpu:
            field, scale, bias = field.gpu(), scale.gpu(), bias.gpu()
        # speckle, contrast and normalisation: one fused arithmetic expression per branch
        if do_speckle:
            out = dmath.clamp(img * (field + 1.0), 0.0, 255.0) * scale + bias
        else:
            out = img * scale + bias
        return out, valid, ctx, tgt, sid, replaced

    return augment_pipeline(
        batch_size=batch_size,
        num_threads=max(1, cfg.num_workers),
        device_id=device_id,
        py_num_workers=max(1, cfg.num_workers),
        py_start_method=start_method,
        prefetch_queue_depth=max(1, cfg.prefetch),
    )
