"""Write ``requirements.lock``: the exact versions ``make install`` (and so CI) installs.

    python tools/lock.py            # what `make lock` runs; needs network access to the package index

``pyproject.toml`` keeps version ranges for people who install usjepa into their own environment; the lock
pins every other package of ``[project] dependencies`` + the ``dev`` extra (and what they pull in) for
Python >= 3.10 on every platform (``uv pip compile --universal``), so that a fresh clone gets the versions the
suite last passed with instead of whatever was released that morning. torch is left out on purpose: the
Makefile installs it first (``TORCH=...``: a CPU build in CI, a CUDA build on a GPU machine) and the lock
must not drag a different build's dependencies in.

The first line records a hash of pyproject's dependency lists; ``tests/test_lock.py`` fails when pyproject
changed without a new lock, or when a pin falls outside its range.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
UNLOCKED = {"torch"}  # installed before the lock applies (Makefile TORCH=...)
EXTRAS = ("dev",)


def requirement_name(req: str) -> str:
    """The normalised distribution name of a requirement string (``opencv-python-headless>=4.8`` ->
    ``opencv-python-headless``)."""
    name = req.split(";")[0]
    for sep in "<>=!~[ ":
        name = name.split(sep)[0]
    return name.strip().lower().replace("_", "-")


def locked_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """pyproject's dependencies + the locked extras, as written there."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return reqs


def dependencies_hash(pyproject: Path = REPO / "pyproject.toml") -> str:
    """sha256 over pyproject's dependency lists (torch's range included: a new floor must be re-locked)."""
    text = "\n".join(sorted(r.strip() for r in locked_requirements(pyproject)))
    return hashlib.sha256(text.encode()).hexdigest()


def header(pyproject: Path = REPO / "pyproject.toml") -> str:
    return f"# dependencies-sha256: {dependencies_hash(pyproject)}\n"


def main() -> int:
    reqs = [r for r in locked_requirements() if requirement_name(r) not in UNLOCKED]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "requirements.in"
        src.write_text("\n".join(reqs) + "\n")
        out = Path(tmp) / "requirements.lock"
        cmd = [sys.executable, "-m", "uv", "pip", "compile", str(src), "--universal", "--python-version", "3.10",
               "--no-emit-package", "torch", "--custom-compile-command", "make lock", "-o", str(out), "--quiet"]
        subprocess.run(cmd, check=True)
        body = out.read_text().replace(str(src), "pyproject.toml (dependencies + dev, without torch)")
    LOCK.write_text(header() + body)
    print(f"wrote {LOCK.relative_to(REPO)} ({sum(1 for l in body.splitlines() if '==' in l)} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
