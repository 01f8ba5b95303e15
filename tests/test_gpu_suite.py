"""benchmarks.gpu_suite --dry-run: every section on the CPU with tiny sizes, in a fresh interpreter, with what
the reference offline CUDA machine lacks after the carried install made unimportable (DALI unless staged, the medical
readers) and, when DALI is installed, with it. Plus: the call brings every project dependency the machine
lacks that the suite needs, and the suite says so in one line when webdataset is missing."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _names(path: Path) -> set[str]:
    """Distribution names (normalised) of a one-a-line list, pins and comments dropped."""
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {re.split(r"[=<>!~;\[ ]", line)[0].lower().replace("_", "-") for line in lines if line}


DEVICE_HAS = _names(REPO / "tools/gpu-device-packages.txt")  # the machine's image
CALL_BRINGS = _names(REPO / "tools/gpu-call-wheels.txt")  # .gpu-wheels, installed by tools/gpu-call.sh
# The project's dependencies that neither the machine nor its call has, by the module they are imported as.
# DALI comes only with the staged parts (tools/stage-gpu-wheels.sh); the medical readers are ingest's alone.
ABSENT_ON_DEVICE = {"nvidia-dali-cuda120": "nvidia.dali", "nibabel": "nibabel", "pydicom": "pydicom", "pynrrd": "nrrd"}

# Runs the suite with imports of the modules named in argv[1] (comma-separated) made to fail.
BLOCKED = textwrap.dedent("""
    import sys
    blocked = sys.argv.pop(1).split(",")
    class Blocked:
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in blocked):
                raise ImportError(f"{name} is blocked (not on the GPU machine)")
    sys.meta_path.insert(0, Blocked())
    from benchmarks import gpu_suite
    raise SystemExit(gpu_suite.main(sys.argv[1:]))
""")
MISSING_AFTER_THE_CALL = sorted(ABSENT_ON_DEVICE.values())  # the dry runs block these (DALI not staged)


def _project_dependencies() -> set[str]:
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    return {re.split(r"[=<>!~;\[ ]", d)[0].lower() for d in re.findall(r'"([^"]+)"', block)}


def test_the_call_brings_what_the_device_lacks_and_their_needs_are_there():
    lacking = _project_dependencies() - DEVICE_HAS - CALL_BRINGS
    # a new dependency the machine lacks: bring it (tools/gpu-call-wheels.txt) or, if the suite never imports
    # it, name it in ABSENT_ON_DEVICE so that the dry run below proves that
    assert lacking == set(ABSENT_ON_DEVICE), lacking ^ set(ABSENT_ON_DEVICE)
    assert not CALL_BRINGS & DEVICE_HAS  # two versions of one package would stop the --target install
    for name in CALL_BRINGS:  # installed with --no-deps there: each one's own needs must be there or brought
        needs = [r for r in importlib.metadata.requires(name) or [] if "extra ==" not in r]
        missing = {re.split(r"[=<>!~;\[ (]", r)[0].lower() for r in needs} - DEVICE_HAS - CALL_BRINGS
        assert not missing, f"{name} needs {missing}, neither on the GPU machine nor in tools/gpu-call-wheels.txt"


def dry_run(out, *args, blocked: list[str] | None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "benchmarks.gpu_suite"]
    if blocked is not None:
        cmd = [sys.executable, "-c", BLOCKED, ",".join(blocked)]
    return subprocess.run(cmd + ["--dry-run", "--out", str(out), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=400)


def run_suite(out, *args, blocked: list[str] | None) -> dict:
    done = dry_run(out, *args, blocked=blocked)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_suite.json").read_text())
    md = (out / "gpu_suite.md").read_text()
    assert report["dry_run"] is True and "DRY RUN" in md
    assert report["env"]["cpu"] in md  # the device is named
    return report


def test_dry_run_with_what_the_device_call_has(tmp_path):
    r = run_suite(tmp_path, blocked=MISSING_AFTER_THE_CALL)
    assert r["env"]["webdataset"]  # the shard writer's, brought by the call
    assert r["env"]["dali"] is None and "dali" in r["skipped"] and "torch_gpu_decode" in r["skipped"]
    syn = r["loader"]["synthetic"]
    assert set(syn) == {"torch", "torch_worker_speckle", "plain_dataloader_opencv"}
    for res in syn.values():
        assert res["images"] > 0 and res["images_per_s"] > 0 and res["ratio_vs_plain"] > 0
    for tag in ("eager", "compile"):
        co, lp = r["salt"][tag]["compute_only"], r["salt"][tag]["loop"]
        assert co["images_per_s"] > 0 and lp["images_per_s"] > 0 and 0 <= lp["data_wait_frac"] < 1
        assert lp["intervals"] >= 1 and lp["mfu"] > 0
        # MFU counts real tokens only; the padded count beside it is larger; warm-up steps are not measured
        assert 0 < co["mfu"] < co["mfu_padded"] and 0 < lp["mfu"] < lp["mfu_padded"] and co["packed"]
        assert lp["steady_steps"] == r["sizes"]["loop_steps"] - r["sizes"]["warmup_steps"]
    pr = r["profile"]  # the compiled packed step's time split by what the kernels compute
    assert pr["compiled"] and abs(sum(pr["share"].values()) - 1) < 1e-6
    assert pr["share"]["matmul"] > 0 and pr["share"]["attention"] > 0 and pr["share"]["norm+elementwise"] > 0
    assert "| profile |" in (tmp_path / "gpu_suite.md").read_text()
    assert r["salt"]["loader_backend"] == "torch"
    for key in ("compute_only_eager", "compute_only_compile", "loop_eager"):
        assert r["stage1"][key]["images_per_s"] > 0
    assert "skipped" in r["sync"]  # needs CUDA
    assert r["speckle"]["worker_host_ms_per_batch"] > 0 and r["speckle"]["device_ms_per_batch"] > 0


def test_dry_run_measures_dali_when_it_is_importable(tmp_path):
    from usjepa.shards.loader import dali_available

    if not dali_available():
        pytest.skip("DALI is not installed here")
    r = run_suite(tmp_path, "--only", "loader", blocked=None)
    assert r["env"]["dali"] and "dali" not in r["skipped"]
    assert r["loader"]["synthetic"]["dali"]["images_per_s"] > 0
    assert r["loader"]["synthetic"]["dali_worker_speckle"]["images_per_s"] > 0


def test_a_section_that_does_not_fit_the_budget_is_skipped_with_its_reason(tmp_path):
    r = run_suite(tmp_path, "--only", "salt,speckle", "--budget-s", "8", blocked=MISSING_AFTER_THE_CALL)
    assert "salt" in r["skipped"] and "budget" in r["skipped"]["salt"]
    assert "speckle" in r  # small enough for what was left


def test_without_cuda_and_without_dry_run_it_is_a_usage_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--dry-run" in done.stderr


def test_without_webdataset_it_says_so_in_one_line(tmp_path):
    done = dry_run(tmp_path, blocked=MISSING_AFTER_THE_CALL + ["webdataset"])
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "webdataset" in done.stderr and ".gpu-wheels" in done.stderr
    assert not (tmp_path / "gpu_suite.json").exists()


def test_parts_stashed_one_transfer_at_a_time_are_joined_and_unpacked(tmp_path):
    """tools/gpu-call.sh on a machine where each transfer replaces what the previous one carried: every part
    is moved out (--stash) as it arrives, and the last call joins them all, its own included."""
    import io
    import lzma
    import tarfile

    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w") as tf:
        data = bytes(range(256)) * 400  # 100 KiB, so that it spans three parts
        info = tarfile.TarInfo("gpu-site/probe.bin")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    blob = lzma.compress(payload.getvalue(), preset=0)
    size = -(-len(blob) // 3)
    parts = [blob[i : i + size] for i in range(0, len(blob), size)]
    assert len(parts) == 3
    env = {**__import__("os").environ, "GPU_CARRIED": str(tmp_path / "carried"), "GPU_PARTS": str(tmp_path / "stash"),
           "GPU_SITE": str(tmp_path / "site")}
    script = str(REPO / "tools" / "gpu-call.sh")
    for i, part in enumerate(parts):
        carried = tmp_path / "carried"
        if carried.exists():  # the next transfer replaces the checkout's carried paths
            import shutil

            shutil.rmtree(carried)
        (carried / f"{i:02d}").mkdir(parents=True)
        (carried / f"{i:02d}" / f"part.{i:02d}").write_bytes(part)
        args = ["--stash"] if i < len(parts) - 1 else ["--unpack-only"]
        done = subprocess.run(["bash", script, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "gpu-site" / "probe.bin").read_bytes() == data
    assert not (tmp_path / "stash").exists()  # joined and removed
    assert "unpacking the parts failed" not in done.stdout
