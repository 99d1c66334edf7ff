"""Every CPU-capable booster plugin really trains, saves, resumes and continues, 2 processes on CPU.

Each layout runs `pretrain.py` twice (conftest's `layout_runs`, one launch): 6 steps with a checkpoint
at step 3, then a second run that resumes from step 3 alone and runs to step 6. The resumed steps must reproduce
the uninterrupted run's losses, and the losses must match a plain `transformers` forward of the
saved weights. (The same launch carries two runs of a tied-embeddings `tiny`: test_tied_embeddings.py.)
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DP_SIZE, HELD_OUT, LAYOUTS, RESUME_FROM, STEPS, read_scalars, trainer_batches

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_trains_saves_resumes_and_continues(layout_runs, layout):
    run = layout_runs(layout)
    losses = [run["losses"][s] for s in range(1, STEPS + 1)]
    assert min(losses[-2:]) < losses[0] - 0.05, f"loss did not fall: {losses}"

    ckpt = run["root"] / "ckpt"
    kept = range(RESUME_FROM, STEPS + 1) if layout == "zero2" else (RESUME_FROM, STEPS)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", *(f"step-{s}" for s in kept)]  # no temp debris
    assert (ckpt / "latest").read_text().strip() == f"step-{STEPS}"
    states = json.loads((ckpt / f"step-{STEPS}" / "running_states.json").read_text())
    assert states["step"] == STEPS and states["dp_size"] == DP_SIZE[layout]
    assert states["consumed_tokens"] == STEPS * 2 * 128 * DP_SIZE[layout]
    assert any((ckpt / f"step-{STEPS}" / "model").glob("*.safetensors"))

    assert f"resumed from {ckpt / f'step-{RESUME_FROM}'} at step {RESUME_FROM}" in run["stdout"]
    assert sorted(run["resumed_losses"]) == list(range(RESUME_FROM + 1, STEPS + 1))
    for step, loss in run["resumed_losses"].items():  # bit-identical: fp32 on CPU is deterministic
        assert loss == run["losses"][step], f"step {step}: {loss!r} after resume vs {run['losses'][step]!r}"


@pytest.mark.parametrize("layout", ["ddp", "zero2", "tp2", "pp2"])
def test_loss_and_gradient_norm_match_plain_transformers(layout_runs, tokenizer, layout):
    """The loss the plugin reports for step 4 equals HF LlamaForCausalLM on the step-3 weights and the batch each
    data-parallel rank reads at step 4 (TP/PP only change the reduction order), and the logged gradient norm
    equals torch.nn.utils.clip_grad_norm_ after backward of the mean over the replicas' losses (one process, in
    float64, where clip_grad_norm_ is exact) to 1e-5, torch's (ddp) and ColossalAI's alike."""
    from transformers import LlamaForCausalLM

    run = layout_runs(layout)
    model = LlamaForCausalLM.from_pretrained(
        run["root"] / "ckpt" / f"step-{RESUME_FROM}" / "model", torch_dtype=torch.float64
    )
    dp_size = DP_SIZE[layout]
    losses = []
    for dp_rank in range(dp_size):
        batches = trainer_batches(tokenizer, dp_rank, dp_size)
        for _ in range(RESUME_FROM):
            batches.next_batch()
        batch = batches.next_batch()  # the trainer feeds input_ids and labels (positions stay continuous)
        losses.append(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss)
    loss = sum(losses) / dp_size  # every row is full: the replicas' means weigh alike
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0).item()
    assert loss.item() == pytest.approx(run["losses"][RESUME_FROM + 1], abs=1e-4)
    logged = read_scalars(run["root"] / "tb", "train/grad_norm")[RESUME_FROM + 1]
    assert norm == pytest.approx(logged, rel=1e-5)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_held_out_loss_during_pretraining(layout_runs, tokenizer, layout):
    """--eval_data: the held-out loss before training, every --eval_interval steps and at the end, in
    TensorBoard; at step 3 it equals HF LlamaForCausalLM on the step-3 checkpoint over the same 512
    held-out tokens (whatever the layout splits them into), and the resumed run's step 6 matches."""
    from transformers import LlamaForCausalLM

    from llama_recipe.data import held_out_text_batches
    from llama_recipe.sources import resolve_source

    run = layout_runs(layout)
    assert sorted(run["evals"]) == [0, RESUME_FROM, STEPS]
    assert run["resumed_evals"][STEPS] == pytest.approx(run["evals"][STEPS], abs=1e-6)
    model = LlamaForCausalLM.from_pretrained(run["root"] / "ckpt" / f"step-{RESUME_FROM}" / "model").eval()
    batches, tokens = held_out_text_batches(resolve_source(str(HELD_OUT)), tokenizer, 128, 4, 0, 1, 512)
    assert tokens == 512 and len(batches) == 1
    with torch.no_grad():
        expected = model(input_ids=batches[0]["input_ids"], labels=batches[0]["labels"]).loss.item()
    assert run["evals"][RESUME_FROM] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_one_seed_gives_one_model(layout_runs, tokenizer, layout):
    """Every plugin and layout starts from the weights one process builds from the same seed (each weight drawn
    from (seed, its name): ZeRO's whole model, and hybrid_parallel's lazily materialised shards and stages alike):
    the held-out loss before training equals that one-process model's."""
    from llama_recipe.config import TrainConfig
    from llama_recipe.data import held_out_text_batches
    from llama_recipe.model import WeightInit, build_model, get_model_config
    from llama_recipe.sources import resolve_source

    seed = TrainConfig.for_script("pretrain").training.seed  # the runs' default --seed
    model = build_model(get_model_config("tiny"), init=WeightInit(seed)).eval()
    batches, _ = held_out_text_batches(resolve_source(str(HELD_OUT)), tokenizer, 128, 4, 0, 1, 512)
    with torch.no_grad():
        expected = model(input_ids=batches[0]["input_ids"], labels=batches[0]["labels"]).loss.item()
    assert layout_runs(layout)["evals"][0] == pytest.approx(expected, rel=1e-5)


def test_ddp_and_zero2_give_the_same_losses(layout_runs):
    """Same seed, data and fp32 precision: neither ZeRO-2's sharded optimizer nor the chunked loss (ddp's
    run has --unfused_loss, zero2's the default chunked loss) may change the numbers."""
    ddp, zero2 = layout_runs("ddp")["losses"], layout_runs("zero2")["losses"]
    for step in range(1, STEPS + 1):
        assert ddp[step] == pytest.approx(zero2[step], abs=1e-5), f"step {step}: ddp {ddp[step]} zero2 {zero2[step]}"


def test_colossalai_run_launcher(layout_runs):
    """`colossalai run --nproc_per_node 2` (the cluster launcher, here on one machine) launched ddp's
    run, which trained, saved and resumed (test_trains_saves_resumes_and_continues[ddp])."""
    run = layout_runs("ddp")
    assert run["launcher"] == "colossalai"
    assert sorted(run["losses"]) == list(range(1, STEPS + 1))
    assert (run["root"] / "ckpt" / f"step-{STEPS}" / "running_states.json").is_file()
