"""The steady-state training step makes no host↔device sync (CUDA only; skipped without a GPU), and the data
wait timer pairs its marks (CPU)."""

from __future__ import annotations

import time

import pytest
import torch

from usjepa.data_wait import DataWaitTimer
from usjepa.shards.synthetic_shards import write_synthetic_corpus

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.set_sync_debug_mode)")


@cuda
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_salt_step_under_sync_debug_mode_error(tmp_path, backend):
    from benchmarks.gpu_checks import salt_steps_without_sync
    from usjepa.models import PredictorConfig
    from usjepa.shards.loader import build_loader, dali_available

    if backend == "dali" and not dali_available():
        pytest.skip("DALI is not installed here")
    root = write_synthetic_corpus(tmp_path, {"a": 48}, size=(120, 160), per_shard=16, seed=0)
    loader = build_loader(root, "train", 8, {"num_workers": 1, "cap": None, "speckle_p": 1.0}, None,
                          device="cuda", backend=backend)
    try:
        res = salt_steps_without_sync(loader, torch.device("cuda"), "vit_test_tiny", PredictorConfig(48, 2, 2),
                                      bf16=True)
    finally:
        loader.close()
    assert res["ok"], res["error"]
    assert res["loss_finite"] and res["data_wait_s"] >= 0


@cuda
def test_sync_debug_mode_catches_a_sync():
    """The check can fail: an .item() in the step raises under the same mode."""
    x = torch.ones(4, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):
            x.sum().item()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_data_wait_timer_pairs_marks_on_cpu():
    t = DataWaitTimer(torch.device("cpu"))
    t.batch_ready()  # no step_done before it: nothing to pair
    assert t.take() == 0.0
    t.step_done()
    time.sleep(0.02)
    t.batch_ready()
    t.batch_ready()  # a second mark without a new step_done adds nothing
    waited = t.take()
    assert waited >= 0.02
    assert t.take() == 0.0  # take() resets
