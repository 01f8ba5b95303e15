"""Shared test fixtures. Area-specific helpers live in the area's own test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REALDATA = Path(os.environ.get("USJEPA_REALDATA", REPO.parent / "shared" / "realdata"))

# Two cores in CI: keep torch from oversubscribing when several workers run.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The real ultrasound samples (../shared/realdata); tests using it skip cleanly when it is absent."""
    if not (REALDATA / "pocus").is_dir() or not (REALDATA / "busi").is_dir():
        pytest.skip(f"real data not found at {REALDATA}")
    return REALDATA
