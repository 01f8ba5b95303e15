"""US-JEPA training loop (stage 1: MAE teacher; stage 2: SALT student). Read it top to bottom.

    usjepa-train configs/usjepa_vitb16.yaml --out runs/vitb16                     # one process
    torchrun --nproc_per_node=8 -m usjepa.train configs/usjepa_vitb16.yaml --out runs/vitb16
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        -m usjepa.train configs/usjepa_vitb16.yaml --out runs/vitb16 --resume auto
    usjepa-train configs/tiny_cpu.yaml --set optim.epochs=2 --set data.root=shards/   # overrides

Stage 2 (paper §3.2, Eq. 5): a frozen teacher encodes the whole image; the student encodes the context
patches; the predictor predicts the teacher's patch tokens (after its final norm) at each of the T target
blocks; Smooth L1 averaged over the blocks. Gradients reach only student and predictor (DDP wraps those
two; the teacher runs under no_grad in eval mode). Stage 1 trains an encoder by masked pixel
reconstruction and its checkpoint serves as the stage-2 teacher (``model.teacher: <run>/checkpoints/best.pt``).

Outputs in ``--out``: ``checkpoints/step_*.pt`` (last K) and ``best.pt`` (lowest validation loss),
``metrics.jsonl``, ``train.log``, ``tb/`` (when tensorboard is installed), ``export/encoder_{last,best}.safetensors``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import resource
import shlex
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from usjepa.checkpoint import (
    CheckpointError,
    capture_rng,
    check_resume_compatible,
    latest_checkpoint,
    restore_rng,
    save_checkpoint,
)
from usjepa.config import Config, ConfigError, load_config, lr_multiplier, schedule_epochs
from usjepa.data_wait import DataWaitTimer
from usjepa.exit_codes import EXIT_STATUS_HELP, FAILED, USAGE
from usjepa.models import (
    CheckpointFormatError,
    DecoderConfig,
    MAEDecoder,
    MAEModel,
    Predictor,
    PredictorConfig,
    SALTModel,
    build_vit,
    export_encoder_safetensors,
    file_sha256,
    freeze,
    load_encoder,
    mae_loss,
    mae_step_flops,
    salt_forward,
    stage1_masks,
)
from usjepa.monitor import CollapseMonitor, salt_flops
from usjepa.resume import resume_point
from usjepa.run_dir import FILE_ONLY, OutDirLocked, lock_out_dir, setup_logging, take_out_dir
from usjepa.schedules import epoch_progress, lr_at, set_optimizer_hparams, wd_at
from usjepa.shards.format import ShardFormatError
from usjepa.shards.transfer import to_device
from usjepa.shards.worker_guard import LoaderWorkerError, die_with_parent
from usjepa.step import (backward_and_update, batch_size_from_memory, build_optimizer, compile_models,
                         salt_packing)

log = logging.getLogger("usjepa.train")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the run stops and keeps its last good checkpoint."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="usjepa-train", description=__doc__.split("\n\n")[0], epilog=EXIT_STATUS_HELP)
    p.add_argument("config", help="YAML config (configs/usjepa_vitb16.yaml, configs/tiny_cpu.yaml)")
    p.add_argument("--out", help="output folder (overrides out_dir)")
    p.add_argument("--resume", help="'auto' (latest checkpoint in --out, or a fresh start if none) or a path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--allow-changed", action="append", default=[], metavar="KEY",
                   help="on --resume, accept a changed value of KEY (or of any key under it, e.g. optim)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Console entry: known failures print one line on stderr and exit with status 2 (usage, config, input) or
    1 (a loader worker that could not be replaced)."""
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        return train(argv)
    except (ConfigError, CheckpointError, CheckpointFormatError, NonFiniteLossError, FileNotFoundError,
            ShardFormatError, LoaderWorkerError, OutDirLocked) as e:
        status = FAILED if isinstance(e, LoaderWorkerError) else USAGE
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        if isinstance(e, LoaderWorkerError):
            message += "; the run stopped, its last checkpoint is kept: rerun the same command with --resume auto"
        log.error("%s: %s", type(e).__name__, message, extra=FILE_ONLY)
        print(f"usjepa-train: error: {message}", file=sys.stderr, flush=True)
        return status
    except RuntimeError as e:  # gloo/NCCL: "Timed out waiting ... for recv operation" and the like
        if not (dist.is_available() and dist.is_initialized() and "timed out" in str(e).lower()):
            raise
        message = (f"rank {dist.get_rank()}: another rank did not answer within train.collective_timeout_s (it "
                   f"stopped, hung or died); stopping. Its last checkpoint is kept: rerun with --resume auto")
        log.error("%s (%s)", message, str(e).splitlines()[0][:200], extra=FILE_ONLY)
        print(f"usjepa-train: error: {message}", file=sys.stderr, flush=True)
        return FAILED


def train(argv=None) -> int:
    """One run. Rank 0 holds ``--out``'s lock (``usjepa.run_dir``) from its first write there until the run
    ends, however it ends."""
    with contextlib.ExitStack() as held:
        return _train(argv, held)


def _train(argv, held: contextlib.ExitStack) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    if args.out:
        cfg.out_dir = args.out
    out_dir = Path(cfg.out_dir)

    # ---------------------------------------------------------------- processes, devices, logging
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun rank, in a session of its own: a SIGKILLed torchrun
        die_with_parent(os.getppid())          # would leave it training on, so the kernel kills it with its agent
    # device_count() asks NVML and leaves CUDA uninitialised (is_available() would not), so that the loaders
    # below can fork their workers; CUDA starts after them.
    cuda = torch.cuda.device_count() > 0
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    master = rank == 0
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    setup_logging(None, master)  # train.log is opened once the run is accepted (take_out_dir)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (cuda and cfg.train.bf16) else contextlib.nullcontext()
    log.info("stage %d, world size %d, device %s, config %s", cfg.stage, world, device, args.config)

    # ---------------------------------------------------------------- resume decision (before any write)
    resume_group = None
    if world > 1:
        # a rank that stops (dead loader, NaN, crash) must not leave the others waiting NCCL's 10 minutes. No
        # device_id: NCCL then starts CUDA at its first collective, after the loaders below forked their
        # workers; the resume decision goes through a gloo group, which needs no CUDA.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=cfg.train.collective_timeout_s))
        resume_group = dist.new_group(backend="gloo") if cuda else None
    locked = master and out_dir.is_dir() and lock_out_dir(out_dir, held)  # before reading its checkpoints
    # every rank resumes from the same file: the newest that reads back on any node ('auto'), its bytes sent to
    # ranks whose node lacks it (--out need not be shared), or all stop together
    resumed = resume_point(args.resume, out_dir, rank, world, resume_group)
    resume_path, ckpt = resumed.path, resumed.state
    if cfg.train.batch_from_memory and cfg.stage == 2:  # measured on this GPU, or the resumed run's own
        cfg.data.batch_size = ckpt["config"]["data"]["batch_size"] if ckpt else batch_size_from_memory(cfg, device)
    if ckpt is not None:
        check_resume_compatible(ckpt["config"], cfg.to_dict(), resume_path, allow_changed=args.allow_changed)

    # a CPU's peak is measured before the loader workers start, which would slow it (a GPU's: below)
    peak_flops, peak_source = (None, "") if cuda else peak_flops_per_device(cfg, device)

    # ---------------------------------------------------------------- data (workers start here), then CUDA
    train_loader = make_loader(cfg, "train", rank, world, device)
    val_loader = make_val_loader(cfg, rank, world, device)
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        peak_flops, peak_source = peak_flops_per_device(cfg, device)  # the datasheet's, by the GPU's name
    steps_per_epoch = train_loader.batches_per_epoch
    if steps_per_epoch == 0:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} per rank x {world} ranks is more than the "
                          f"{train_loader.sampler.epoch_samples()} training samples of an epoch in {cfg.data.root}")
    total_steps = cfg.optim.epochs * steps_per_epoch
    global_batch, epoch_samples = cfg.data.batch_size * world, train_loader.sampler.epoch_samples()
    log.info("%d train batches per epoch per rank, %s val batches, %d steps in %d epochs%s", steps_per_epoch,
             len(val_loader) if val_loader is not None else "no", total_steps, cfg.optim.epochs,
             f"; train.max_steps stops the run at step {cfg.train.max_steps}"
             if cfg.train.max_steps is not None and cfg.train.max_steps < total_steps else "")

    # ---------------------------------------------------------------- models (identical init on every rank)
    torch.manual_seed(cfg.seed)
    teacher, teacher_sha = None, None
    if cfg.stage == 2:
        teacher_sha = file_sha256(cfg.model.teacher)  # the teacher's identity, in checkpoints and exports
        teacher = freeze(load_encoder(cfg.model.teacher, cfg.model.teacher_arch)).to(device)
        student = build_vit(cfg.model.arch)
        predictor = Predictor(PredictorConfig(**cfg.model.predictor), student.embed_dim, teacher.embed_dim,
                              student.cfg.num_patches)
        model = SALTModel(student, predictor)
        encoder, head = model.student, model.predictor
    else:
        encoder = build_vit(cfg.model.arch)
        head = MAEDecoder(DecoderConfig(**cfg.model.decoder), encoder.embed_dim, encoder.cfg.num_patches,
                          encoder.cfg.patch_size**2)
        model = MAEModel(encoder, head)
    model.to(device)
    log.info("trainable parameters: encoder %.1fM, %s %.1fM%s", n_params(encoder) / 1e6, type(head).__name__,
             n_params(head) / 1e6, f", frozen teacher {n_params(teacher) / 1e6:.1f}M" if teacher else "")

    optimizer = build_optimizer(model, cfg.optim, cuda)

    # ---------------------------------------------------------------- restore
    step, epoch, best_val, mid_epoch, no_batches_left = 0, 0, math.inf, False, False
    if ckpt is not None:
        check_same_teacher(ckpt, teacher_sha, resume_path)
        restore_training_state(ckpt, encoder, head, optimizer, train_loader, world, resume_path)
        step, best_val = int(ckpt["step"]), float(ckpt.get("best_val") or math.inf)
        mid_epoch = not ckpt.get("epoch_complete", False)
        epoch = int(ckpt["epoch"]) + (0 if mid_epoch else 1)
        # Saved after the epoch's last batch but before its end-of-epoch work (e.g. stopped by max_steps):
        # the sampler has moved on to the next epoch, and this one has no batches left.
        no_batches_left = mid_epoch and int(ckpt["sampler"]["epoch"]) > epoch
        restore_rng(ckpt["rng"])
        log.info("resumed from %s at step %d (epoch %d%s)", resume_path, step, epoch, ", mid-epoch" if mid_epoch else "")
        del ckpt

    # ---------------------------------------------------------------- the run is accepted: take --out
    if master:
        take_out_dir(out_dir, held, locked, step, mid_epoch, resumed.unreadable, resumed.handover)

    # ---------------------------------------------------------------- wrap: DDP over the trainable part, compile
    ddp_model = DDP(model, device_ids=[local_rank] if cuda else None) if world > 1 else model
    step_model, eval_model, teacher = compile_models(ddp_model, model, teacher, cfg.train.compile, cuda)

    def compute_loss(net, batch, mask_seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss, collapse statistics or None): stage 2 also returns the feature stds (usjepa.monitor)."""
        with autocast:
            if cfg.stage == 2:
                return salt_forward(net, teacher, batch.images, batch.ctx_idx, batch.tgt_idx, cfg.model.target_norm,
                                    cfg.model.loss, packing=salt_packing(batch, encoder.cfg.num_patches))
            keep, targets = stage1_masks(head.cfg, batch, encoder.cfg.num_patches,
                                         torch.Generator().manual_seed(mask_seed))
            keep = to_device(keep, device)  # pinned + non_blocking: the step never waits on the host
            return mae_loss(net(batch.images, keep), batch.images, keep, batch.valid, encoder.cfg.patch_size,
                            targets), None

    def step_flops(batch) -> tuple[float, float]:
        """Model FLOPs of this rank's step (real tokens only, and as if padded to the batch's widths)."""
        if cfg.stage == 2:
            return salt_flops(encoder.cfg, teacher_cfg(teacher), head, batch)
        flops = mae_step_flops(encoder.cfg, head, batch.images.shape[0])
        return flops, flops

    @torch.no_grad()
    def validate() -> float:
        eval_model.eval()
        val_loader.set_epoch(0)  # same samples and masks every time
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for i, batch in enumerate(val_loader):
            loss, _ = compute_loss(eval_model, batch, mask_seed=seed_of(cfg.seed, "val", i, rank))
            total += torch.tensor([loss.item() * batch.images.shape[0], batch.images.shape[0]],
                                  dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(total)
        model.train()
        return (total[0] / total[1]).item() if total[1] > 0 else math.nan

    # the step of rank 0's newest checkpoint, known on every rank (their --out may be node-local copies)
    saved_step = step if resume_path is not None and args.resume == "auto" else None

    def checkpoint(epoch_complete: bool, val_loss: float | None = None, is_best: bool = False) -> None:
        """Rank 0 writes; every rank first agrees that nothing non-finite happened since the last check."""
        nonlocal saved_step
        check_finite()
        saved_step = step
        if master:
            path = save_checkpoint({
                "stage": cfg.stage, "step": step, "epoch": epoch, "epoch_complete": epoch_complete,
                "world_size": world, "encoder": encoder.state_dict(), "encoder_arch": asdict_cfg(encoder),
                "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                "sampler": train_loader.state_dict(), "rng": capture_rng(),
                "best_val": best_val if math.isfinite(best_val) else None, "val_loss": val_loss,
                "config": cfg.to_dict(), "teacher_sha256": teacher_sha,
            }, out_dir, cfg.train.keep_last, is_best=is_best)
            log.info("saved %s%s", path, " (best)" if is_best else "")
        if world > 1:
            dist.barrier()

    nonfinite = torch.zeros((), device=device)  # set on device; read only at log/checkpoint time (no per-step sync)

    def check_finite() -> None:
        flag = nonfinite.clone()
        if world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            close_loaders(train_loader, val_loader)
            last = latest_checkpoint(out_dir)
            if last is None:
                advice = "no checkpoint was written yet: lower optim.lr_peak or check the data and start again"
            else:
                advice = ("check the data, or resume from it with half the peak learning rate: "
                          + resume_command(args, out_dir, last, world, lr_peak=cfg.optim.lr_peak / 2))
            raise NonFiniteLossError(f"non-finite loss or gradient norm before step {step}; stopping. "
                                     f"The last good checkpoint is {last if last else '(none)'}; {advice}")

    # ---------------------------------------------------------------- metrics
    metrics = MetricsWriter(out_dir, master, cfg.train.tensorboard)
    progress = make_progress(master and cfg.train.progress, total=min(total_steps, cfg.train.max_steps or total_steps),
                             initial=step)
    window = {"loss": torch.zeros((), device=device), "n": 0, "imgs": 0, "flops": 0.0, "flops_padded": 0.0,
              "t0": time.perf_counter(), "gnorm": torch.zeros((), device=device)}
    data_wait = DataWaitTimer(device)  # CUDA events, read at log time: no per-step device synchronisation
    collapse = CollapseMonitor(device)
    lr_mult = lr_multiplier(cfg, world)  # optim.lr_scale: linear in the global batch, or 1
    horizon = schedule_epochs(cfg)  # where the lr / wd cosines end
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    # ---------------------------------------------------------------- the loop
    model.train()
    stop = cfg.train.max_steps is not None and step >= cfg.train.max_steps
    while epoch < cfg.optim.epochs and not stop:
        if not mid_epoch:
            train_loader.set_epoch(epoch)
        seen = train_loader.state_dict()["consumed"]  # global samples of this epoch (any world size)
        batches = () if no_batches_left else train_loader
        mid_epoch = no_batches_left = False
        data_wait.step_done()
        for batch in batches:
            data_wait.batch_ready()
            progress_epochs = epoch_progress(epoch, seen, epoch_samples)
            seen += global_batch
            lr = lr_mult * lr_at(progress_epochs, horizon, cfg.optim.warmup_epochs, cfg.optim.lr_start,
                                 cfg.optim.lr_peak, cfg.optim.lr_final)
            wd = wd_at(progress_epochs, horizon, cfg.optim.wd_start, cfg.optim.wd_final)
            set_optimizer_hparams(optimizer, lr, wd)

            loss, stds = compute_loss(step_model, batch, mask_seed=seed_of(cfg.seed, "train", step, rank))
            collapse.observe(stds)
            gnorm = backward_and_update(loss, model, optimizer, cfg.optim.clip_grad, nonfinite)
            step += 1

            window["loss"] += loss.detach()
            window["gnorm"] += gnorm.detach()
            window["n"] += 1
            window["imgs"] += batch.images.shape[0]
            real_flops, padded_flops = step_flops(batch)
            window["flops"] += real_flops
            window["flops_padded"] += padded_flops
            progress.update(1)
            if step % cfg.train.log_every == 0:
                check_finite()
                if cuda:
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - window["t0"]
                mean_loss = window["loss"] / window["n"]
                if world > 1:  # the logged loss is the mean over all ranks, not rank 0's share
                    dist.all_reduce(mean_loss)  # (gloo has no AVG)
                    mean_loss /= world
                record = {
                    "kind": "train", "step": step, "epoch": epoch,
                    "loss": mean_loss.item(),
                    "grad_norm": (window["gnorm"] / window["n"]).item(),
                    "lr": lr, "wd": wd, "epoch_progress": progress_epochs,
                    "images_per_s_per_device": window["imgs"] / elapsed,
                    "data_wait_frac": data_wait.take() / elapsed,
                    "tflops_per_device": window["flops"] / elapsed / 1e12,
                    "mfu": mfu(window["flops"] / elapsed, peak_flops, peak_source),  # real tokens only
                    "mfu_padded": mfu(window["flops_padded"] / elapsed, peak_flops, peak_source),
                    "mfu_peak_source": peak_source,
                    "peak_mem_gb": peak_memory_gb(device),
                    **collapse.record(step),  # this rank's feature stds (stage 2)
                }
                metrics.write(record)
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                window.update(loss=torch.zeros((), device=device), gnorm=torch.zeros((), device=device), n=0,
                              imgs=0, flops=0.0, flops_padded=0.0, t0=time.perf_counter())
            if cfg.train.ckpt_every_steps and step % cfg.train.ckpt_every_steps == 0:
                t_pause = time.perf_counter()
                checkpoint(epoch_complete=False)
                window["t0"] += time.perf_counter() - t_pause  # step-time metrics exclude checkpoint writes
            if cfg.train.max_steps is not None and step >= cfg.train.max_steps:
                stop = True
                break
            data_wait.step_done()
        if stop:
            break
        # End of epoch: validation on the held-out split, then the epoch checkpoint (best by val loss).
        t_pause = time.perf_counter()
        val_loss = None
        if val_loader is not None and (epoch + 1) % cfg.train.val_every_epochs == 0 and len(val_loader) > 0:
            val_loss = validate()
            metrics.write({"kind": "val", "step": step, "epoch": epoch, "val_loss": val_loss,
                           "val_seconds": time.perf_counter() - t_pause})
            log.info("epoch %d: val loss %.5f", epoch, val_loss)
        # without a validation split the best checkpoint is the latest epoch's
        is_best = val_loader is None or (val_loss is not None and math.isfinite(val_loss) and val_loss < best_val)
        if is_best and val_loss is not None:
            best_val = val_loss
        checkpoint(epoch_complete=True, val_loss=val_loss, is_best=is_best)
        window["t0"] += time.perf_counter() - t_pause
        epoch += 1

    # ---------------------------------------------------------------- finish
    progress.close()
    log.info("stopped after step %d: %s", step, f"train.max_steps = {cfg.train.max_steps} reached" if stop
             else f"all {cfg.optim.epochs} epochs done")
    close_loaders(train_loader, val_loader)
    if saved_step != step:
        checkpoint(epoch_complete=False)
    if master:
        meta = {"usjepa_teacher_sha256": teacher_sha} if teacher_sha else None
        export_encoder_safetensors(encoder, out_dir / "export" / "encoder_last.safetensors", meta)
        best = out_dir / "checkpoints" / "best.pt"
        if best.is_file():
            export_encoder_safetensors(load_encoder(best), out_dir / "export" / "encoder_best.safetensors", meta)
        log.info("exported encoder to %s", out_dir / "export")
    digest = param_digest(model)
    print(f"[rank {rank}] finished at step {step}, parameter digest {digest}", flush=True)
    if world > 1:
        agreed = [None] * world
        dist.all_gather_object(agreed, (step, digest))
        if len(set(agreed)) != 1:
            raise RuntimeError(f"ranks disagree at the end of training: {agreed}")
        dist.destroy_process_group()
    metrics.close()
    return 0


# ==================================================================== helpers (small, used above)


def make_loader(cfg: Config, split: str, rank: int, world: int, device: torch.device):
    from usjepa.kernels.block_masks import MaskConfig
    from usjepa.shards.holdout import HoldoutError
    from usjepa.shards.loader import build_loader

    if not cfg.data.root:
        raise ConfigError("data.root is not set (the folder holding manifest.json)")
    try:
        mask_cfg = MaskConfig.from_dict(cfg.masks)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"masks: {e}") from e
    try:
        return build_loader(cfg.data.root, split, cfg.data.batch_size, data_config(cfg.data.loader),
                            mask_cfg, rank=rank, world_size=world, device=device,
                            seed=cfg.seed, backend=cfg.data.backend, val_from_train=cfg.data.val_from_train,
                            cache_dir=cfg.data.cache_dir, cache_limit_gb=cfg.data.cache_limit_gb)
    except HoldoutError as e:
        raise ConfigError(f"data.val_from_train: {e}") from None


def make_val_loader(cfg: Config, rank: int, world: int, device: torch.device):
    """The validation loader, or None (with one warning) for a corpus ingested without a validation split."""
    from usjepa.shards.remote import corpus_manifest

    if cfg.data.val_from_train:
        log.info("validating on %.1f%% of the training split's groups (data.val_from_train), not trained on",
                 100 * cfg.data.val_from_train)
    elif not any(s["split"] == "val" for s in corpus_manifest(cfg.data.root, cfg.data.cache_dir)["shards"]):
        log.warning("%s has no validation split: training without validation; best.pt is the latest epoch "
                    "checkpoint (or set data.val_from_train: 0.05 to hold out a slice of train)", cfg.data.root)
        return None
    return make_loader(cfg, "val", rank, world, device)


def resume_command(args: argparse.Namespace, out_dir: Path, checkpoint: Path, world: int, lr_peak: float) -> str:
    """The command that resumes this run from ``checkpoint`` with peak learning rate ``lr_peak``: the changed
    optimiser setting has to be allowed explicitly (``--allow-changed``), or the resume is refused."""
    cmd = ["usjepa-train", args.config, "--out", str(out_dir), "--resume", str(checkpoint)]
    for s in args.set:
        if not s.startswith("optim.lr_peak="):
            cmd += ["--set", s]
    cmd += ["--set", f"optim.lr_peak={lr_peak:g}", "--allow-changed", "optim.lr_peak"]
    text = shlex.join(cmd)
    return text if world == 1 else f"{text} (under torchrun, as this run was started)"


def exit_on_sigterm(signum, frame) -> None:
    """torchrun stops the other ranks with SIGTERM: exit through Python so that the loaders' plan folders are
    removed and their workers stopped (the default action would skip every clean-up)."""
    log.warning("stopping on %s (a cancelled job, or torchrun stopping the ranks after one failed); the last "
                "checkpoint is kept: rerun with --resume auto to continue", signal.Signals(signum).name)
    raise SystemExit(128 + signum)


def data_config(d: dict):
    """The data layer's own config (``usjepa.shards.augment.DataConfig``; it names unknown keys)."""
    from usjepa.shards.augment import DataConfig

    try:
        return DataConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data.loader: {e}") from e


def restore_training_state(ckpt, encoder, head, optimizer, train_loader, world, path) -> None:
    try:
        encoder.load_state_dict(ckpt["encoder"], strict=True)
        head.load_state_dict(ckpt["head"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model/optimiser: {e}") from e
    if ckpt["world_size"] != world:
        log.warning("elastic resume: checkpoint written with %d ranks, now %d", ckpt["world_size"], world)
    train_loader.load_state_dict(ckpt["sampler"])


def check_same_teacher(ckpt: dict, teacher_sha: str | None, path) -> None:
    """A stage-2 run resumes only against the teacher file it started with (same sha256)."""
    saved = ckpt.get("teacher_sha256")
    if saved != teacher_sha:
        raise CheckpointError(f"checkpoint {path} was trained against teacher sha256 {saved}, but model.teacher "
                              f"now has sha256 {teacher_sha}; resume with the original teacher file or start a new run")


def close_loaders(*loaders) -> None:
    """Stop the loaders' worker processes now rather than at garbage collection."""
    for loader in loaders:
        if hasattr(loader, "close"):
            loader.close()


def seed_of(*parts) -> int:
    """A stable 63-bit seed from parts (for per-step masks that need no RNG state to resume)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


def teacher_cfg(teacher):
    return getattr(teacher, "_orig_mod", teacher).cfg


def asdict_cfg(encoder) -> dict:
    import dataclasses

    return dataclasses.asdict(encoder.cfg)


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def param_digest(model) -> str:
    h = hashlib.sha256()
    for _, p in sorted(model.state_dict().items()):
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# Dense bf16 tensor-core peaks per device (vendor datasheets, no sparsity).
GPU_PEAK_BF16 = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "A100": 312.0e12,
                 "L40S": 362.1e12, "A10G": 70.0e12, "L4": 121.0e12, "RTX 4090": 165.2e12}


MEASURED_CPU_PEAK = "measured fp32 matmul on this CPU"


def peak_flops_per_device(cfg: Config, device: torch.device) -> tuple[float | None, str]:
    """The MFU denominator: config value, the GPU's datasheet bf16 peak, or on CPU the best measured fp32 matmul
    rate of this process (so CPU 'MFU' reads as 'fraction of what a large matmul achieves here')."""
    if cfg.train.peak_flops:
        return float(cfg.train.peak_flops), "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_BF16.items():
            if key in name:
                return flops, f"datasheet bf16 dense ({name})"
        return None, f"unknown GPU {name}"
    return measured_matmul_flops(), MEASURED_CPU_PEAK


def measured_matmul_flops(n: int = 1024, trials: int = 20, seconds: float = 1.0) -> float:
    """The best rate of up to ``trials`` fp32 n x n matmuls (at most ``seconds`` after the first) on this
    process's threads. A peak is the best rate the cores reach; other processes on them (and, before, our own
    loader workers starting up) only ever slow a trial down, so it is the fastest trial, not the mean: a 0.2 s
    mean taken beside starting workers read 22 GFLOP/s on cores that do 340, and MFU passed 100 %."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best, t_end = math.inf, time.perf_counter() + seconds
    for _ in range(trials):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
        if t0 > t_end:
            break
    return 2 * n**3 / best


def mfu(flops_per_s: float, peak: float | None, source: str) -> float | None:
    """Model FLOPs utilisation, or None (logged as n/a) when there is no peak, or when the run went faster than
    a measured CPU peak: then that measurement was slowed by other load and is no peak, so no fraction of it
    means anything."""
    if not peak or (source == MEASURED_CPU_PEAK and flops_per_s > peak):
        return None
    return flops_per_s / peak


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process RSS)


class MetricsWriter:
    """JSONL (always) and TensorBoard (when installed) on rank 0; nothing on other ranks."""

    def __init__(self, out_dir: Path, master: bool, tensorboard: bool):
        self.file = self.tb = None
        if not master:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(out_dir / "metrics.jsonl", "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:
                log.info("tensorboard not installed; metrics go to metrics.jsonl only")

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        record = {**record, "time": time.time()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if record.get("kind") == "train":
            log.info("step %d loss %.5f lr %.2e %.1f img/s/dev wait %.1f%% mfu %s", record["step"], record["loss"],
                     record["lr"], record["images_per_s_per_device"], 100 * record["data_wait_frac"],
                     "n/a" if record["mfu"] is None else f"{100 * record['mfu']:.1f}%")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def make_progress(enabled: bool, total: int, initial: int):
    if enabled:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train")

    class _Silent:
        def update(self, n=1): ...
        def set_postfix(self, **kw): ...
        def close(self): ...

    return _Silent()


def cli() -> None:
    """``usjepa-train`` and ``python -m usjepa.train``: ``main`` and then an immediate exit with its status.

    By the time ``main`` returns, the checkpoints and exports are written and the ranks have agreed on the
    final weights. What is left is the interpreter's teardown of native libraries (DALI's thread pools,
    gloo/NCCL), which happens in no order we control: one CI run saw a finished rank abort there ("terminate
    called without an active exception", SIGABRT), which torchrun reports as a failed job. So the process
    flushes its streams and logs and leaves without that teardown."""
    status = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    cli()
