"""What every benchmark reports besides its figure: the hardware it ran on, and its JSON + markdown files."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict:
    """CPU model, cores, GPU name (None without CUDA) and the versions that move the numbers."""
    import torch  # here, not at import: bench_masks times its own imports in a fresh interpreter

    try:
        from nvidia import dali
        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "dali": dali_version}


def hardware_line(hw: dict) -> str:
    """The hardware as a markdown cell: ``CPU model, N cores[, GPU name]``."""
    return f"{hw['cpu']}, {hw['cores']} cores" + (f", {hw['gpu']}" if hw.get("gpu") else "")


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def save_result(out_dir: str | os.PathLike, name: str, record: dict, markdown: str) -> Path:
    """Write ``out_dir/name.json`` and ``out_dir/name.md`` (a table: header, separator, rows) and print both."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, default=str)
    markdown = markdown.rstrip("\n") + "\n"
    (out / f"{name}.json").write_text(text + "\n")
    (out / f"{name}.md").write_text(markdown)
    print(text)
    print(markdown, end="")
    return out / f"{name}.json"
