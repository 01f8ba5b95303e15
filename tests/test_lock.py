"""requirements.lock agrees with pyproject.toml: re-locked after every dependency change, every pin inside
its range, and the GPU machines' preinstalled versions still inside the ranges."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import lock  # noqa: E402  (tools/lock.py: one definition of what is locked and of the hash)


def _pins(text: str) -> dict[str, list[tuple[Version, Marker | None]]]:
    pins: dict[str, list] = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if "==" not in line:
            continue
        spec, _, marker = line.partition(";")
        name, version = spec.split("==")
        pins.setdefault(lock.requirement_name(name), []).append(
            (Version(version.strip()), Marker(marker.strip()) if marker.strip() else None))
    return pins


def test_lock_was_made_from_this_pyproject():
    first = lock.LOCK.read_text().splitlines()[0] + "\n"
    assert first == lock.header(), "pyproject.toml's dependencies changed since requirements.lock: run `make lock`"


def test_every_dependency_is_pinned_inside_its_range():
    pins = _pins(lock.LOCK.read_text())
    assert "torch" not in pins  # the Makefile installs torch first, CPU or CUDA build
    for text in lock.locked_requirements():
        req = Requirement(text)
        name = lock.requirement_name(text)
        if name in lock.UNLOCKED or (req.marker is not None and not req.marker.evaluate()):
            continue
        here = [v for v, m in pins.get(name, []) if m is None or m.evaluate()]
        assert len(here) == 1, f"{name}: {len(here)} pins apply to this interpreter in requirements.lock"
        assert req.specifier.contains(here[0], prereleases=True), f"{name}=={here[0]} is outside {req.specifier}"


@pytest.mark.parametrize("name,version", [("torch", "2.11.0"), ("numpy", "2.5.2")])
def test_gpu_machine_versions_stay_inside_the_ranges(name, version):
    """A CUDA machine's image comes with its own torch and numpy (torch 2.11.0+cu130 and numpy 2.5.2 on the
    H200 machine measured in docs/benchmarks.md); raising a floor above them breaks installs there."""
    req = next(Requirement(r) for r in lock.locked_requirements() if lock.requirement_name(r) == name)
    assert req.specifier.contains(version)


def test_python_3_12_is_allowed():
    requires = lock.tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(requires).contains("3.12.3") and SpecifierSet(requires).contains("3.10.0")
