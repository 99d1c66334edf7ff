"""Megatron's and CoLLiE's parallelism through hybrid_parallel: sequence parallelism, interleaved and
uneven pipelines, recompute inside them, selective recompute and in-place SGD under tensor parallelism.

One torchrun job (tests/layouts_probe.py) trains every layout one after another: 4 steps of the
4-layer `tiny4` model with a checkpoint at step 2, or 2 steps resumed from another layout's step-2
checkpoint. Layouts that build their weights alike (tp2 and tp2 + split_gather) are compared from
step 1; layouts that place the layers differently (ColossalAI's lazy initialisation draws each
stage's weights in its own order) resume from one checkpoint and are compared on the steps after it.
"""

from __future__ import annotations

import json

import pytest
from conftest import DATA, check_ok, launch, read_scalars, run_in_process

pytestmark = pytest.mark.multiprocess

RUN = ["-c", "tiny4", "-d", str(DATA), "-l", "128", "-b", "4", "-s", "0", "--lr", "5e-3", "-x", "fp32",
       "-p", "hybrid_parallel", "--max_steps", "4", "--dist_timeout", "120"]  # fmt: skip
LAYOUTS = {  # name: (flags, the run it resumes from at step 2, or None)
    "tp2": ("--tp 2", None),
    "split_gather": ("--tp 2 --sp_mode split_gather", None),
    "split_gather_resumed": ("--tp 2 --sp_mode split_gather", "split_gather"),
    "all_to_all": ("--sp 2 --sp_mode all_to_all", None),
    "all_to_all_resumed": ("--sp 2 --sp_mode all_to_all", "all_to_all"),
    "tp2_selective": ("--tp 2 --recompute selective", "tp2"),
    "pp2": ("--pp 2", None),
    "pp2_interleaved": ("--pp 2 --pp_style interleaved", "pp2"),
    "tp2_sgd": ("--tp 2 --optimizer sgd --lr 0.1", None),
    "tp2_inplace_sgd": ("--tp 2 --optimizer inplace_sgd --lr 0.1", None),
    "pp2_uneven_recompute": ("--pp 2 --num_layers_per_stage 1,3 --recompute_layers_per_stage 1,2", "pp2"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    probe_args = [str(root)]
    for name, (flags, resume_from) in LAYOUTS.items():
        saves = ["-i", "0", "-f", str(root / resume_from / "ckpt" / "step-2")] if resume_from else ["-i", "2"]
        args = [*RUN, *flags.split(), *saves, "-o", "{out}/ckpt", "-t", "{out}/tb"]
        probe_args += [name, " ".join(args)]
    check_ok(launch("tests/layouts_probe.py", probe_args, nproc=2, timeout=600))
    # all_to_all's weights are built as by one process without model parallelism: its reference is that run
    single = run_in_process("pretrain.py", [*RUN, "-i", "0", "-o", str(root / "single"), "-t", str(root / "single_tb")])
    assert single.returncode == 0, single.stderr[-3000:]
    accumulated = [
        "-b",
        "1",
        "--accumulation_steps",
        "4",
        "-i",
        "0",
        "-o",
        str(root / "acc"),
        "-t",
        str(root / "acc_tb"),
    ]
    single = run_in_process("pretrain.py", [*RUN, *accumulated])
    assert single.returncode == 0, single.stderr[-3000:]
    losses = {name: read_scalars(root / name / "tb") for name in LAYOUTS}
    losses["single_process"], losses["accumulated"] = read_scalars(root / "single_tb"), read_scalars(root / "acc_tb")
    return root, losses


def test_sequence_parallel_losses_equal_the_layout_without_it(runs):
    root, losses = runs
    for sp, reference in [("split_gather", "tp2"), ("all_to_all", "single_process")]:
        assert sorted(losses[sp]) == [1, 2, 3, 4]
        for step, loss in losses[sp].items():
            assert loss == pytest.approx(losses[reference][step], abs=1e-5), (sp, step, losses[sp], losses[reference])
        assert losses[sp][4] < losses[sp][1] - 0.05  # it trains
        states = json.loads((root / sp / "ckpt" / "step-4" / "running_states.json").read_text())
        # one replica: the SP ranks read the same batches, and the tokens are counted once, not per SP rank
        assert states["layout"]["dp_size"] == 1 and states["consumed_tokens"] == 4 * 4 * 128


def test_accumulation_takes_the_step_of_the_batch_it_stands_for(runs):
    """Pretraining, one process: -b 1 --accumulation_steps 4 reads -b 4's rows and takes its steps. Every packed
    row has as many target tokens, so each micro-step's token weight is exactly 1/4, as before it was token-weighted."""
    _, losses = runs
    assert sorted(losses["accumulated"]) == [1, 2, 3, 4]
    for step, loss in losses["accumulated"].items():
        assert loss == pytest.approx(losses["single_process"][step], rel=1e-6), (losses["accumulated"], losses)


def test_sequence_parallel_resumes_bit_identically(runs):
    _, losses = runs
    for sp in ["split_gather", "all_to_all"]:
        resumed = losses[f"{sp}_resumed"]
        assert sorted(resumed) == [3, 4]
        assert all(resumed[step] == losses[sp][step] for step in resumed), (resumed, losses[sp])


def test_selective_recompute_under_tensor_parallelism_changes_no_loss(runs):
    _, losses = runs
    assert losses["tp2_selective"] == {step: losses["tp2"][step] for step in (3, 4)}


def test_interleaved_and_uneven_pipelines_give_1f1b_losses(runs):
    """From the same step-2 weights and optimizer state: the interleaved schedule (2 chunks per stage) and an
    uneven split (1 and 3 layers) with 1 and 2 of them recomputed compute exactly 1f1b's steps 3 and 4."""
    _, losses = runs
    for layout in ["pp2_interleaved", "pp2_uneven_recompute"]:
        assert losses[layout] == {step: losses["pp2"][step] for step in (3, 4)}, (layout, losses[layout])


def test_inplace_sgd_under_tensor_parallelism_equals_sgd(runs):
    """CoLLiE's in-place SGD under tp2 (the update inside backward, clipped by the norm summed over the TP group
    with replicated weights counted once) ends with tp2 + torch SGD + ColossalAI's clipping's weights."""
    from safetensors.torch import load_file

    root, losses = runs

    def weights(name: str, step: int) -> dict:
        tensors = {}
        for shard in (root / name / "ckpt" / f"step-{step}" / "model").glob("*.safetensors"):
            tensors.update(load_file(shard))
        return tensors

    start, sgd, inplace = weights("tp2_sgd", 2), weights("tp2_sgd", 4), weights("tp2_inplace_sgd", 4)
    assert max((sgd[k] - start[k]).abs().max().item() for k in sgd) > 1e-3  # steps 3-4 moved the weights
    assert max((sgd[k] - inplace[k]).abs().max().item() for k in sgd) <= 1e-6
    for step, loss in losses["tp2_sgd"].items():
        assert losses["tp2_inplace_sgd"][step] == pytest.approx(loss, abs=1e-5)
    # each rank held one gradient (shard) at a time: the one that just landed, never two (tests/layouts_probe.py)
    live = [json.loads((root / "tp2_inplace_sgd" / f"live_grads-rank{r}.json").read_text()) for r in (0, 1)]
    assert live == [1, 1]
