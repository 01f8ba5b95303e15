"""The training step's set-up (usjepa.step): compile by default only on CUDA, the batch size from memory."""

from __future__ import annotations

import logging

import torch

from usjepa.config import ConfigError, load_config
from usjepa.step import batch_size_from_memory, compile_models, fit_batch_size

GIB = 2**30


def test_batch_from_memory_extrapolates_two_probes_to_the_budget():
    # a step whose peak is 3 GiB fixed + 0.125 GiB per image, AdamW's moments 1 GiB, 80 % of 141 GiB
    peak = lambda b: 3 * GIB + b * GIB / 8  # noqa: E731
    b = fit_batch_size((8, 16), (peak(8), peak(16)), 1 * GIB, 0.8 * 141 * GIB)
    assert b % 8 == 0 and peak(b) + GIB <= 0.8 * 141 * GIB < peak(b + 8) + GIB
    assert b == 864  # (0.8 x 141 - 4) GiB / (1/8 GiB) = 870.4 -> 864
    assert fit_batch_size((8, 16), (peak(8), peak(16)), 0, 2 * GIB) == 8  # never below one multiple


def test_batch_from_memory_is_checked_and_keeps_the_batch_without_cuda(tmp_path, caplog):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model:\n  teacher: t.safetensors\ntrain:\n  batch_from_memory: 1.5\n")
    try:
        load_config(cfg_file, [])
        raise AssertionError("a fraction above 1 was accepted")
    except ConfigError as e:
        assert "batch_from_memory" in str(e)
    cfg = load_config(cfg_file, ["train.batch_from_memory=0.8", "data.batch_size=24"])
    with caplog.at_level(logging.WARNING, logger="usjepa.train"):
        assert batch_size_from_memory(cfg, torch.device("cpu")) == 24
    assert "needs a CUDA device" in caplog.text


def test_compile_is_on_by_default_only_on_cuda():
    from usjepa.models import build_vit

    net, teacher = torch.nn.Linear(2, 2), build_vit("vit_test_tiny")
    assert compile_models(net, net, None, None, cuda=False) == (net, net, None)
    step, ev, compiled_teacher = compile_models(net, net, teacher, None, cuda=True)
    assert all(hasattr(m, "_orig_mod") for m in (step, ev))
    # the teacher is called through patch_tokens, not forward: that is what gets compiled
    assert compiled_teacher is teacher and hasattr(teacher.patch_tokens, "_torchdynamo_orig_callable")
    assert compile_models(net, net, None, False, cuda=True)[0] is net
    assert hasattr(compile_models(net, net, None, True, cuda=False)[0], "_orig_mod")
