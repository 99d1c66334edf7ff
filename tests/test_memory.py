"""Bytes per parameter by role (llama_recipe/memory.py), against what each optimizer must hold."""

from __future__ import annotations

import pytest
from conftest import one_rank_process_group

from llama_recipe.cli import parse_args
from llama_recipe.config import TrainConfig
from llama_recipe.memory import state_memory
from llama_recipe.model import get_model_config
from llama_recipe.planner import Hardware, Layout, Shape, fit_warning, predict, state_bytes


@pytest.mark.parametrize(
    "optimizer, expected",
    [
        ("adamw", dict(weights=4, gradients=4, optimizer=8)),
        ("sgd", dict(weights=4, gradients=4)),
        ("inplace_sgd", dict(weights=4)),  # each gradient applied and freed inside backward
    ],
)
def test_fp32_state_bytes_per_parameter(optimizer, expected):
    """fp32 AdamW: 4-byte weights, 4-byte gradients, two 4-byte moments; SGD keeps no state. Megatron's fp32 row
    is 16 bytes, with one data-parallel rank the same with its distributed optimizer."""
    cfg = TrainConfig.for_script("benchmark", config="tiny", plugin="ddp", mixed_precision="fp32", max_length=32,
                                 batch_size=1, optimizer=optimizer)  # fmt: skip
    with one_rank_process_group():
        memory = state_memory(cfg)
    measured = memory["bytes_per_parameter"]
    for role in ["weights", "gradients", "optimizer"]:
        # buffers (the rotary frequencies) and the step counters add a few bytes per million parameters
        assert measured[role] == pytest.approx(expected.get(role, 0), abs=1e-3), measured
    # the planner's prediction, byte for byte
    layout = Layout("ddp", 1, precision="fp32", optimizer=optimizer)
    assert state_bytes(Shape.of(get_model_config("tiny")), layout) == memory["bytes"]
    assert memory["megatron_without_distributed_optimizer"] == memory["megatron_distributed_optimizer"] == 16


def test_planner_activation_peak_within_15_percent():
    """tiny at -l 256, each recompute mode, and at -l 32: the highest the allocator's record rose during a training
    forward/backward (tests/memory_probe.py) against planner.activation_bytes. Measured once at -l 1024 and
    2048 and for small: docs/planning.md."""
    from memory_probe import activation_peak

    from llama_recipe.planner import activation_bytes

    shape = Shape.of(get_model_config("tiny"))
    with one_rank_process_group():
        # -l 32: fewer tokens than the hidden size, so the loss's V x h weight-gradient product is its peak
        for mode, length in [("none", 256), ("selective", 256), ("full", 256), ("full", 32)]:
            argv = ["-c", "tiny", "-l", str(length), "-b", "1", "-p", "ddp", "-x", "fp32", "--recompute", mode]
            measured = activation_peak(argv)["activation_peak"]
            predicted = activation_bytes(shape, Layout("ddp", 1, recompute=mode, precision="fp32"), length)
            assert abs(predicted / measured - 1) <= 0.15, (mode, predicted, measured)


def test_fit_warning_names_a_layout_that_fits():
    """A run predicted above the device's memory: one line with the prediction by role and the flags of a layout
    of the same devices and global batch that the planner puts under it; on a device large enough, nothing.
    (That pretrain.py prints it: test_attention.py's document-attention run, with --device_memory.)"""
    run = ["-c", "tiny", "-l", "128", "-b", "2", "-p", "zero2", "-x", "fp32"]
    shape, hw = Shape.of(get_model_config("tiny")), Hardware()
    peak = predict(shape, Layout.of(parse_args("pretrain", run), 1)[0], 128, 2, hw)["peak_gb"]
    assert fit_warning(parse_args("pretrain", run), shape, 128, 1, peak, ["ddp", "zero2"]) is None
    warning = fit_warning(parse_args("pretrain", run), shape, 128, 1, 0.12, ["ddp", "zero2"])
    assert warning.startswith(f"warning: predicted peak {peak:.3g} GB per device exceeds this device's 0.12 GB (")
    assert "\n" not in warning and "weights" in warning and "activations" in warning
    layout, microbatches = Layout.of(parse_args("pretrain", [*run, *warning.split(": try ")[1].split()]), 1)
    assert layout.microbatch_size * microbatches == 2
    assert predict(shape, layout, 128, 2, hw)["peak_gb"] <= 0.12
