"""Train-step throughput: images/s per device, data-wait fraction of step time, MFU.

Two measurements per model, in one run:
  * compute-only: the SALT step (teacher forward, student + predictor forward/backward, AdamW) on one batch
    already on the device, repeated — the ceiling the loop can reach;
  * the real loop: ``usjepa.train`` on real shards (written by ``usjepa.shards.synthetic_shards``), read from its
    metrics.jsonl — DALI backend, and the DataLoader + OpenCV backend as the baseline.
The figures are the loop's images/s as a ratio to the compute-only ceiling (1.0 = the data never stalls)
and DALI's ratio to the baseline loader.

    python -m benchmarks.bench_train --out benchmarks/results              # CPU tiny; + ViT-B/16 on a GPU
    python -m benchmarks.bench_train --out DIR --gpu-steps 30              # longer GPU loop

On CPU the model is the tiny test ViT (the CPU MFU denominator is this machine's measured fp32 matmul rate).
With CUDA, ViT-B/16 student + ViT-B/16 teacher + predictor (12 x 384), batch 128, bf16, eager and
``torch.compile``; MFU against the GPU's datasheet dense bf16 peak.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import hardware, save_result, utc_now
from usjepa.config import OptimSection
from usjepa.models import (
    Predictor,
    PredictorConfig,
    SALTModel,
    build_vit,
    export_encoder_safetensors,
    freeze,
    salt_loss,
    salt_forward,
    salt_step_flops,
    teacher_targets,
)
from usjepa.models.salt import plan_salt_packing, salt_step_flops_real
from usjepa.schedules import set_optimizer_hparams
from usjepa.step import backward_and_update, build_optimizer, compile_teacher
from usjepa.shards.synthetic_shards import write_synthetic_corpus

REPO = Path(__file__).resolve().parents[1]


def toy_split(n: int) -> dict[str, int]:
    """``n`` frames over two datasets, so the loop's Eq. 6 sampler mixes sources as on a real corpus."""
    return {"toy_a": n - n // 2, "toy_b": n // 2}


def first_batch(root: Path, batch_size: int, device: torch.device):
    from usjepa.shards.loader import build_loader

    loader = build_loader(root, "train", batch_size, {"num_workers": 1}, None, device=device, backend="torch")
    batch = next(iter(loader))
    loader.close()
    return batch


def trainer_update(model, device: torch.device):
    """-> (optimizer, non-finite flag, clip norm) as the trainer builds them for ``model`` with the default
    ``optim`` section: its parameter groups, fused AdamW on CUDA, gradient clipping (``backward_and_update``)."""
    optim = OptimSection()
    opt = build_optimizer(model, optim, device.type == "cuda")
    set_optimizer_hparams(opt, optim.lr_start, optim.wd_start)
    return opt, torch.zeros((), device=device), optim.clip_grad


def salt_step(arch: str, teacher_arch: str, pred_cfg: PredictorConfig, batch, device, bf16: bool, compile_: bool,
              packed: bool = True):
    """-> (step(): one SALT training step on ``batch``, repeated as is, with the trainer's update; the FLOPs dict
    of that step)."""
    torch.manual_seed(0)
    teacher = freeze(build_vit(teacher_arch)).to(device)
    student = build_vit(arch)
    model = SALTModel(student, Predictor(pred_cfg, student.embed_dim, teacher.embed_dim, student.cfg.num_patches)).to(device)
    opt, nonfinite, clip = trainer_update(model, device)
    net, tnet = (torch.compile(model), compile_teacher(teacher)) if compile_ else (model, teacher)
    ac = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else contextlib.nullcontext()
    images, ctx, tgt = batch.images.to(device), batch.ctx_idx.to(device), batch.tgt_idx.to(device)

    packing = plan_salt_packing(ctx, tgt, *batch.lengths, student.cfg.num_patches) if packed else None

    def step():
        with ac:
            if packed:
                loss = salt_forward(net, tnet, images, ctx, tgt, packing=packing)[0]
            else:
                loss = salt_loss(net(images, ctx, tgt)[1], teacher_targets(tnet, images, tgt), tgt >= 0)
        backward_and_update(loss, model, opt, clip, nonfinite)

    T, B, Kt = tgt.shape
    flops = {"padded": salt_step_flops(student.cfg, teacher.cfg, model.predictor, B, ctx.shape[1], T, Kt),
             "real": salt_step_flops_real(student.cfg, teacher.cfg, model.predictor, *batch.lengths),
             "Kc": int(ctx.shape[1]), "T": int(T), "Kt": int(Kt), "batch": int(B)}
    return step, flops


def compute_only(arch: str, teacher_arch: str, pred_cfg: PredictorConfig, batch, device, bf16: bool,
                 compile_: bool, steps: int, peak: float | None, packed: bool = True, keep: dict | None = None
                 ) -> dict:
    """The SALT step alone, on one batch that is already on the device: packed (the trainer's step) or
    padded to the batch's widths with key-padding masks (the step before packing). ``keep``: receives the
    warmed-up step under "step" (a profile of it then costs no second compilation)."""
    step, f = salt_step(arch, teacher_arch, pred_cfg, batch, device, bf16, compile_, packed)
    if keep is not None:
        keep["step"] = step
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_warm = time.perf_counter()
    for _ in range(3):  # warm-up (and compilation)
        step()
    sync()
    warmup_s = time.perf_counter() - t_warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    B, flops, padded = f["batch"], f["real"], f["padded"]  # MFU over real tokens; the padded count beside it
    return {"step_s": dt, "images_per_s": B / dt, "tflops": flops / dt / 1e12, "mfu": flops / dt / peak if peak else None,
            "mfu_padded": padded / dt / peak if peak else None, "packed": packed,
            "warmup_s": warmup_s, "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            **{k: f[k] for k in ("Kc", "T", "Kt", "batch")}}


def loop(config: str, out: Path, overrides: list[str], warmup_steps: int = 0) -> dict:
    """Run usjepa.train and summarise its metrics: the first log interval dropped (start-up), and every
    interval ending within ``warmup_steps`` (compilation, the first shapes), so that what is left is the
    steady state."""
    from usjepa.train import train

    argv = [config, "--out", str(out)]
    for o in overrides:
        argv += ["--set", o]
    t0 = time.perf_counter()
    train(argv)
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    recs = [r for r in train_recs[1:] if r["step"] > warmup_steps]
    # steps inside the kept intervals: from the end of the interval before the first kept one
    steady_steps = recs[-1]["step"] - train_recs[train_recs.index(recs[0]) - 1]["step"] if recs else 0
    if not recs:
        raise RuntimeError(f"{out}: too few log intervals to measure; raise the step count")
    med = lambda k: statistics.median(r[k] for r in recs) if recs[0].get(k) is not None else None  # noqa: E731
    return {"images_per_s": med("images_per_s_per_device"), "data_wait_frac": med("data_wait_frac"),
            "mfu": med("mfu"), "mfu_padded": med("mfu_padded"), "steady_steps": steady_steps,
            "tflops": med("tflops_per_device"), "peak_mem_gb": med("peak_mem_gb"),
            "intervals": len(recs), "wall_s": wall, "mfu_peak_source": recs[0].get("mfu_peak_source")}


def workers_cpu_s() -> float | None:
    """CPU seconds of this process's live descendants (the loader's worker processes; Linux ``/proc``; else None)."""
    try:
        stats = {int(d): Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split() for d in os.listdir("/proc")
                 if d.isdigit() and Path(f"/proc/{d}/stat").exists()}
    except OSError:
        return None
    kids, todo, total = {}, [os.getpid()], 0.0
    for pid, st in stats.items():
        kids.setdefault(int(st[1]), []).append(pid)
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        for c in kids.get(todo.pop(), []):
            total += (int(stats[c][11]) + int(stats[c][12])) / tick  # utime + stime
            todo.append(c)
    return total


def main_thread_cpu(root: Path, batch_size: int, batches: int, speckle_on: str, backend: str = "dali") -> dict:
    """CPU time of the consuming thread per batch inside the loader's backend (``time.thread_time`` around each
    batch; the workers' and DALI's threads are not counted): feeding DALI, unpacking, copies. This is what the
    trainer's main thread pays per step on a GPU (with ``speckle_on="device"``, the GPU's default), where the
    affine the loader adds runs on the device; on a CPU the image copy out of DALI is part of it. Beside it, the
    whole data layer's CPU per batch (every thread of this process and its worker processes), and the worker
    processes' alone per sample: what a GPU node's workers pay (there DALI's decode and resize leave the CPU)."""
    import numpy as np

    from usjepa.shards.loader import build_loader

    loader = build_loader(root, "train", batch_size, {"num_workers": 1, "cap": None, "speckle_on": speckle_on}, None,
                          backend=backend)
    ids = loader.sampler.pass_ids()[:batches]
    positions = np.arange(len(ids), dtype=np.int64) * batch_size
    it = loader._backend.iter_pass(ids, 0, positions)
    next(it)  # start-up apart
    per_batch = []
    own0, kids0 = time.process_time(), workers_cpu_s()
    while True:
        t = time.thread_time()
        if next(it, None) is None:
            break
        per_batch.append(time.thread_time() - t)
    own1, kids1 = time.process_time(), workers_cpu_s()
    loader.close()
    kids = kids1 - kids0 if kids0 is not None and kids1 is not None else None
    n = len(per_batch)
    return {"ms_per_batch_median": 1e3 * statistics.median(per_batch), "batches": n,
            "batch_size": batch_size, "speckle_on": speckle_on,
            "data_layer_cpu_ms_per_batch": 1e3 * (own1 - own0 + kids) / n if kids is not None else None,
            "worker_cpu_ms_per_sample": 1e3 * kids / (n * batch_size) if kids is not None else None}


def bench_cpu(work: Path, steps: int, rounds: int) -> dict:
    import yaml

    from usjepa.train import measured_matmul_flops

    root = write_synthetic_corpus(work / "shards_cpu", toy_split(8 * steps), size=(240, 300), per_shard=32,
                                  val=toy_split(16))
    torch.manual_seed(1)
    teacher = export_encoder_safetensors(build_vit("vit_test_tiny"), work / "teacher_tiny.safetensors")
    device = torch.device("cpu")
    batch = first_batch(root, 8, device)
    peak = measured_matmul_flops()
    # The loop computes on the config's train.threads and leaves the other cores to the data layer, as a GPU
    # computes on the GPU: its ceiling is the step on those same threads. The step on every core is reported
    # beside it (it is what the CPU could compute with no data layer at all).
    threads = yaml.safe_load((REPO / "configs" / "tiny_cpu.yaml").read_text())["train"]["threads"]
    all_cores = torch.get_num_threads()
    step = functools.partial(compute_only, "vit_test_tiny", "vit_test_tiny", PredictorConfig(48, 2, 2), batch, device,
                             False, False, steps=20, peak=peak)
    common = [f"data.root={root}", f"model.teacher={teacher}", "optim.epochs=1", "train.log_every=8",
              "data.loader={num_workers: 1}"]
    big = write_synthetic_corpus(work / "shards_b128", {"toy": 128 * 12}, size=(240, 300), per_shard=256)
    # the loop's loader (batch 8, speckle in the worker), and a GPU's batch and speckle setting
    res = {"main_thread_cpu": {"batch8": main_thread_cpu(root, 8, 40, "worker"),
                               "batch128": main_thread_cpu(big, 128, 11, "device")}}
    # Rounds alternate the ceilings and the DALI loop, so that the machine's drift (±6 % between runs on a
    # shared VM) falls on both sides of each ratio; the medians and ranges are reported.
    res["rounds"] = []
    for r in range(rounds):
        torch.set_num_threads(all_cores)
        everything = step()
        torch.set_num_threads(threads)
        ceiling = step()
        lp = loop(str(REPO / "configs" / "tiny_cpu.yaml"), work / f"cpu_dali_{r}", common + ["data.backend=dali"])
        res["rounds"].append({"compute_only": ceiling, "compute_only_all_cores": everything, "loop_dali": lp,
                              "ratio": lp["images_per_s"] / ceiling["images_per_s"],
                              "ratio_all_cores": lp["images_per_s"] / everything["images_per_s"]})
    torch.set_num_threads(all_cores)
    pick = sorted(res["rounds"], key=lambda x: x["ratio"])[len(res["rounds"]) // 2]  # the median round
    res.update(compute_only=dict(pick["compute_only"], threads=threads),
               compute_only_all_cores=dict(pick["compute_only_all_cores"], threads=all_cores), loop_dali=pick["loop_dali"])
    res["loop_torch"] = loop(str(REPO / "configs" / "tiny_cpu.yaml"), work / "cpu_torch", common + ["data.backend=torch"])
    res["ratio_loop_dali_vs_compute_only"] = pick["ratio"]
    res["ratio_loop_dali_vs_compute_only_all_cores"] = pick["ratio_all_cores"]
    res["ratio_range"] = [min(x["ratio"] for x in res["rounds"]), max(x["ratio"] for x in res["rounds"])]
    res["ratio_all_cores_range"] = [min(x["ratio_all_cores"] for x in res["rounds"]),
                                    max(x["ratio_all_cores"] for x in res["rounds"])]
    res["ratio_dali_vs_torch_loader"] = res["loop_dali"]["images_per_s"] / res["loop_torch"]["images_per_s"]
    # What any loop on these cores could reach against the all-core step: the data layer's CPU per image comes
    # out of the same cores, so at best the step's core-seconds and the data's add up.
    loader8 = res["main_thread_cpu"]["batch8"]
    if loader8["data_layer_cpu_ms_per_batch"] is not None:
        per_image_s = loader8["data_layer_cpu_ms_per_batch"] / 1e3 / loader8["batch_size"]
        res["ratio_bound_all_cores"] = 1 / (1 + per_image_s * res["compute_only_all_cores"]["images_per_s"] / all_cores)
    return res


def bench_gpu(work: Path, steps: int) -> dict:
    from usjepa.train import GPU_PEAK_BF16

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    peak = next((f for k, f in GPU_PEAK_BF16.items() if k in name), None)
    batch_size = 128
    root = write_synthetic_corpus(work / "shards_gpu", toy_split(batch_size * (steps + 2)), size=(240, 300),
                                  per_shard=512, val=toy_split(batch_size))
    torch.manual_seed(1)
    teacher = export_encoder_safetensors(build_vit("vit_base_patch16_224"), work / "teacher_vitb.safetensors")
    batch = first_batch(root, batch_size, device)
    res = {}
    for compile_ in (False, True):
        tag = "compile" if compile_ else "eager"
        res[f"compute_only_{tag}"] = compute_only("vit_base_patch16_224", "vit_base_patch16_224", PredictorConfig(),
                                                  batch, device, True, compile_, steps=20, peak=peak)
        res[f"loop_dali_{tag}"] = loop(
            str(REPO / "configs" / "usjepa_vitb16.yaml"), work / f"gpu_{tag}",
            [f"data.root={root}", f"model.teacher={teacher}", "optim.epochs=1", "optim.warmup_epochs=0.1", "train.log_every=5",
             f"train.compile={str(compile_).lower()}", "train.progress=false", "train.tensorboard=false"],
            # the loader sizes its workers and DALI threads itself (DataConfig's worker budget)
        )
        res[f"ratio_loop_vs_compute_only_{tag}"] = (res[f"loop_dali_{tag}"]["images_per_s"]
                                                    / res[f"compute_only_{tag}"]["images_per_s"])
    return res


def ms(v: float | None, digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown_rows(res: dict) -> list[str]:
    hw = res["hardware"]
    rows = []
    c = res.get("cpu")
    if c:
        rows.append(
            f"| train step, tiny ViT, CPU ({hw['cpu']}, {hw['cores']} cores) | loop DALI {c['loop_dali']['images_per_s']:.1f} img/s "
            f"= {c['ratio_loop_dali_vs_compute_only']:.2f} x compute-only on the loop's {c['compute_only']['threads']} "
            f"thread(s) ({c['compute_only']['images_per_s']:.1f}; {len(c['rounds'])} alternated rounds "
            f"{c['ratio_range'][0]:.2f}-{c['ratio_range'][1]:.2f}), {c['ratio_loop_dali_vs_compute_only_all_cores']:.2f} x "
            f"on all {c['compute_only_all_cores']['threads']} ({c['compute_only_all_cores']['images_per_s']:.1f}; "
            f"{c['ratio_all_cores_range'][0]:.2f}-{c['ratio_all_cores_range'][1]:.2f}; the data layer's CPU bounds any loop "
            f"there at {c.get('ratio_bound_all_cores') or float('nan'):.2f}); "
            f"main-thread CPU per batch in the DALI loader {c['main_thread_cpu']['batch8']['ms_per_batch_median']:.2f} ms "
            f"(batch 8), {c['main_thread_cpu']['batch128']['ms_per_batch_median']:.2f} ms (batch 128, speckle on the device); "
            f"the whole data layer {ms(c['main_thread_cpu']['batch8'].get('data_layer_cpu_ms_per_batch'), 1)} ms of CPU "
            f"per batch of 8 (speckle in the worker); the worker processes "
            f"{ms(c['main_thread_cpu']['batch128'].get('worker_cpu_ms_per_sample'), 2)} ms per sample at batch 128 with "
            f"speckle on the device (a GPU node's workers); "
            f"{c['ratio_dali_vs_torch_loader']:.2f} x DataLoader+OpenCV loop ({c['loop_torch']['images_per_s']:.1f}); "
            f"data wait {100 * c['loop_dali']['data_wait_frac']:.1f} % (torch loader {100 * c['loop_torch']['data_wait_frac']:.1f} %); "
            f"MFU {100 * (c['loop_dali']['mfu'] or 0):.1f} % of measured matmul rate |")
    g = res.get("gpu")
    if g:
        for tag in ("eager", "compile"):
            co, lp = g[f"compute_only_{tag}"], g[f"loop_dali_{tag}"]
            rows.append(
                f"| SALT step ViT-B/16 bf16 {tag}, batch 128, {hw['gpu']} | loop {lp['images_per_s']:.0f} img/s "
                f"= {g[f'ratio_loop_vs_compute_only_{tag}']:.2f} x compute-only ({co['images_per_s']:.0f}); data wait "
                f"{100 * lp['data_wait_frac']:.1f} %; MFU loop {100 * (lp['mfu'] or 0):.1f} %, compute-only "
                f"{100 * (co['mfu'] or 0):.1f} %; peak mem {co['peak_mem_gb']:.1f} GiB |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--cpu-steps", type=int, default=48, help="steps of the CPU loop (batch 8)")
    p.add_argument("--gpu-steps", type=int, default=30, help="steps of each GPU loop (batch 128)")
    p.add_argument("--rounds", type=int, default=3, help="CPU: alternated rounds of the ceilings and the DALI loop")
    p.add_argument("--skip-cpu", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"benchmark": "train", "hardware": hardware(), "time": utc_now()}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        if not a.skip_cpu:
            res["cpu"] = bench_cpu(Path(tmp), a.cpu_steps, a.rounds)
        if torch.cuda.is_available():
            res["gpu"] = bench_gpu(Path(tmp), a.gpu_steps)
    rows = markdown_rows(res)
    suffix = "gpu" if torch.cuda.is_available() else "cpu"
    save_result(out, f"bench_train_{suffix}", res, "| benchmark | result |\n|---|---|\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
