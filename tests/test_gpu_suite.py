"""benchmarks.gpu_suite --dry-run: every section on the CPU with tiny sizes, in a fresh interpreter, where
webdataset and DALI cannot be imported (the lent GPU machine) and, when DALI is installed, with it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Runs the suite with imports of the packages the lent GPU machine lacks made to fail.
BLOCKED = textwrap.dedent("""
    import sys
    class Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("webdataset", "braceexpand", "nvidia", "torchvision", "timm"):
                raise ImportError(f"{name} is blocked (not on the GPU machine)")
    sys.meta_path.insert(0, Blocked())
    from benchmarks import gpu_suite
    raise SystemExit(gpu_suite.main(sys.argv[1:]))
""")


def run_suite(out, *args, blocked: bool) -> dict:
    cmd = [sys.executable, "-c", BLOCKED] if blocked else [sys.executable, "-m", "benchmarks.gpu_suite"]
    done = subprocess.run(cmd + ["--dry-run", "--out", str(out), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_suite.json").read_text())
    md = (out / "gpu_suite.md").read_text()
    assert report["dry_run"] is True and "DRY RUN" in md
    assert report["env"]["cpu"] in md  # the device is named
    return report


def test_dry_run_without_webdataset_and_dali(tmp_path):
    r = run_suite(tmp_path, blocked=True)
    assert r["env"]["dali"] is None and "dali" in r["skipped"] and "torch_gpu_decode" in r["skipped"]
    syn = r["loader"]["synthetic"]
    assert set(syn) == {"torch", "torch_worker_speckle", "plain_dataloader_opencv"}
    for res in syn.values():
        assert res["images"] > 0 and res["images_per_s"] > 0 and res["ratio_vs_plain"] > 0
    for tag in ("eager", "compile"):
        co, lp = r["salt"][tag]["compute_only"], r["salt"][tag]["loop"]
        assert co["images_per_s"] > 0 and lp["images_per_s"] > 0 and 0 <= lp["data_wait_frac"] < 1
        assert lp["intervals"] >= 1 and lp["mfu"] > 0
    assert r["salt"]["loader_backend"] == "torch"
    for key in ("compute_only_eager", "compute_only_compile", "loop_eager"):
        assert r["stage1"][key]["images_per_s"] > 0
    assert "skipped" in r["sync"]  # needs CUDA
    assert r["speckle"]["worker_host_ms_per_batch"] > 0 and r["speckle"]["device_ms_per_batch"] > 0


def test_dry_run_measures_dali_when_it_is_importable(tmp_path):
    from usjepa.shards.loader import dali_available

    if not dali_available():
        pytest.skip("DALI is not installed here")
    r = run_suite(tmp_path, "--only", "loader", blocked=False)
    assert r["env"]["dali"] and "dali" not in r["skipped"]
    assert r["loader"]["synthetic"]["dali"]["images_per_s"] > 0
    assert r["loader"]["synthetic"]["dali_worker_speckle"]["images_per_s"] > 0


def test_a_section_that_does_not_fit_the_budget_is_skipped_with_its_reason(tmp_path):
    r = run_suite(tmp_path, "--only", "salt,speckle", "--budget-s", "8", blocked=True)
    assert "salt" in r["skipped"] and "budget" in r["skipped"]["salt"]
    assert "speckle" in r  # small enough for what was left


def test_without_cuda_and_without_dry_run_it_is_a_usage_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--dry-run" in done.stderr
