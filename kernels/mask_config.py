"""Configuration of the multi-block JEPA masks and the input checks both mask samplers share.

`MaskConfig` holds the paper's values (US-JEPA Table 5, I-JEPA multi-block): one context block of scale
[0.85, 1.0] and aspect 1, four target blocks of scale [0.075, 0.125] and aspect [0.75, 1.5] on the 14 x 14
patch grid, at least 10 context patches. Masks keep their own lengths per image (``lengths="per_image"``,
padded with ``PAD`` = -1) unless ``lengths="batch_min"`` asks for the old cut to the batch's smallest mask;
``tgt_scale_of="valid"`` sizes each image's targets against its scan region. It is built from the trainer's YAML ``masks:`` section with
``MaskConfig.from_dict(d)`` (unknown keys are a clear error) or ``MaskConfig(**d)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

PAD = -1  # index of a padding slot in ctx_idx / tgt_idx: no patch
LENGTHS = ("per_image", "batch_min")
TGT_SCALE_OF = ("grid", "valid")


def _pair(name: str, value: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"MaskConfig.{name} must be a pair (low, high), got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"MaskConfig.{name} must be a finite pair with low <= high, got {value!r}")
    return lo, hi


@dataclass(frozen=True)
class MaskConfig:
    """Multi-block mask settings.

    grid: patches per side (224 / 16 = 14).
    n_targets: target blocks per image (T).
    ctx_scale, ctx_aspect: context block area as a fraction of the grid, and its height / width ratio.
    tgt_scale, tgt_aspect: the same for every target block.
    min_keep: at least this many context patches (after the targets are removed).
    tau: USrc acceptance threshold (paper Eqs. 3-4) as a fraction: a block is accepted only if
        ``|block ∩ valid| >= ceil(tau * min(block area, number of valid patches))``. The default 0.75 (three
        quarters of a target block is ultrasound) keeps targets on anatomy and sets the floor of the target
        length Kt; every valid patch stays reachable. docs/kernels.md has the measurements behind it.
    max_tries: random placements tried per block before the exact enumeration of all acceptable positions
        (same distribution, bounded cost), and whole-image attempts before the documented fallback.
    usrc: condition the blocks on the valid (ultrasound) patches; False is plain I-JEPA on the full grid.
    lengths: "per_image" keeps every mask whole and pads the batch's index tensors with PAD (-1);
        "batch_min" cuts every mask to the batch's smallest one (a random subset), as before: one small
        scan region then shortens every context of the batch (docs/kernels.md measures it).
    tgt_scale_of: "grid" sizes targets as tgt_scale x G² (I-JEPA), one size per batch; "valid" as
        tgt_scale x |valid patches| of each image, so a small scan region gets small targets.
    """

    grid: int = 14
    n_targets: int = 4
    ctx_scale: tuple[float, float] = (0.85, 1.0)
    ctx_aspect: tuple[float, float] = (1.0, 1.0)
    tgt_scale: tuple[float, float] = (0.075, 0.125)
    tgt_aspect: tuple[float, float] = (0.75, 1.5)
    min_keep: int = 10
    tau: float = 0.75
    max_tries: int = 20
    usrc: bool = True
    lengths: str = "per_image"
    tgt_scale_of: str = "grid"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise YAML lists to tuples once, here
        for name in ("ctx_scale", "ctx_aspect", "tgt_scale", "tgt_aspect"):
            set_(self, name, _pair(name, getattr(self, name)))
        for name in ("grid", "n_targets", "min_keep", "max_tries"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"MaskConfig.{name} must be a positive integer, got {value!r}")
            set_(self, name, int(value))
        set_(self, "tau", float(self.tau))
        set_(self, "usrc", bool(self.usrc))
        for name in ("ctx_scale", "tgt_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"MaskConfig.{name} must lie in (0, 1], got {(lo, hi)}")
        for name in ("ctx_aspect", "tgt_aspect"):
            if getattr(self, name)[0] <= 0.0:
                raise ValueError(f"MaskConfig.{name} must be positive, got {getattr(self, name)}")
        for name, allowed in (("lengths", LENGTHS), ("tgt_scale_of", TGT_SCALE_OF)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"MaskConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(
                f"MaskConfig.tau is a fraction of the block area in (0, 1], got {self.tau!r} "
                "(e.g. 0.5 = at least half of a block must be ultrasound)"
            )
        if self.min_keep + self.n_targets > self.grid * self.grid:
            raise ValueError(
                f"min_keep + n_targets = {self.min_keep + self.n_targets} patches cannot fit a "
                f"{self.grid}x{self.grid} grid"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "MaskConfig":
        """Build from a plain mapping (the YAML ``masks:`` section); unknown keys are an error."""
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MaskConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


def scale_aspect(u_scale: float, u_aspect: float, scale: tuple[float, float],
                 aspect: tuple[float, float]) -> tuple[float, float]:
    """A block's scale and aspect from two uniforms in [0, 1), drawn independently (I-JEPA reuses one
    uniform for both, so its big blocks are always its tall ones)."""
    return scale[0] + u_scale * (scale[1] - scale[0]), aspect[0] + u_aspect * (aspect[1] - aspect[0])


def block_hw(area: float, a: float, grid: int) -> tuple[int, int]:
    """(height, width) of a block of ``area`` patches and h / w = a: rounded half-up (floor(x + 0.5)),
    sides in [1, grid] (I-JEPA caps them at grid - 1). Plain arithmetic so that the Numba kernel compiles
    this same function; the kernel and the reference both size blocks here."""
    h = int(math.floor(math.sqrt(area * a) + 0.5))
    w = int(math.floor(math.sqrt(area / a) + 0.5))
    return min(max(h, 1), grid), min(max(w, 1), grid)


def block_size(u_scale: float, u_aspect: float, scale: tuple[float, float],
               aspect: tuple[float, float], grid: int) -> tuple[int, int]:
    """(height, width) of a block from two uniforms in [0, 1): area = scale * grid², h / w = aspect."""
    s, a = scale_aspect(u_scale, u_aspect, scale, aspect)
    return block_hw(s * grid * grid, a, grid)


def threshold(tau: float, block_area: int, n_valid: int) -> int:
    """USrc acceptance count of Eqs. 3-4: ceil(tau * min(block area, valid patches)), at least 1."""
    return max(1, int(math.ceil(tau * min(block_area, n_valid) - 1e-9)))


def check_inputs(valid: Any, cfg: MaskConfig, seed: Any) -> tuple[np.ndarray, int]:
    """Validate (valid grid, seed) and return the grid as a C-contiguous bool array [B, G, G]."""
    if not isinstance(cfg, MaskConfig):
        raise TypeError(f"cfg must be a MaskConfig, got {type(cfg).__name__} (use MaskConfig.from_dict)")
    if hasattr(valid, "detach"):  # a torch tensor, possibly on a GPU
        valid = valid.detach().cpu().numpy()
    arr = np.asarray(valid)
    if arr.ndim != 3 or arr.shape[1] != cfg.grid or arr.shape[2] != cfg.grid:
        raise ValueError(f"valid must have shape [B, {cfg.grid}, {cfg.grid}], got {arr.shape}")
    if arr.shape[0] < 1:
        raise ValueError("valid must hold at least one grid (B >= 1)")
    if arr.dtype != np.bool_:
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise ValueError(f"valid must be boolean (or 0/1 numbers), got dtype {arr.dtype}")
        arr = arr != 0
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return np.ascontiguousarray(arr, dtype=np.bool_), seed
