"""Gemini needs CUDA. On CPU we check that our flags reach GeminiPlugin correctly and that
`-p gemini` fails with a clear message; with a GPU the real training run is checked too."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    TINY_RUN,
    check_ok,
    expect_one_line_error,
    launch,
    one_rank_process_group,
    read_scalars,
    run_in_process,
)


def test_gemini_plugins_are_built_from_our_flags():
    from colossalai.booster import Booster

    from llama_recipe.config import TrainConfig
    from llama_recipe.plugins import create_plugin

    with one_rank_process_group():
        for name, placement in [("gemini", "static"), ("gemini_auto", "auto")]:
            values = dict(plugin=name, grad_clip=0.5, offload_optim_frac=0.25, gemini_warmup_ratio=0.6)
            plugin, booster_precision = create_plugin(TrainConfig.for_script("pretrain", **values), "bf16")
            Booster(plugin=plugin)  # the booster accepts it on this machine too
            assert type(plugin).__name__ == "GeminiPlugin"
            assert plugin.gemini_config["placement_policy"] == placement
            assert plugin.gemini_config["mixed_precision"] == torch.bfloat16
            assert {**plugin.zero_optim_config, **plugin.optim_kwargs}["max_norm"] == 0.5  # --grad_clip reaches it
            assert booster_precision is None  # Gemini manages precision itself
            if name == "gemini":  # the placement flags reach it
                assert plugin.gemini_config.get("offload_optim_frac") == 0.25
            else:
                assert plugin.gemini_config.get("warmup_non_model_data_ratio") == 0.6


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
@pytest.mark.parametrize("plugin", ["gemini", "gemini_auto"])
def test_gemini_on_cpu_is_a_clear_error(tmp_path, plugin):
    proc = run_in_process("pretrain.py", [*TINY_RUN, "-p", plugin, "-o", str(tmp_path / "ckpt")])
    expect_one_line_error(proc, "needs CUDA", "ddp", "zero2", "zero2_cpu", "hybrid_parallel")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.gpu
@pytest.mark.multiprocess
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Gemini trains only on CUDA devices")
@pytest.mark.parametrize("plugin", ["gemini", "gemini_auto"])
def test_gemini_trains_saves_and_resumes_on_gpu(tmp_path, plugin):
    nproc = min(2, torch.cuda.device_count())
    common = [*TINY_RUN, "-p", plugin, "-x", "bf16", "--max_steps", "6", "-o", str(tmp_path / "ckpt")]
    check_ok(launch("pretrain.py", [*common, "-i", "3", "-t", str(tmp_path / "tb")], nproc=nproc))
    resumed = launch(
        "pretrain.py",
        [*common, "-i", "0", "-t", str(tmp_path / "tb2"), "-f", str(tmp_path / "ckpt" / "step-3")],
        nproc=nproc,
    )
    check_ok(resumed)
    losses, resumed_losses = read_scalars(tmp_path / "tb"), read_scalars(tmp_path / "tb2")
    assert losses[6] < losses[1]
    assert sorted(resumed_losses) == [4, 5, 6]
    assert resumed_losses[4] == pytest.approx(losses[4], rel=1e-2)  # bf16 on GPU: close, not bit-exact
