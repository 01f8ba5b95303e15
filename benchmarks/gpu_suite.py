"""The GPU suite: every GPU measurement of the project in one command, sized for one short job on a CUDA machine.

    python -m benchmarks.gpu_suite --out DIR                      # on a CUDA box: <= 8 min on one H200
    python -m benchmarks.gpu_suite --out DIR --real-root SHARDS   # + an ingested real corpus
    python -m benchmarks.gpu_suite --dry-run --out DIR            # every code path, tiny, on CPU (make test)

Sections, in this order — loader, SALT eager, sync, SALT compiled, profile, stage 1, speckle: the most wanted and
cheapest first (each writes ``DIR/gpu_suite.json`` + ``.md`` as it finishes, so a run stopped at its
time limit keeps what it measured; a section that does not fit the remaining ``--budget-s`` is skipped and
says so):

* ``env``     — device (name, memory, SMs), torch/CUDA/cuDNN, DALI, torchvision, cores.
* ``loader``  — data layer img/s, all augmentations at their defaults, 224², batch 128, workers = the rank's budget (cores − 2), on
  a synthetic corpus (written here, in parallel) and on ``--real-root``: DALI ``mixed`` (only where DALI is
  importable), our torch backend, and the plain per-sample DataLoader + OpenCV chain; DALI and torch
  also with speckle drawn in the workers (``speckle_on="worker"``) against on the device (the default on a
  GPU); the torch backend's GPU path (``decode_on="device"``: nvJPEG + roi_align) where torchvision imports.
  Steady-state img/s inside passes; start-up and pass restarts apart; a loader that fails is recorded as
  such and the others still run.
* ``salt``    — the packed SALT step, ViT-B/16 student + teacher, bf16, batch 128, eager and ``torch.compile``:
  compute-only (one batch on the device, repeated) and the real loop (``usjepa.train`` fed by the real
  loader; 150 steady steps after 30 warm-up steps): img/s, data-wait fraction (CUDA events), MFU over real
  tokens and the padded count, peak memory.
* ``profile`` — torch.profiler over the compiled packed step: share of device time in matmul, attention,
  norm + elementwise; the top kernels.
* ``sync``    — the steady-state step under ``torch.cuda.set_sync_debug_mode("error")`` (gpu_checks.py).
* ``stage1``  — the stage-1 (MAE) step, ViT-B/16 bf16: compute-only eager and compiled, and the eager loop.
* ``speckle`` — cost per batch of drawing speckle in a worker (OpenCV, host) vs on the device (events).

Needs torch, numpy, numba and OpenCV and webdataset (the shard writer's; on an air-gapped CUDA machine
tools/gpu-call.sh installs it from the carried .gpu-wheels); DALI is measured when it is importable,
e.g. from a ``--target`` install on ``PYTHONPATH`` (tools/stage-gpu-wheels.sh). ``--dry-run``
runs every section on the CPU with tiny sizes and the tiny test ViT, and ``torch.compile`` with its
``eager`` backend (dynamo's tracing without inductor's C++ build), so that it fits in ``make test``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import hardware, save_result, utc_now
from usjepa.shards.augment import worker_budget

REPO = Path(__file__).resolve().parents[1]
NAME = "gpu_suite"


# ------------------------------------------------------------------------------------------ sizes


def sizes(dry: bool, cores: int) -> dict:
    """Everything that scales: the real run's sizes, or tiny ones for --dry-run."""
    if dry:
        return {"frames": 96, "side": 160, "datasets": 2, "batch": 8, "workers": 1, "loader_s": 1.0,
                "arch": "vit_test_tiny", "predictor": {"embed_dim": 48, "depth": 2, "num_heads": 2},
                "decoder": {"embed_dim": 48, "depth": 1, "num_heads": 2}, "compute_steps": 2, "loop_steps": 8,
                "warmup_steps": 2, "log_every": 2, "profile_steps": 2, "config": "tiny_cpu.yaml"}
    # the loop: 30 warm-up steps (compilation, the first packed lengths, DALI's queues), then 150 measured
    return {"frames": 24576, "side": 320, "datasets": 8, "batch": 128,
            "workers": worker_budget("cuda", "torch", cores, local_ranks=1)[0],
            "loader_s": 6.0, "arch": "vit_base_patch16_224",
            "predictor": {"embed_dim": 384, "depth": 12, "num_heads": 12},
            "decoder": {"embed_dim": 256, "depth": 2, "num_heads": 8}, "compute_steps": 20, "loop_steps": 180,
            "warmup_steps": 30, "log_every": 10, "profile_steps": 5, "config": "usjepa_vitb16.yaml"}


class Budget:
    """Wall-clock budget of the run; a section runs only if its estimate fits what is left."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def fits(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ env


def environment(device: torch.device) -> dict:
    env = hardware()
    env["device"] = str(device)
    env["cuda"] = torch.version.cuda
    env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}")
    for mod in ("torchvision", "timm", "webdataset"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # absent, or failing to import (timm without torchvision)
            env[mod] = None
    return env


# ------------------------------------------------------------------------------------------ data


def _write_part(args) -> dict:
    root, name, n, side, seed = args
    from usjepa.shards.format import MANIFEST_NAME
    from usjepa.shards.synthetic_shards import write_synthetic_corpus

    write_synthetic_corpus(root, {name: n}, size=(side, side), per_shard=512, seed=seed, masks_per_video=8,
                           val={name: max(1, n // 64)})
    return json.loads((Path(root) / MANIFEST_NAME).read_text())


def synthetic_corpus(root: Path, frames: int, side: int, datasets: int, workers: int) -> Path:
    """``frames`` synthetic frames over ``datasets`` datasets, written by ``workers`` processes (one part per
    dataset, then one manifest), so that a corpus the size of many batches costs seconds, not minutes."""
    from usjepa.shards.format import MANIFEST_NAME, write_json_atomic

    parts = [(root / f"part{i}", f"syn{i}", frames // datasets, side, i) for i in range(datasets)]
    with ProcessPoolExecutor(max(1, min(workers, datasets))) as ex:
        manifests = list(ex.map(_write_part, parts))
    merged = dict(manifests[0])
    merged["datasets"], merged["shards"] = {}, []
    for (part, *_), m in zip(parts, manifests):
        merged["datasets"].update(m["datasets"])
        for s in m["shards"]:
            for key in ("path", "index"):
                shutil.move(str(part / s[key]), str(root / s[key]))
            merged["shards"].append(s)
        shutil.rmtree(part)
    write_json_atomic(root / MANIFEST_NAME, merged)
    return root


# ------------------------------------------------------------------------------------------ loader


def time_batches(make, device: torch.device, seconds: float) -> dict:
    """Batches from ``make()`` for about ``seconds`` of steady state, passes restarted as needed. Steady
    img/s counts images after each pass's first batch over the time inside passes; start-up (first batch)
    and restarts (end of a pass to the next pass's first batch) are reported apart."""
    t0 = time.perf_counter()
    loader = make()
    images, inside, restarts, passes, startup = 0, 0.0, 0.0, 0, None
    t_end = None
    while inside < seconds:
        if passes and hasattr(loader, "set_epoch"):
            loader.set_epoch(passes)
        it = iter(loader)
        first = next(it, None)
        if first is None:
            break
        t_first = time.perf_counter()
        if startup is None:
            startup = t_first - t0
        else:
            restarts += t_first - t_end
        passes += 1
        for b in it:
            x = b.images if hasattr(b, "images") else b[0]
            if x.device != device:  # the plain chain hands over host tensors, as a naive loop would copy them
                x = x.to(device)
            images += x.shape[0]
            if time.perf_counter() - t_first + inside >= seconds:
                break
        sync(device)
        t_end = time.perf_counter()
        inside += t_end - t_first
    if hasattr(loader, "close"):
        loader.close()
    return {"images": images, "seconds": inside, "images_per_s": images / inside if inside > 0 else None,
            "passes": passes, "startup_s": startup, "restart_s_total": restarts}


def loader_variants(root: Path, sz: dict, device: torch.device, dali: bool, with_worker_speckle: bool,
                    gpu_decode: bool) -> dict:
    """name -> zero-argument maker of a loader over ``root``'s train split."""
    from benchmarks.bench_loader import plain_loader
    from usjepa.kernels.block_masks import MaskConfig
    from usjepa.shards.augment import DataConfig
    from usjepa.shards.loader import build_loader

    mask_cfg = MaskConfig()
    makers = {}
    variants = [(b, "auto", "worker") for b in (("dali",) if dali else ()) + ("torch",)]
    if with_worker_speckle:
        variants += [(b, "worker", "worker") for b in (("dali",) if dali else ()) + ("torch",)]
    if gpu_decode:
        variants.append(("torch", "auto", "device"))
    for backend, speckle, decode in variants:
        cfg = DataConfig(num_workers=sz["workers"], cap=None, speckle_on=speckle, decode_on=decode)
        name = backend + ("_worker_speckle" if speckle == "worker" else "") + ("_gpu_decode" if decode == "device" else "")
        makers[name] = functools.partial(build_loader, root, "train", sz["batch"], cfg, mask_cfg, 0, 1, device, 0,
                                         backend)
    plain_cfg = DataConfig(num_workers=sz["workers"], cap=None)
    makers["plain_dataloader_opencv"] = functools.partial(plain_loader, root, sz["batch"], plain_cfg, mask_cfg, 0)
    return makers


def bench_loaders(corpora: dict, sz: dict, device: torch.device, dali: bool, gpu_decode: bool) -> dict:
    out = {}
    for label, root in corpora.items():
        res = {}
        for name, make in loader_variants(root, sz, device, dali, label == "synthetic", gpu_decode).items():
            try:
                res[name] = time_batches(make, device, sz["loader_s"])
            except Exception as e:  # one loader failing on a new machine must not cost the other numbers
                res[name] = {"error": f"{type(e).__name__}: {e}"[:500], "images_per_s": None}
                print(f"loader {label:9s} {name:26s} FAILED: {res[name]['error']}", flush=True)
                continue
            print(f"loader {label:9s} {name:26s} {res[name]['images_per_s'] or 0:9.0f} img/s "
                  f"(start-up {res[name]['startup_s'] or 0:.1f} s, {res[name]['passes']} pass(es))", flush=True)
        base = res["plain_dataloader_opencv"]["images_per_s"]
        for r in res.values():
            r["ratio_vs_plain"] = r["images_per_s"] / base if base and r["images_per_s"] else None
        out[label] = res
    return out


# ------------------------------------------------------------------------------------------ model steps


def mae_compute_only(arch: str, decoder: dict, batch, device: torch.device, bf16: bool, compile_: bool,
                     steps: int, peak: float | None) -> dict:
    """The stage-1 step alone, with the trainer's update, on one batch already on the device (the counterpart
    of ``bench_train.compute_only`` for the SALT step)."""
    from benchmarks.bench_train import trainer_update
    from usjepa.models import DecoderConfig, MAEDecoder, MAEModel, mae_loss, mae_step_flops, random_keep_indices
    from usjepa.step import backward_and_update

    torch.manual_seed(0)
    enc = build_encoder(arch)
    head = MAEDecoder(DecoderConfig(**decoder), enc.embed_dim, enc.cfg.num_patches, enc.cfg.patch_size**2)
    model = MAEModel(enc, head).to(device)
    opt, nonfinite, clip = trainer_update(model, device)
    net = torch.compile(model) if compile_ else model
    ac = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else contextlib.nullcontext()
    images, valid = batch.images.to(device), batch.valid.to(device)
    keep = random_keep_indices(images.shape[0], enc.cfg.num_patches, head.cfg.mask_ratio,
                               torch.Generator().manual_seed(0)).to(device)

    def step():
        with ac:
            loss = mae_loss(net(images, keep), images, keep, valid, enc.cfg.patch_size)
        backward_and_update(loss, model, opt, clip, nonfinite)

    t = time.perf_counter()
    for _ in range(3):
        step()
    sync(device)
    warmup_s = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t) / steps
    flops = mae_step_flops(enc.cfg, head, images.shape[0])
    return {"step_s": dt, "images_per_s": images.shape[0] / dt, "tflops": flops / dt / 1e12,
            "mfu": flops / dt / peak if peak else None, "warmup_s": warmup_s,
            "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def build_encoder(arch: str):
    from usjepa.models import build_vit

    return build_vit(arch)


def loop_overrides(sz: dict, root: Path, backend: str, compile_: bool, teacher: Path | None) -> list[str]:
    o = [f"data.root={root}", "optim.epochs=1", "optim.warmup_epochs=0.1", f"train.max_steps={sz['loop_steps']}",
         f"train.log_every={sz['log_every']}", f"train.compile={str(compile_).lower()}", "train.progress=false",
         "train.tensorboard=false", "train.ckpt_every_steps=0", f"data.batch_size={sz['batch']}",
         f"data.backend={backend}", "data.loader={num_workers: %d, cap: null}" % sz["workers"]]
    if teacher is not None:
        o.append(f"model.teacher={teacher}")
    return o


def bench_salt(res: dict, shared: dict, root: Path, work: Path, sz: dict, device: torch.device, backend: str,
               peak: float | None, compile_: bool) -> dict:
    """One SALT measurement (eager or compiled) into ``res``: compute-only, then the real loop. ``shared``
    keeps the teacher file and the compute-only batch between the two calls (not part of the report)."""
    from benchmarks.bench_train import compute_only, first_batch, loop
    from usjepa.models import PredictorConfig, build_vit, export_encoder_safetensors

    if not shared:
        torch.manual_seed(1)
        shared["teacher"] = export_encoder_safetensors(build_vit(sz["arch"]), work / "teacher.safetensors")
        shared["batch"] = first_batch(root, sz["batch"], device)
        res.update(batch=sz["batch"], arch=sz["arch"], loader_backend=backend, bf16=device.type == "cuda")
    tag = "compile" if compile_ else "eager"
    keep: dict = {}
    co = compute_only(sz["arch"], sz["arch"], PredictorConfig(**sz["predictor"]), shared["batch"], device,
                      res["bf16"], compile_, steps=sz["compute_steps"], peak=peak, keep=keep)
    if compile_:
        shared["compiled_step"] = keep["step"]  # for the profile section
    lp = loop(str(REPO / "configs" / sz["config"]), work / f"salt_{tag}",
              loop_overrides(sz, root, backend, compile_, shared["teacher"])
              + [f"model.arch={sz['arch']}", f"model.teacher_arch={sz['arch']}"], warmup_steps=sz["warmup_steps"])
    res[tag] = {"compute_only": co, "loop": lp,
                "loop_vs_compute_only": lp["images_per_s"] / co["images_per_s"] if co["images_per_s"] else None}
    print(f"salt {tag}: compute-only {co['images_per_s']:.0f} img/s, loop {lp['images_per_s']:.0f} img/s, "
          f"wait {100 * (lp['data_wait_frac'] or 0):.1f} %, MFU {100 * (lp['mfu'] or 0):.1f} %", flush=True)
    return res


def bench_stage1(root: Path, work: Path, sz: dict, device: torch.device, backend: str, peak: float | None,
                 budget: Budget, dry: bool) -> dict:
    from benchmarks.bench_train import first_batch, loop

    batch = first_batch(root, sz["batch"], device)
    bf16 = device.type == "cuda"
    res = {"batch": sz["batch"], "arch": sz["arch"], "bf16": bf16}
    for compile_ in (False, True):
        tag = "compile" if compile_ else "eager"
        estimate = (10 if dry else 100) if compile_ else (5 if dry else 20)
        if not budget.fits(estimate):
            res[f"compute_only_{tag}"] = {"skipped": f"time budget: {budget.left():.0f} s left"}
            continue
        res[f"compute_only_{tag}"] = mae_compute_only(sz["arch"], sz["decoder"], batch, device, bf16, compile_,
                                                      sz["compute_steps"], peak)
    if budget.fits(10 if dry else 45):
        res["loop_eager"] = loop(str(REPO / "configs" / sz["config"]), work / "stage1_eager",
                                 loop_overrides(sz, root, backend, False, None)
                                 + ["stage=1", f"model.arch={sz['arch']}", "model.teacher=null"],
                                 warmup_steps=sz["warmup_steps"])
    return res


# kernel (CUDA) or operator (CPU) names -> what they compute; the first match wins
PROFILE_CLASSES = (
    ("attention", ("flash", "flex", "attention", "fmha", "sdpa", "softmax", "triton_tem")),
    ("matmul", ("gemm", "mm", "matmul", "linear", "cutlass", "xmma", "sm90", "cublas", "conv", "bmm", "baddbmm")),
    ("norm+elementwise", ("norm", "gelu", "triton_poi", "triton_per", "triton_red", "elementwise", "vectorized",
                          "add", "mul", "copy", "fill", "index", "gather", "scatter", "reduce", "sum", "cat",
                          "smooth_l1", "adam", "foreach", "clone", "where", "sqrt", "div", "sub", "pow")),
)


def classify_kernel(name: str) -> str:
    low = name.lower()
    for cls, keys in PROFILE_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def bench_profile(shared: dict, root: Path, sz: dict, device: torch.device, compile_: bool) -> dict:
    """A short torch.profiler trace of the packed SALT step (compiled when ``compile_``): the share of device
    time (CPU time on a CPU) in matmul, attention, norm + elementwise and the rest, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.bench_train import first_batch, salt_step
    from usjepa.models import PredictorConfig

    if compile_ and "compiled_step" in shared:  # compiled and warmed up by the salt section
        step = shared["compiled_step"]
    else:
        if "batch" not in shared:
            shared["batch"] = first_batch(root, sz["batch"], device)
        step, _ = salt_step(sz["arch"], sz["arch"], PredictorConfig(**sz["predictor"]), shared["batch"], device,
                            device.type == "cuda", compile_)
    for _ in range(3):  # warm-up (and compilation, unless the salt section did it)
        step()
    sync(device)
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(sz["profile_steps"]):
            step()
        sync(device)
    shares, top = {}, []
    for ev in prof.key_averages():
        t = ev.self_device_time_total if cuda else ev.self_cpu_time_total
        if t <= 0 or (cuda and getattr(ev, "device_type", None) is not None and "CUDA" not in str(ev.device_type)):
            continue
        cls = classify_kernel(ev.key)
        shares[cls] = shares.get(cls, 0.0) + t
        top.append((t, ev.key[:120], cls))
    total = sum(shares.values()) or 1.0
    top.sort(reverse=True)
    return {"compiled": compile_, "steps": sz["profile_steps"], "time": "device" if cuda else "cpu (self)",
            "share": {k: v / total for k, v in sorted(shares.items())},
            "ms_per_step": total / 1e3 / sz["profile_steps"],
            "top": [{"name": n, "class": c, "share": t / total} for t, n, c in top[:12]]}


def bench_sync(root: Path, sz: dict, device: torch.device, backend: str) -> dict:
    from benchmarks.gpu_checks import salt_steps_without_sync
    from usjepa.models import PredictorConfig
    from usjepa.shards.augment import DataConfig
    from usjepa.shards.loader import build_loader

    if device.type != "cuda":
        return {"skipped": "needs CUDA (torch.cuda.set_sync_debug_mode)"}
    loader = build_loader(root, "train", sz["batch"], DataConfig(num_workers=sz["workers"], cap=None), None,
                          device=device, backend=backend)
    try:
        return salt_steps_without_sync(loader, device, sz["arch"], PredictorConfig(**sz["predictor"]), bf16=True)
    finally:
        loader.close()


def bench_speckle(sz: dict, device: torch.device, reps: int = 5) -> dict:
    """Host time of one batch's speckle fields drawn as the workers draw them, and the device time of the
    same batch drawn on the device (CUDA events; host clock on CPU)."""
    from usjepa.shards.augment import DataConfig
    from usjepa.shards.corruptions import speckle_field
    from usjepa.shards.device_speckle import speckle_gain

    cfg = DataConfig()
    rng = np.random.default_rng(0)
    n = sz["batch"]
    on = rng.random(n) < cfg.speckle_p
    eps = np.where(on, rng.uniform(*cfg.speckle_eps, n), 0.0).astype(np.float32)
    seeds = rng.integers(1, 2**31, n)
    side = (cfg.image_size, cfg.image_size)
    t = time.perf_counter()
    for _ in range(reps):
        for e in eps[eps > 0]:
            speckle_field(side, float(e), rng)
    worker_ms = (time.perf_counter() - t) / reps * 1e3
    gen = torch.Generator(device)
    speckle_gain(eps, seeds, side, device, gen)  # warm-up
    sync(device)
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            speckle_gain(eps, seeds, side, device, gen)
        b.record()
        b.synchronize()
        device_ms = a.elapsed_time(b) / reps
    else:
        t = time.perf_counter()
        for _ in range(reps):
            speckle_gain(eps, seeds, side, device, gen)
        device_ms = (time.perf_counter() - t) / reps * 1e3
    return {"batch": n, "speckled": int(on.sum()), "worker_host_ms_per_batch": worker_ms,
            "device_ms_per_batch": device_ms, "field_bytes_per_batch_not_copied": int(on.sum()) * side[0] * side[1] * 4}


# ------------------------------------------------------------------------------------------ report


def markdown(report: dict) -> str:
    env = report["env"]
    dev = env.get("gpu") or f"CPU ({env['cpu']})"
    lines = [f"GPU suite on **{dev}**, {env['cores']} cores, torch {env['torch']} (CUDA {env['cuda']}), "
             f"DALI {env['dali'] or 'absent'}, measured {report['measured_at']}"
             + (" — DRY RUN (tiny sizes, CPU: not a measurement)" if report["dry_run"] else ""), "",
             "| section | what | result |", "|---|---|---|"]
    for label, res in (report.get("loader") or {}).items():
        for name, r in res.items():
            if "error" in r:
                lines.append(f"| loader, {label} | {name} | FAILED: {r['error'][:200]} |")
                continue
            ratio = f" = {r['ratio_vs_plain']:.2f}× plain" if r.get("ratio_vs_plain") else ""
            lines.append(f"| loader, {label} | {name} | {r['images_per_s'] or 0:.0f} img/s{ratio} "
                         f"(start-up {r['startup_s'] or 0:.1f} s) |")
    for section in ("salt", "stage1"):
        res = report.get(section) or {}
        for tag in ("eager", "compile"):
            r = res.get(tag)
            if r is None:
                continue
            if "skipped" in r:
                lines.append(f"| {section} {tag} | – | skipped: {r['skipped']} |")
                continue
            co, lp = r["compute_only"], r["loop"]
            lines.append(
                f"| SALT {tag}, {res['arch']}, batch {res['batch']} | compute-only / loop ({res['loader_backend']}) | "
                f"{co['images_per_s']:.0f} / {lp['images_per_s']:.0f} img/s; data wait {100 * (lp['data_wait_frac'] or 0):.1f} %; "
                f"MFU (real tokens) {100 * (co['mfu'] or 0):.1f} / {100 * (lp['mfu'] or 0):.1f} % "
                f"(padded count {100 * (co.get('mfu_padded') or 0):.1f} / {100 * (lp.get('mfu_padded') or 0):.1f} %); "
                f"{lp.get('steady_steps', '?')} steady loop steps; peak {co['peak_mem_gb'] or 0:.1f} GiB |")
        for key in ("compute_only_eager", "compute_only_compile", "loop_eager"):
            r = res.get(key) if section == "stage1" else None
            if r is None:
                continue
            if "skipped" in r:
                lines.append(f"| stage-1 {key} | – | skipped: {r['skipped']} |")
                continue
            extra = f"; data wait {100 * (r['data_wait_frac'] or 0):.1f} %" if "data_wait_frac" in r else ""
            lines.append(f"| stage-1 (MAE) {key}, {res['arch']}, batch {res['batch']} | img/s, MFU, peak | "
                         f"{r['images_per_s']:.0f} img/s; MFU {100 * (r['mfu'] or 0):.1f} %{extra}; "
                         f"peak {r['peak_mem_gb'] or 0:.1f} GiB |")
    pr = report.get("profile")
    if pr:
        shares = ", ".join(f"{k} {100 * v:.0f} %" for k, v in sorted(pr["share"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| profile | packed SALT step{' compiled' if pr['compiled'] else ''}, {pr['steps']} steps, "
                     f"{pr['time']} time | {pr['ms_per_step']:.1f} ms/step: {shares} |")
    s = report.get("sync")
    if s:
        lines.append(f"| sync | steady-state step under set_sync_debug_mode('error') | "
                     + (f"skipped: {s['skipped']}" if "skipped" in s else
                        "no sync" if s["ok"] else f"SYNC: {s['error']}") + " |")
    sp = report.get("speckle")
    if sp:
        lines.append(f"| speckle | {sp['speckled']} of {sp['batch']} samples | worker (host) "
                     f"{sp['worker_host_ms_per_batch']:.1f} ms vs device {sp['device_ms_per_batch']:.2f} ms per batch |")
    for name, why in report["skipped"].items():
        lines.append(f"| {name} | – | skipped: {why} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from usjepa.exit_codes import EXIT_STATUS_HELP, OK, USAGE

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXIT_STATUS_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_suite.json / gpu_suite.md")
    ap.add_argument("--real-root", type=Path, help="an ingested real corpus (manifest.json) for the loader section")
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget; sections that do not fit "
                    "are skipped (default 450 s: the suite stays inside 8 minutes with start-up)")
    ap.add_argument("--only", default="loader,salt,sync,profile,stage1,speckle", help="comma-separated sections")
    ap.add_argument("--workers", type=int, help="loader workers (default: the cores less two for the trainer)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: exercises every code path")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed at the end)")
    a = ap.parse_args(argv)
    budget = Budget(a.budget_s)
    only = set(a.only.split(","))
    device = torch.device("cpu" if a.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not a.dry_run:
        print("gpu_suite: no CUDA device here; use --dry-run on a CPU machine", file=sys.stderr)
        return USAGE
    try:
        import webdataset  # noqa: F401  (the shard writer's, for the synthetic corpus)
    except ImportError as e:
        why = " ".join(str(e).split())
        print(f"gpu_suite: webdataset is not importable ({why}); on a CUDA machine without network, carry it: "
              "bash tools/stage-gpu-wheels.sh --wheels-only here, carry .gpu-wheels, run tools/gpu-call.sh",
              file=sys.stderr)
        return USAGE
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    sz = sizes(a.dry_run, cores)
    if a.workers:
        sz["workers"] = a.workers
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    from usjepa.shards.loader import dali_available
    from usjepa.train import peak_flops_per_device

    from usjepa.shards.gpu_decode import available as gpu_decode_available

    dali = dali_available()
    gpu_decode = device.type == "cuda" and gpu_decode_available()
    backend = "dali" if dali else "torch"
    report = {"benchmark": NAME, "dry_run": a.dry_run, "measured_at": utc_now(), "env": environment(device),
              "sizes": sz, "skipped": {}}
    if not dali:
        report["skipped"]["dali"] = "nvidia.dali is not importable here (bring it: tools/stage-gpu-wheels.sh)"
    if not gpu_decode:
        report["skipped"]["torch_gpu_decode"] = "needs CUDA and torchvision (nvJPEG decode, roi_align)"

    def save(final: bool = False):
        report["elapsed_s"] = a.budget_s - budget.left()
        if final:  # printed once, last: a remote job's output tail ends with the table
            save_result(a.out, NAME, report, markdown(report))
            return
        a.out.mkdir(parents=True, exist_ok=True)  # after each section, so a stopped run keeps its numbers
        (a.out / f"{NAME}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (a.out / f"{NAME}.md").write_text(markdown(report) + "\n")

    compile_patch = contextlib.nullcontext()
    if a.dry_run:  # dynamo traces as on the GPU; inductor's C++ build would not fit make test on 2 cores
        compile_patch = _compile_backend("eager")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    try:
        with compile_patch:
            t = time.perf_counter()
            syn = synthetic_corpus(work / "synthetic", sz["frames"], sz["side"], sz["datasets"], sz["workers"])
            report["data"] = {"synthetic": {"frames": sz["frames"], "side": sz["side"], "datasets": sz["datasets"],
                                            "write_s": time.perf_counter() - t}}
            corpora = {"synthetic": syn}
            if a.real_root:
                corpora["real"] = a.real_root
                report["data"]["real"] = {"root": str(a.real_root)}
            else:
                report["skipped"]["loader, real"] = "no --real-root given"
            peak, peak_source = peak_flops_per_device(_PeakCfg(), device)
            report["peak_flops"] = {"value": peak, "source": peak_source}
            salt: dict = {}
            salt_shared: dict = {}
            # (name, --only key, estimate s, run): cheap and most wanted first; the compiled SALT step (the
            # longest, compilation included) after the sync check so that a short budget still checks that
            sections = [
                ("loader", "loader", 20 if a.dry_run else 120, lambda: bench_loaders(corpora, sz, device, dali,
                                                                                     gpu_decode)),
                ("salt", "salt", 15 if a.dry_run else 60,
                 lambda: bench_salt(salt, salt_shared, syn, work, sz, device, backend, peak, compile_=False)),
                ("sync", "sync", 5 if a.dry_run else 30, lambda: bench_sync(syn, sz, device, backend)),
                ("salt", "salt compile", 20 if a.dry_run else 180,
                 lambda: bench_salt(salt, salt_shared, syn, work, sz, device, backend, peak, compile_=True)),
                ("profile", "profile", 10 if a.dry_run else (20 if "salt" in only else 90),
                 lambda: bench_profile(salt_shared, syn, sz, device, compile_=True)),
                ("stage1", "stage1", 10 if a.dry_run else 40,
                 lambda: bench_stage1(syn, work, sz, device, backend, peak, budget, a.dry_run)),
                ("speckle", "speckle", 1 if a.dry_run else 5, lambda: bench_speckle(sz, device)),
            ]
            for name, label, estimate, run in sections:
                if name not in only:
                    continue
                if not budget.fits(estimate):
                    report["skipped"][label] = f"time budget: {budget.left():.0f} s left, ~{estimate} s needed"
                    continue
                t = time.perf_counter()
                report[name] = run()
                report.setdefault("section_s", {})[label] = time.perf_counter() - t
                save()
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    save(final=True)
    return OK


class _PeakCfg:
    """The MFU denominator as the trainer picks it (datasheet bf16 peak of the GPU; measured rate on CPU)."""

    class train:
        peak_flops = None


@contextlib.contextmanager
def _compile_backend(backend: str):
    real = torch.compile
    torch.compile = functools.partial(real, backend=backend)
    try:
        yield
    finally:
        torch.compile = real


if __name__ == "__main__":
    raise SystemExit(main())
