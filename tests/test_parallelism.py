"""Every layout against one process: data parallelism (ddp, ZeRO-2), tensor, pipeline (1f1b, interleaved, an
uneven split) and sequence parallelism, and recompute, in-place SGD and Muon inside them.

One torchrun job (tests/layouts_probe.py) trains every layout one after another: 4 steps of the 4-layer
`tiny4` model on a prepared sample (replica k reads rows k, k + 2, ...: two replicas of 2 rows read one
process's 4 rows), with a checkpoint at step 2, or 2 steps resumed from another run's step-2 checkpoint.
One seed gives one model (model.py `init_weights`: each weight drawn from (seed, its name)), so each layout's
first 4 losses and gradient norms are compared with a one-process run's, and the logged gradient norm with
`torch.nn.utils.clip_grad_norm_` of a plain `transformers` model at a checkpoint's weights.
"""

from __future__ import annotations

import json

import pytest
from conftest import DATA, check_ok, launch, read_scalars, run_in_process

pytestmark = pytest.mark.multiprocess

RUN = ["-c", "tiny4", "-d", "{data}", "-l", "128", "-b", "4", "-s", "0", "--lr", "5e-3", "-x", "fp32",
       "-p", "hybrid_parallel", "--max_steps", "4", "--dist_timeout", "120"]  # fmt: skip
LAYOUTS = {  # name: (flags, the run it resumes from at step 2, or None)
    "ddp": ("-p ddp -b 2", None),  # 2 replicas of 2 rows: one process's 4 rows
    "zero2": ("-p zero2 -b 2", None),
    "zero2_cpu": ("-p zero2_cpu -b 2", None),
    "tp2": ("--tp 2", None),
    "split_gather": ("--tp 2 --sp_mode split_gather", None),
    "split_gather_resumed": ("--tp 2 --sp_mode split_gather", "split_gather"),
    "all_to_all": ("--sp 2 --sp_mode all_to_all", None),
    "all_to_all_resumed": ("--sp 2 --sp_mode all_to_all", "all_to_all"),
    "tp2_selective": ("--tp 2 --recompute selective", "tp2"),
    "pp2": ("--pp 2", None),
    "pp2_interleaved": ("--pp 2 --pp_style interleaved", None),
    "pp2_uneven_recompute": ("--pp 2 --num_layers_per_stage 1,3 --recompute_layers_per_stage 1,2", None),
    "tp2_sgd": ("--tp 2 --optimizer sgd --lr 0.1", None),
    "tp2_inplace_sgd": ("--tp 2 --optimizer inplace_sgd --lr 0.1", None),
    "ddp_muon": ("-p ddp -b 2 --optimizer muon", None),
    "ddp_muon_resumed": ("-p ddp -b 2 --optimizer muon", "ddp_muon"),
    "pp2_muon": ("--pp 2 --optimizer muon", None),
    "pp2_muon_resumed": ("--pp 2 --optimizer muon", "pp2_muon"),
}
# the layouts compared with the one-process AdamW reference (another optimizer takes other steps)
FROM_SCRATCH = [
    name for name, (flags, resume_from) in LAYOUTS.items() if resume_from is None and "--optimizer" not in flags
]
# Measured (fp32, CPU), relative, over the 4 steps: every layout's losses within 2e-7 of one process's. Every
# plugin accumulates the gradient norm in float64 (parallel.gradient_norm, as ColossalAI's optimizers do): torch's
# float32 norm of tiny's LM-head gradient alone is 8e-5 low on CPU, which once set ddp's norms apart from ZeRO's.
TOLERANCE = 1e-5


def prepared_sample(root):
    """The first 20,000 tokens of the RedPajama sample, prepared (scripts/prepare_data.py's path) in this process."""
    from conftest import TOKENIZER

    from llama_recipe.data import load_tokenizer
    from llama_recipe.prepared import prepare_dataset

    prepare_dataset(str(DATA), str(root / "prepared"), load_tokenizer(TOKENIZER), progress=False, max_tokens=20_000)
    return root / "prepared"


def checkpoint_weights(step_dir) -> dict:
    """Every weight a checkpoint's model/ holds, by name."""
    from safetensors.torch import load_file

    return {k: v for f in sorted((step_dir / "model").glob("*.safetensors")) for k, v in load_file(f).items()}


def scalars(tb) -> dict[str, dict[int, float]]:
    return {"loss": read_scalars(tb), "grad_norm": read_scalars(tb, "train/grad_norm")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    data = prepared_sample(root)
    run = [arg.format(data=data) for arg in RUN]
    probe_args = [str(root)]
    for name, (flags, resume_from) in LAYOUTS.items():
        saves = ["-i", "0", "-f", str(root / resume_from / "ckpt" / "step-2")] if resume_from else ["-i", "2"]
        args = [*run, *flags.split(), *saves, "-o", "{out}/ckpt", "-t", "{out}/tb"]
        probe_args += [name, " ".join(args)]
    check_ok(launch("tests/layouts_probe.py", probe_args, nproc=2, timeout=600))
    # the reference: one process, no model parallelism, the plain (unfused) loss and torch's clip_grad_norm_
    reference = ["-p", "ddp", "--unfused_loss", "-i", "0", "-o", str(root / "single"), "-t", str(root / "single_tb")]
    single = run_in_process("pretrain.py", [*run, *reference])
    assert single.returncode == 0, single.stderr[-3000:]
    # -b 1 --accumulation_steps 4 in one process: the reference's rows, a quarter at a time
    accumulated = ["-p", "ddp", "--unfused_loss", "-b", "1", "--accumulation_steps", "4", "-i", "0"]
    single = run_in_process("pretrain.py", [*run, *accumulated, "-o", str(root / "acc"), "-t", str(root / "acc_tb")])
    assert single.returncode == 0, single.stderr[-3000:]
    logged = {name: scalars(root / name / "tb") for name in LAYOUTS}
    logged["single_process"], logged["accumulated"] = scalars(root / "single_tb"), scalars(root / "acc_tb")
    return root, {name: values["loss"] for name, values in logged.items()}, logged


def assert_agree(layout: dict, reference: dict, steps, what: str) -> None:
    for name in ["loss", "grad_norm"]:
        assert sorted(layout[name]) == list(steps), (what, name, layout[name])
        for step in steps:
            expected = pytest.approx(reference[name][step], rel=TOLERANCE, abs=0)
            assert layout[name][step] == expected, (what, name, step, layout[name], reference[name])


@pytest.mark.parametrize("layout", FROM_SCRATCH)
def test_every_layout_trains_as_one_process(runs, layout):
    """The same seed, rows and fp32: each layout's first 4 losses and gradient norms are one process's, to 1e-5
    (relative). Only the order of the reductions differs (and ddp/ZeRO average two replicas' means)."""
    _, losses, logged = runs
    assert_agree(logged[layout], logged["single_process"], range(1, 5), layout)
    assert losses[layout][4] < losses[layout][1] - 0.05  # it trains


def test_every_layout_ends_with_one_process_weights(runs):
    """After 4 steps, every layout's weights (and accumulation's, -b 1 --accumulation_steps 4) are one process's
    to 1e-6, as the norm of the difference over the whole model's (measured: 4e-8 to 8e-8). Per tensor, Adam
    amplifies rounding where a gradient is tiny, so the whole model's norm is the measure."""
    root, _, _ = runs
    reference = checkpoint_weights(root / "single" / "step-4")
    scale = sum(float(w.double().norm() ** 2) for w in reference.values()) ** 0.5
    ends = {name: root / name / "ckpt" / "step-4" for name in FROM_SCRATCH} | {"accumulated": root / "acc" / "step-4"}
    for name, step_dir in ends.items():
        found = checkpoint_weights(step_dir)
        assert found.keys() == reference.keys(), name
        apart = sum(float((found[k].double() - reference[k].double()).norm() ** 2) for k in reference) ** 0.5
        assert apart / scale < 1e-6, (name, apart / scale)


def test_logged_gradient_norm_is_transformers_clip_grad_norm(runs):
    """The loss and gradient norm logged at step 3 equal a plain transformers LlamaForCausalLM's, loaded from the
    step-2 checkpoint in float64 (whose clip_grad_norm_ is exact), on step 3's rows (backward, then
    clip_grad_norm_), to 1e-5: ddp's (2 replicas, torch's clipping) and tp2's (ColossalAI's, over the TP shards)."""
    import torch
    from transformers import LlamaForCausalLM

    from llama_recipe.config import TrainConfig
    from llama_recipe.prepared import PreparedBatches

    root, _, logged = runs
    seed = TrainConfig.for_script("pretrain").training.seed  # the runs' default --seed, and a shuffled order
    for layout in ["ddp", "tp2"]:
        model = LlamaForCausalLM.from_pretrained(root / layout / "ckpt" / "step-2" / "model", torch_dtype=torch.float64)
        batches = PreparedBatches(str(root / "prepared"), 128, 4, dp_rank=0, dp_size=1, seed=seed, shuffle=True)
        for _ in range(2):
            batches.next_batch()
        batch = batches.next_batch()  # ddp's 2 replicas read its rows 0, 2 and 1, 3: their mean is its mean
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0).item()
        assert loss.item() == pytest.approx(logged[layout]["loss"][3], rel=TOLERANCE), layout
        assert norm == pytest.approx(logged[layout]["grad_norm"][3], rel=TOLERANCE), layout
        assert norm > 1.0  # step 3 was clipped (--grad_clip 1): the logged norm is the one before clipping


def test_sequence_parallel_ranks_form_one_replica(runs):
    root, _, _ = runs
    for sp in ["split_gather", "all_to_all"]:
        states = json.loads((root / sp / "ckpt" / "step-4" / "running_states.json").read_text())
        # one replica: the SP ranks read the same batches, and the tokens are counted once, not per SP rank
        assert states["layout"]["dp_size"] == 1 and states["consumed_tokens"] == 4 * 4 * 128


def test_accumulation_takes_the_step_of_the_batch_it_stands_for(runs):
    """Pretraining, one process: -b 1 --accumulation_steps 4 reads -b 4's rows and takes its steps. Every packed
    row has as many target tokens, so each micro-step's token weight is exactly 1/4, as before it was token-weighted."""
    _, losses, _ = runs
    assert sorted(losses["accumulated"]) == [1, 2, 3, 4]
    for step, loss in losses["accumulated"].items():
        assert loss == pytest.approx(losses["single_process"][step], rel=1e-6), (losses["accumulated"], losses)


def test_sequence_parallel_resumes_bit_identically(runs):
    _, losses, _ = runs
    for sp in ["split_gather", "all_to_all"]:
        resumed = losses[f"{sp}_resumed"]
        assert sorted(resumed) == [3, 4]
        assert all(resumed[step] == losses[sp][step] for step in resumed), (resumed, losses[sp])


def test_selective_recompute_under_tensor_parallelism_changes_no_loss(runs):
    _, losses, _ = runs
    assert losses["tp2_selective"] == {step: losses["tp2"][step] for step in (3, 4)}


def test_interleaved_and_uneven_pipelines_give_1f1b_losses(runs):
    """From the same seed: the interleaved schedule (2 chunks per stage) and an uneven split (1 and 3 layers) with
    1 and 2 of them recomputed compute exactly 1f1b's 4 steps."""
    _, losses, _ = runs
    for layout in ["pp2_interleaved", "pp2_uneven_recompute"]:
        assert losses[layout] == losses["pp2"], (layout, losses[layout])


def test_inplace_sgd_under_tensor_parallelism_equals_sgd(runs):
    """CoLLiE's in-place SGD under tp2 (the update inside backward, clipped by the norm summed over the TP group
    with replicated weights counted once) ends with tp2 + torch SGD + ColossalAI's clipping's weights."""
    root, losses, _ = runs
    start, sgd, inplace = (
        checkpoint_weights(root / name / "ckpt" / f"step-{step}")
        for name, step in [("tp2_sgd", 2), ("tp2_sgd", 4), ("tp2_inplace_sgd", 4)]
    )
    assert max((sgd[k] - start[k]).abs().max().item() for k in sgd) > 1e-3  # steps 3-4 moved the weights
    assert max((sgd[k] - inplace[k]).abs().max().item() for k in sgd) <= 1e-6
    for step, loss in losses["tp2_sgd"].items():
        assert losses["tp2_inplace_sgd"][step] == pytest.approx(loss, abs=1e-5)
    # each rank held one gradient (shard) at a time: the one that just landed, never two (tests/layouts_probe.py)
    live = [json.loads((root / "tp2_inplace_sgd" / f"live_grads-rank{r}.json").read_text()) for r in (0, 1)]
    assert live == [1, 1]


def test_muon_resumes_bit_identically_and_pipelines_as_ddp(runs):
    """--optimizer muon: resumed from step 2 (its momentum buffers and AdamW moments from the checkpoint), ddp's and
    pp2's steps 3-4 are the uninterrupted runs' bit for bit, losses and weights; pp2 (one replica, 2 stages) takes
    ddp's steps (2 replicas) to 1e-5 (measured: 9e-7, though Newton-Schulz runs in bf16); and it trains, on other steps than AdamW's."""
    import torch

    root, losses, _ = runs
    for layout in ["ddp_muon", "pp2_muon"]:
        resumed = losses[f"{layout}_resumed"]
        assert sorted(resumed) == [3, 4]
        assert all(resumed[step] == losses[layout][step] for step in resumed), (layout, resumed, losses[layout])
        ends = [checkpoint_weights(root / name / "ckpt" / "step-4") for name in (layout, f"{layout}_resumed")]
        assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0]), layout
    for step, loss in losses["ddp_muon"].items():
        assert losses["pp2_muon"][step] == pytest.approx(loss, rel=TOLERANCE), (
            losses["pp2_muon"],
            losses["ddp_muon"],
        )
    assert losses["ddp_muon"][4] < losses["ddp_muon"][1] - 0.05
    assert losses["ddp_muon"][4] != pytest.approx(losses["ddp"][4], rel=1e-3)  # Muon's steps, not AdamW's


def test_tp2_by_pp2_on_four_processes_trains_as_one_process(runs, tmp_path):
    """Tensor and pipeline parallelism together, 4 processes on 2 stages of 2 TP ranks: the first 2 steps' losses
    and gradient norms are one process's. Its own launch (4 processes); 2 steps keep it short."""
    root, _, logged = runs
    run = [arg.format(data=root / "prepared") for arg in RUN]
    args = [
        *run,
        "--tp",
        "2",
        "--pp",
        "2",
        "--max_steps",
        "2",
        "-i",
        "0",
        "-o",
        str(tmp_path / "o"),
        "-t",
        str(tmp_path / "tb"),
    ]
    check_ok(launch("pretrain.py", args, nproc=4, timeout=600))
    assert_agree(scalars(tmp_path / "tb"), logged["single_process"], range(1, 3), "tp2 x pp2")
