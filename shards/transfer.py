"""Host → device copies that never make the host wait for the GPU (pinned memory, ``non_blocking``)."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor → ``device`` without making the host wait on a GPU: through pinned memory (the DataLoader
    already pins its batches; DALI's records and small parameter arrays are pinned here) and a
    ``non_blocking`` copy. A pageable copy would wait for the stream's queued work (a host↔device sync)."""
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
