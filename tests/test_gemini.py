"""Gemini needs CUDA. On CPU we check that our flags reach GeminiPlugin correctly and that
`-p gemini` fails with a clear message; with a GPU the real training run is checked too."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_RUN, check_ok, expect_one_line_error, read_scalars, run_script, script_env

CONSTRUCT = """
import json, torch
from llama_recipe.config import TrainConfig
from llama_recipe.plugins import create_plugin, launch
from colossalai.booster import Booster
launch(seed=0)
out = {}
for name in ["gemini", "gemini_auto"]:
    cfg = TrainConfig(plugin=name, grad_clip=0.5, offload_optim_frac=0.25, gemini_warmup_ratio=0.6)
    plugin, booster_precision = create_plugin(cfg, "bf16")
    Booster(plugin=plugin)  # the booster accepts it on this machine too
    out[name] = dict(
        cls=type(plugin).__name__, placement=plugin.gemini_config["placement_policy"], precision=str(plugin.gemini_config["mixed_precision"]),
        max_norm={**plugin.zero_optim_config, **plugin.optim_kwargs}["max_norm"], booster_precision=booster_precision,
        offload_optim_frac=plugin.gemini_config.get("offload_optim_frac"),
        warmup_ratio=plugin.gemini_config.get("warmup_non_model_data_ratio"),
    )
print("RESULT" + json.dumps(out))
"""


def test_gemini_plugins_are_built_from_our_flags():
    proc = subprocess.run(
        [sys.executable, "-c", CONSTRUCT], cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300
    )
    check_ok(proc)
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    for name, placement in [("gemini", "static"), ("gemini_auto", "auto")]:
        assert result[name]["cls"] == "GeminiPlugin"
        assert result[name]["placement"] == placement
        assert result[name]["precision"] == str(torch.bfloat16)
        assert result[name]["max_norm"] == 0.5  # --grad_clip reaches the plugin
        assert result[name]["booster_precision"] is None  # Gemini manages precision itself
    assert result["gemini"]["offload_optim_frac"] == 0.25  # the benchmark's placement flags reach it
    assert result["gemini_auto"]["warmup_ratio"] == 0.6


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
@pytest.mark.parametrize("plugin", ["gemini", "gemini_auto"])
def test_gemini_on_cpu_is_a_clear_error(tmp_path, plugin):
    proc = run_script("pretrain.py", [*TINY_RUN, "-p", plugin, "-o", str(tmp_path / "ckpt")])
    expect_one_line_error(proc, "needs CUDA", "ddp", "zero2", "zero2_cpu", "hybrid_parallel")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Gemini trains only on CUDA devices")
@pytest.mark.parametrize("plugin", ["gemini", "gemini_auto"])
def test_gemini_trains_saves_and_resumes_on_gpu(tmp_path, plugin):
    nproc = min(2, torch.cuda.device_count())
    common = [*TINY_RUN, "-p", plugin, "-x", "bf16", "--max_steps", "6", "-o", str(tmp_path / "ckpt")]
    check_ok(run_script("pretrain.py", [*common, "-i", "3", "-t", str(tmp_path / "tb")], nproc=nproc))
    resumed = run_script(
        "pretrain.py",
        [*common, "-i", "0", "-t", str(tmp_path / "tb2"), "-f", str(tmp_path / "ckpt" / "step-3")],
        nproc=nproc,
    )
    check_ok(resumed)
    losses, resumed_losses = read_scalars(tmp_path / "tb"), read_scalars(tmp_path / "tb2")
    assert losses[6] < losses[1]
    assert sorted(resumed_losses) == [4, 5, 6]
    assert resumed_losses[4] == pytest.approx(losses[4], rel=1e-2)  # bf16 on GPU: close, not bit-exact
