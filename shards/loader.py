"""``build_loader``: shards in, ``Batch``es on the training device out (contract: docs/architecture.md).

A loader owns a ``SampleTable`` (what is readable), an ``EpochSampler`` (Eq. 6 plan, this rank's slice,
the resumable state) and a backend that renders batches: ``"dali"`` (parallel external_source → DALI,
GPU decode with a CUDA device, DALI's CPU backend without) or ``"torch"`` (DataLoader + OpenCV; also the
fallback when DALI is missing). Both backends use the same worker code (``augment.prepare_batch``), so they
produce the same samples, augmentation parameters, validity grids and block masks.

The state advances when a batch is handed to the caller, so ``state_dict()`` taken between steps resumes
at the next unseen batch; ``len(loader)`` is the number of batches left in the current epoch (the whole
epoch after ``set_epoch``), identical on every rank.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from usjepa.shards.augment import DataConfig
from usjepa.shards.device_speckle import apply_gain_u8, speckle_gain
from usjepa.shards.readers import (
    MAX_UNREADABLE_FRACTION,
    MAX_UNREADABLE_IN_A_ROW,
    UNREADABLE_ALLOWANCE,
    ReadErrorBudget,
    SampleTable,
    open_sample_table,
)
from usjepa.shards.remote import DEFAULT_CACHE_LIMIT_GB
from usjepa.shards.sampler import EpochSampler
from usjepa.shards.transfer import to_device
from usjepa.shards.worker_guard import (
    LoaderWorkerError,
    WorkerDied,
    children_die_with_me,
    dataloader_workers,
    dead_workers,
    detach_from_sigchld,
    exited,
    make_plan_dir,
    run_watchdog,
    spawn_without_main,
    stop_dataloader,
)

log = logging.getLogger(__name__)

BACKENDS = ("dali", "torch")
MAX_WORKER_RESTARTS = 3  # per pass: a worker that keeps dying (e.g. every batch OOMs) stops the run instead


@dataclass
class Batch:
    images: torch.Tensor  # float32 [B, 1, S, S], (x/255 - mean) / std
    valid: torch.Tensor  # bool [B, G, G]
    ctx_idx: torch.Tensor  # int64 [B, Kc]: each image's context, then PAD (-1) up to the batch's longest
    tgt_idx: torch.Tensor  # int64 [T, B, Kt]: the same for each target block
    keys: list[str]
    sample_ids: torch.Tensor = field(default=None)  # int64 [B] rows of the sample table (-1: placeholder)
    replaced: torch.Tensor = field(default=None)  # bool [B] planned sample was unreadable and was replaced
    # host (numpy) copies of ctx_len [B] and tgt_len [T, B], counted before the device copy: the packed step
    # plans its layout from them without a device-to-host sync (usjepa.models.salt.plan_salt_packing)
    lengths: tuple = field(default=None)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def ctx_len(self) -> torch.Tensor:
        """int64 [B]: real context patches per image (``ctx_idx >= 0``)."""
        return (self.ctx_idx >= 0).sum(-1)

    @property
    def tgt_len(self) -> torch.Tensor:
        """int64 [T, B]: real patches per target block and image."""
        return (self.tgt_idx >= 0).sum(-1)


class _DaliBackend:
    """Owns one DALI pipeline and its worker processes, started at construction: the trainer builds its loaders
    before it initialises CUDA, so the workers are forked (milliseconds) instead of spawned (``dali_pipeline``).
    The pipeline serves pass after pass; it is only rebuilt when a worker died or DALI failed, then by spawn
    once CUDA is up."""

    def __init__(self, table: SampleTable, cfg: DataConfig, mask_cfg, seed: int, train: bool, batch_size: int,
                 device: torch.device, val_from_train: float = 0.0):
        from usjepa.shards.dali_pipeline import DaliBatchSource, warm_kernels

        self.cfg, self.batch_size, self.device = cfg, batch_size, device
        self.plan_dir = make_plan_dir()
        # removed at close() or, for a loader never closed, when it is collected or the interpreter exits
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.plan_dir, True)
        remote = {"cache_dir": table.cache_dir, "cache_limit_gb": table.cache_limit_gb} if table.remote else {}
        self.source = DaliBatchSource(table.source, table.split, val_from_train, self.plan_dir, cfg, mask_cfg, seed,
                                      train, reader=table.reader_view(), **remote)
        self.device_id = None
        if device.type == "cuda":  # torch.cuda.current_device() would initialise CUDA before the workers fork
            self.device_id = device.index if device.index is not None else (
                torch.cuda.current_device() if torch.cuda.is_initialized() else 0)
        warm_kernels(mask_cfg)
        self._pipe = None
        self._pipe = self._new_pipeline()  # the workers start now, before the trainer initialises CUDA

    def _new_pipeline(self):
        from usjepa.shards.dali_pipeline import build_pipeline, worker_start_method

        self.close_pipeline()
        method = worker_start_method()
        if method == "spawn":
            log.info("CUDA is initialised in this process: spawning %d DALI workers", self.cfg.num_workers)
        pipe = build_pipeline(self.source, self.batch_size, self.cfg, self.device_id, method)
        with children_die_with_me(), spawn_without_main():
            pipe.start_py_workers()
        self._k = 0
        self._open = False  # pass self._k was started and not run to its end
        return pipe

    def _run(self, watchdog):
        with watchdog.guard(self._pipe):
            if self.device_id is None:
                return self._pipe.run()
            # outputs ordered on the training stream: the host does not wait for the GPU's work
            return self._pipe.run(torch.cuda.current_stream(self.device))

    def _end_pass(self, watchdog, early: bool) -> None:
        """Ends pass k so that the pipeline can start pass k + 1: the workers stop at the planned length, or
        at the stop file for a pass left mid-way, whose batches already on their way are dropped (at most the
        prefetched ones); DALI then needs a reset."""
        from usjepa.shards.dali_pipeline import stop_path

        if early:
            stop_path(self.plan_dir, self._k).touch()
        extra = 0
        try:
            while True:
                with watchdog.guard(self._pipe):
                    self._pipe.run()
                extra += 1
        except StopIteration:
            pass
        if extra and not early:
            raise RuntimeError("DALI pipeline produced more batches than planned")
        self._pipe.reset()
        self._k += 1
        self._open = False

    def iter_pass(self, ids: np.ndarray, epoch: int, positions: np.ndarray) -> Iterator[dict]:
        from usjepa.shards.dali_pipeline import write_pass

        t, restarts, watchdog = 0, 0, run_watchdog()
        while True:
            if self._pipe is not None and self._open:  # the previous pass was left mid-way (a loop broke off)
                self._end_pass_or_drop(watchdog, early=True)
            if self._pipe is None:
                self._pipe = self._new_pipeline()
            write_pass(self.plan_dir, self._k, ids[t:], epoch, positions[t:])
            self._open = True
            # no local reference to the pipeline: a pass abandoned mid-way (max_steps) must not keep it alive
            # in this suspended generator after close(), to be torn down during interpreter shutdown
            try:
                while t < len(ids):
                    outs = self._run(watchdog)
                    t += 1
                    yield self._to_torch(outs)
            except RuntimeError as e:
                dead = e.dead if isinstance(e, WorkerDied) else dead_workers(self._pipe)
                if dead:
                    # A dead worker (OOM kill, crash): a fresh pipeline renders the same batch t and the rest of
                    # the pass from the same plan, so the batches, and an exact resume, are unchanged.
                    self.close_pipeline()
                    restarts += 1
                    if restarts > MAX_WORKER_RESTARTS:
                        raise LoaderWorkerError(f"DALI {WorkerDied(dead)}; gave up after {MAX_WORKER_RESTARTS} "
                                                f"pipeline restarts in this pass") from None
                    log.warning("DALI %s; restarting the pipeline at batch %d of the pass (restart %d of %d)",
                                WorkerDied(dead), t, restarts, MAX_WORKER_RESTARTS)
                    continue
                # DALI stops on a JPEG its decoder rejects (one that passed the workers' marker checks). Render
                # this batch with OpenCV in this process instead — same parameters, so the same batch, with the
                # bad sample replaced — and restart the pipeline on the rest of the pass.
                log.warning("DALI failed on batch %d of the pass (%s); rendering it with OpenCV and restarting "
                            "the pipeline", t, str(e).splitlines()[-1][:200] if str(e) else type(e).__name__)
                self.close_pipeline()
                yield self._render_with_opencv(ids[t], epoch, int(positions[t]))
                t += 1
                if t == len(ids):
                    return
                continue
            break
        self._end_pass_or_drop(watchdog, early=False)

    def _end_pass_or_drop(self, watchdog, early: bool) -> None:
        try:
            self._end_pass(watchdog, early)
        except WorkerDied:  # died while the pass was being ended: the next pass starts on a fresh pipeline
            self.close_pipeline()

    def _render_with_opencv(self, ids: np.ndarray, epoch: int, position: int) -> dict:
        from usjepa.shards.augment import MaskDecoder, mask_seed, prepare_batch
        from usjepa.shards.baseline import render_batch

        src = self.source
        pb = prepare_batch(ids, src.reader, MaskDecoder(16), self.cfg, src.mask_cfg, src.seed, epoch,
                           mask_seed(src.seed, epoch, position, src.train), src.train)
        raw = render_batch(pb, self.cfg)
        raw["image"] = raw["image"].to(self.device)
        return raw

    def _to_torch(self, outs) -> dict:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        n, s = self.batch_size, self.cfg.image_size
        cuda = self.device_id is not None
        # one copy out of DALI's buffers, which the next run() reuses
        images = torch.empty((n, s, s, 1), dtype=torch.uint8, device=self.device)
        feed_ndarray(outs[0].as_tensor(), images, cuda_stream=torch.cuda.current_stream(self.device) if cuda else None)
        records = outs[1].as_tensor()
        # the records into one pinned buffer per batch (never reused while its copy may still be in flight),
        # then to the device in one non_blocking copy; the fields are views of it on either side
        host = torch.empty(records.shape(), dtype=torch.uint8, pin_memory=cuda)
        feed_ndarray(records, host)
        return {"image": images.view(n, 1, s, s),  # HWC with one channel has CHW's memory layout
                **records_to_torch(host, self.device, self.cfg.grid)}

    def close_pipeline(self):
        if self._pipe is not None:
            pipe, self._pipe = self._pipe, None
            del pipe
        self._open = False

    def close(self):
        self.close_pipeline()
        self._cleanup()


def records_to_torch(host: torch.Tensor, device: torch.device, grid: int) -> dict:
    """uint8 [B, record size] (``dali_pipeline.record_dtype``, in pinned memory on CUDA) → the batch's non-pixel
    tensors: what the step needs on ``device`` (one copy of the whole buffer), what the loader reads on the host."""
    from usjepa.shards.dali_pipeline import batch_record_dtype

    dt = batch_record_dtype(host.numpy(), grid)
    rec = host.numpy().view(dt).reshape(-1)
    dev = host.to(device, non_blocking=True) if device.type == "cuda" else host
    n = dev.shape[0]

    def field(name: str, dtype: torch.dtype) -> torch.Tensor:  # [B, field bytes] viewed as its dtype, in place
        sub, off = dt.fields[name][:2]
        return dev[:, off:off + sub.itemsize].view(dtype)

    return {
        "valid": field("valid", torch.bool).reshape(n, grid, grid),
        "ctx": field("ctx", torch.int64).contiguous(),
        "tgt": field("tgt", torch.int64).reshape(n, *dt["tgt"].shape).permute(1, 0, 2).contiguous(),
        "scale": field("scale", torch.float32).reshape(n),
        "bias": field("bias", torch.float32).reshape(n),
        "sid": torch.from_numpy(rec["sid"].copy()),
        "replaced": torch.from_numpy(rec["replaced"].astype(bool)),
        "speckle_eps": torch.from_numpy(rec["speckle_eps"].copy()),
        "speckle_seed": torch.from_numpy(rec["speckle_seed"].copy()),
    }


class _TorchBackend:
    def __init__(self, table: SampleTable, cfg: DataConfig, mask_cfg, seed: int, train: bool, batch_size: int,
                 device: torch.device):
        self.reader = table.reader_view()
        self.cfg, self.mask_cfg, self.seed, self.train, self.device = cfg, mask_cfg, seed, train, device
        self._batches = None  # the live DataLoader iterator of the current pass

    def _start(self, ids: np.ndarray, epoch: int, positions: np.ndarray):
        from usjepa.shards.baseline import BatchDataset, make_dataloader

        ds = BatchDataset(self.reader, ids, positions, epoch, self.cfg, self.mask_cfg, self.seed, self.train)
        self._batches = iter(make_dataloader(ds, self.cfg, pin_memory=self.device.type == "cuda"))
        detach_from_sigchld(self._batches)
        return self._batches

    def iter_pass(self, ids: np.ndarray, epoch: int, positions: np.ndarray) -> Iterator[dict]:
        t, restarts = 0, 0
        while t < len(ids):
            # Batch t is a pure function of (ids[t], epoch, positions[t]): workers started on the rest of the plan
            # render the same batches, so a restart keeps the run, and an exact resume, unchanged.
            batches = self._start(ids[t:], epoch, positions[t:])
            workers = dataloader_workers(batches)
            try:
                while t < len(ids):
                    dead = exited(workers)
                    if dead:
                        raise WorkerDied(dead)
                    raw = next(batches)
                    if "jpeg" in raw:  # decode_on="device"
                        from usjepa.shards.gpu_decode import render_on_device

                        raw = render_on_device(raw, self.cfg, self.device)
                    t += 1
                    yield raw
            except (RuntimeError, OSError, EOFError) as e:
                # WorkerDied; the DataLoader's "worker (pid(s) N) exited unexpectedly"; or a batch the worker had
                # queued whose shared-memory handle died with it (ConnectionResetError / EOFError on unpickling)
                dead = e.dead if isinstance(e, WorkerDied) else exited(workers, wait_s=2.0)
                if not dead:
                    raise
                restarts += 1
                if restarts > MAX_WORKER_RESTARTS:
                    raise LoaderWorkerError(f"DataLoader {WorkerDied(dead)}; gave up after {MAX_WORKER_RESTARTS} "
                                            f"restarts in this pass") from None
                log.warning("DataLoader %s; restarting the workers at batch %d of the pass (restart %d of %d)",
                            WorkerDied(dead), t, restarts, MAX_WORKER_RESTARTS)
            finally:
                stop_dataloader(batches)
                self._batches = None

    def close(self):
        if self._batches is not None:
            stop_dataloader(self._batches)
            self._batches = None


class ShardLoader:
    """Iterable of ``Batch`` over one split; see the module docstring."""

    def __init__(self, table: SampleTable, sampler: EpochSampler, backend: str, cfg: DataConfig, mask_cfg,
                 device: torch.device, seed: int, train: bool, val_from_train: float = 0.0):
        self.table, self.sampler, self.cfg, self.mask_cfg = table, sampler, cfg, mask_cfg
        self.device, self.seed, self.train = device, seed, train
        self.backend_name = backend
        if backend == "dali":
            self._backend = _DaliBackend(table, cfg, mask_cfg, seed, train, sampler.batch_size, device, val_from_train)
        else:
            self._backend = _TorchBackend(table, cfg, mask_cfg, seed, train, sampler.batch_size, device)
        self.read_errors = 0  # samples replaced at read time on this rank (see ``skipped``)
        self._read_budget = ReadErrorBudget()  # stops the run past too many unreadable samples
        self._speckle_gen: torch.Generator | None = None  # re-seeded per batch (device speckle)
        self._warned = False

    # ------------------------------------------------------------------------------- contract
    def __len__(self) -> int:
        return self.sampler.remaining_batches()

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch()

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(dict(d))

    @property
    def skipped(self) -> Counter:
        """Samples left out at load time (by reason, identical on every rank) plus this rank's read-time
        replacements under ``"unreadable"``."""
        c = Counter(self.table.skipped)
        if self.read_errors:
            c["unreadable"] += self.read_errors
        return c

    # ------------------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Batch]:
        sp = self.sampler
        ids = sp.pass_ids()
        epoch = sp.state.epoch
        start = sp.state.consumed
        # position in the epoch order of each batch's first sample (seeds the batch's block masks)
        positions = start + np.arange(len(ids), dtype=np.int64) * sp.global_batch + sp.rank * sp.batch_size
        for raw in self._backend.iter_pass(ids, epoch, positions):
            batch = self._to_batch(raw)
            sp.advance(1)  # counted when handed out: a state saved after this batch resumes at the next one
            yield batch

    def _to_batch(self, raw: dict) -> Batch:
        replaced = raw["replaced"]
        n_bad = int(replaced.sum())
        self.read_errors += n_bad
        if n_bad and not self._warned:  # the causes are warned where the reads failed, once per kind
            self._warned = True
            log.warning("unreadable samples are replaced by others of their batch (%d so far on this rank); the "
                        "run stops if more than %d + %.0f %% of reads or %d in a row fail", self.read_errors,
                        UNREADABLE_ALLOWANCE, 100 * MAX_UNREADABLE_FRACTION, MAX_UNREADABLE_IN_A_ROW)
        self._read_budget.count(replaced.numpy())
        sid = raw["sid"]
        keys = [self.table.key(i) if i >= 0 else "" for i in sid.tolist()]
        dev = self.device
        gain = None
        eps = raw["speckle_eps"].numpy()
        if eps.any():  # speckle_on="device": drawn here, on the device (device_speckle.py)
            if self._speckle_gen is None:
                self._speckle_gen = torch.Generator(dev)
            gain = speckle_gain(eps, raw["speckle_seed"].numpy(), raw["image"].shape[-2:], dev, self._speckle_gen)
        return Batch(
            images=normalise(to_device(raw["image"], dev), to_device(raw["scale"], dev), to_device(raw["bias"], dev),
                             gain),
            valid=to_device(raw["valid"], dev),
            ctx_idx=to_device(raw["ctx"], dev),
            tgt_idx=to_device(raw["tgt"], dev),
            keys=keys,
            lengths=((raw["ctx"] >= 0).sum(-1).numpy(), (raw["tgt"] >= 0).sum(-1).numpy()),
            sample_ids=sid,
            replaced=replaced,
        )

    def close(self) -> None:
        self._backend.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def normalise(images: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
              gain: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B, 1, S, S] → float32 ``x·scale + bias`` per sample: contrast and (x/255 - mean)/std in one op,
    after the device speckle ``gain`` (rounded and saturated to gray levels as in the pipelines) when given."""
    x = images.float()  # one allocation
    if gain is not None:
        apply_gain_u8(x, gain)
    return x.mul_(scale.view(-1, 1, 1, 1)).add_(bias.view(-1, 1, 1, 1))


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def build_loader(
    root,
    split: str,
    batch_size: int,
    data_cfg: DataConfig | Mapping[str, Any] | None = None,
    mask_cfg=None,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    seed: int = 0,
    backend: str = "dali",
    val_from_train: float = 0.0,
    cache_dir: str | None = None,
    cache_limit_gb: float = DEFAULT_CACHE_LIMIT_GB,
) -> ShardLoader:
    """Loader over ``split`` of the corpus at ``root`` (contract in docs/architecture.md).

    Training (``split="train"``): Eq. 6 with ``data_cfg.cap``, fresh shuffle per epoch, random augmentation,
    tail dropped. Any other split: every sample in id order, padded to whole global batches, full-frame
    resize without random augmentation, block masks from a fixed seed. ``val_from_train`` > 0: the "val" split
    is that slice of the training split's groups instead, and "train" is the rest (``shards.holdout``).
    ``root`` may be an fsspec URL (``s3://``, ``gs://``, ``https://``): ``cache_dir`` holds its mirrored indexes
    and up to ``cache_limit_gb`` of whole shards (``shards.remote``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    cfg = data_cfg if isinstance(data_cfg, DataConfig) else DataConfig.from_dict(data_cfg)
    if mask_cfg is None or isinstance(mask_cfg, Mapping):
        from usjepa.kernels.block_masks import MaskConfig

        mask_cfg = MaskConfig.from_dict(mask_cfg) if mask_cfg else MaskConfig()
    if mask_cfg.grid != cfg.grid:
        raise ValueError(f"mask grid {mask_cfg.grid} != image_size/patch_size = {cfg.grid}")
    device = torch.device(device)
    if backend == "dali" and not dali_available():
        warnings.warn("NVIDIA DALI is not importable: falling back to the PyTorch DataLoader + OpenCV backend")
        backend = "torch"
    cfg = cfg.for_device(device.type, backend)
    if backend == "torch" and cfg.decode_on == "device":
        from usjepa.shards.gpu_decode import available

        if device.type != "cuda" or not available():
            warnings.warn("decode_on='device' needs a CUDA device and torchvision (nvJPEG, roi_align): decoding "
                          "in the CPU workers instead")
            cfg = dataclasses.replace(cfg, decode_on="worker")
    train = split == "train"
    table = open_sample_table(root, split, val_from_train, cache_dir=cache_dir, cache_limit_gb=cache_limit_gb)
    sampler = EpochSampler(
        table.dataset_sizes, batch_size, rank, world_size, seed,
        cap=cfg.cap if train else None, shuffle=train, drop_last=train,
    )
    return ShardLoader(table, sampler, backend, cfg, mask_cfg, device, seed, train, val_from_train)
