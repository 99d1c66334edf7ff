"""Every CPU-capable booster plugin really trains, saves, resumes and continues, 2 processes on CPU.

Each layout runs `pretrain.py` twice: 6 steps with a checkpoint at step 3, then a second launch
that resumes from step 3 and runs to step 6. The resumed steps must reproduce the uninterrupted
run's losses, and the losses must match a plain `transformers` forward of the saved weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DATA, REPO, TINY_RUN, check_ok, read_scalars, run_script

LAYOUTS = {
    "ddp": ["-p", "ddp"],
    "zero2": ["-p", "zero2"],
    "zero2_cpu": ["-p", "zero2_cpu"],
    "tp2": ["-p", "hybrid_parallel", "--tp", "2"],
    "pp2": ["-p", "hybrid_parallel", "--pp", "2"],
}
DP_SIZE = {"ddp": 2, "zero2": 2, "zero2_cpu": 2, "tp2": 1, "pp2": 1}
STEPS, SAVE_AT = 6, 3

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run each layout once (lazily) and share the result between the tests of this module."""
    cache = {}

    def get(layout: str) -> dict:
        if layout not in cache:
            root = tmp_path_factory.mktemp(layout)
            common = [*TINY_RUN, *LAYOUTS[layout], "-o", str(root / "ckpt"), "--max_steps", str(STEPS)]
            full = run_script("pretrain.py", [*common, "-i", str(SAVE_AT), "-t", str(root / "tb")], nproc=2)
            check_ok(full)
            resumed = run_script(
                "pretrain.py",
                [*common, "-i", "0", "-t", str(root / "tb_resumed"), "-f", str(root / "ckpt" / f"step-{SAVE_AT}")],
                nproc=2,
            )
            check_ok(resumed)
            cache[layout] = dict(
                root=root,
                stdout=full.stdout + resumed.stdout,
                losses=read_scalars(root / "tb"),
                resumed_losses=read_scalars(root / "tb_resumed"),
            )
        return cache[layout]

    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_trains_saves_resumes_and_continues(runs, layout):
    run = runs(layout)
    losses = [run["losses"][s] for s in range(1, STEPS + 1)]
    assert min(losses[-2:]) < losses[0] - 0.05, f"loss did not fall: {losses}"

    ckpt = run["root"] / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", f"step-{SAVE_AT}", f"step-{STEPS}"]  # no temp debris
    assert (ckpt / "latest").read_text().strip() == f"step-{STEPS}"
    states = json.loads((ckpt / f"step-{STEPS}" / "running_states.json").read_text())
    assert states["step"] == STEPS and states["dp_size"] == DP_SIZE[layout]
    assert states["consumed_tokens"] == STEPS * 2 * 128 * DP_SIZE[layout]
    assert any((ckpt / f"step-{STEPS}" / "model").glob("*.safetensors"))

    assert f"resumed from {ckpt / f'step-{SAVE_AT}'} at step {SAVE_AT}" in run["stdout"]
    assert sorted(run["resumed_losses"]) == list(range(SAVE_AT + 1, STEPS + 1))
    for step, loss in run["resumed_losses"].items():  # bit-identical: fp32 on CPU is deterministic
        assert loss == run["losses"][step], f"step {step}: {loss!r} after resume vs {run['losses'][step]!r}"


@pytest.mark.parametrize("layout", ["zero2", "tp2", "pp2"])
def test_loss_matches_plain_transformers_forward(runs, layout):
    """The loss the plugin reports for step 4 equals HF LlamaForCausalLM on the step-3 weights and
    the batch each data-parallel rank reads at step 4 (TP/PP only change the reduction order)."""
    from transformers import LlamaForCausalLM

    from llama_recipe.data import build_pretrain_batches, load_tokenizer

    run = runs(layout)
    model = LlamaForCausalLM.from_pretrained(
        run["root"] / "ckpt" / f"step-{SAVE_AT}" / "model", torch_dtype=torch.float32
    )
    model.eval()
    tokenizer = load_tokenizer(str(REPO / "data" / "llama-tokenizer"))
    dp_size = DP_SIZE[layout]
    losses = []
    for dp_rank in range(dp_size):
        batches = build_pretrain_batches(str(DATA), tokenizer, 128, 2, dp_rank, dp_size)
        for _ in range(SAVE_AT):
            batches.next_batch()
        with torch.no_grad():
            batch = batches.next_batch()  # the trainer feeds input_ids and labels (positions stay continuous)
            losses.append(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item())
    assert sum(losses) / dp_size == pytest.approx(run["losses"][SAVE_AT + 1], abs=1e-4)


def test_ddp_and_zero2_give_the_same_losses(runs):
    """Same seed, data and fp32 precision: ZeRO-2's sharded optimizer must not change the numbers."""
    ddp, zero2 = runs("ddp")["losses"], runs("zero2")["losses"]
    assert ddp[1] == pytest.approx(zero2[1], abs=1e-5)
    for step in range(1, STEPS + 1):
        assert ddp[step] == pytest.approx(zero2[step], abs=1e-5), f"step {step}: ddp {ddp[step]} zero2 {zero2[step]}"


def test_colossalai_run_launcher(tmp_path):
    """`colossalai run --nproc_per_node 2` (the cluster launcher, here on one machine) trains and saves."""
    import subprocess

    from conftest import PYTHON_BIN, script_env

    cmd = [
        str(PYTHON_BIN / "colossalai"),
        "run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29561",
        "pretrain.py",
        *TINY_RUN,
        "-p",
        "ddp",
        "--max_steps",
        "2",
        "-o",
        str(tmp_path / "ckpt"),
        "-t",
        str(tmp_path / "tb"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    check_ok(proc)
    assert (tmp_path / "ckpt" / "step-2" / "running_states.json").is_file()
    assert sorted(read_scalars(tmp_path / "tb")) == [1, 2]
