"""finetune.py: starts from real pretrained weights, trains on completions only, resumes mid-run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, check_ok, expect_one_line_error, read_scalars, run_script

from llama_recipe.data import load_tokenizer
from llama_recipe.instruct import (
    IGNORE_INDEX,
    InstructionBatches,
    encode_example,
    load_instruction_rows,
    split_held_out,
)

TOKENIZER = str(REPO / "data" / "llama-tokenizer")
SHIPPED = REPO / "data" / "self_instruct"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


def test_prompt_tokens_never_get_labels(tokenizer):
    prompt, completion = "Translate to French: good morning\n", "bonjour"
    ids, labels, truncated = encode_example(tokenizer, prompt, completion, max_length=64)
    prompt_len = len(tokenizer(prompt)["input_ids"])
    assert not truncated
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:] and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[prompt_len:-1]) == completion


def test_long_examples_lose_prompt_not_answer(tokenizer):
    prompt, completion = "word " * 200, "the answer"
    ids, labels, truncated = encode_example(tokenizer, prompt, completion, max_length=32)
    assert truncated and len(ids) == 32
    answer = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids[-len(answer) :] == answer and labels[-len(answer) :] == answer
    assert labels[: -len(answer)] == [IGNORE_INDEX] * (32 - len(answer))


def test_batches_mask_padding_and_split_replicas(tokenizer):
    rows = load_instruction_rows(str(SHIPPED), "self_instruct")
    assert len(rows) == 175
    shares = [InstructionBatches(rows, tokenizer, 128, 4, r, 2, seed=0) for r in range(2)]
    assert not set(shares[0]._order) & set(shares[1]._order)  # replicas see disjoint examples
    batch = shares[0].next_batch()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()  # padding never trains
    assert (batch["labels"] != IGNORE_INDEX).sum() > 0


def test_model_dir_without_config_is_one_line_error(tmp_path):
    proc = run_script("finetune.py", ["--model_path", str(tmp_path), "-d", str(SHIPPED), "-o", str(tmp_path / "ckpt")])
    expect_one_line_error(proc, "config.json")
    assert not (tmp_path / "ckpt").exists()


def test_missing_task_names_the_available_ones(tmp_path):
    from llama_recipe.model import build_model, get_model_config

    build_model(get_model_config("tiny")).save_pretrained(tmp_path / "model")
    args = [
        "--model_path",
        str(tmp_path / "model"),
        "-d",
        str(SHIPPED),
        "-o",
        str(tmp_path / "ckpt"),
        "-t",
        str(tmp_path / "tb"),
    ]
    proc = run_script("finetune.py", args)  # default --task_name super_natural_instructions is not shipped
    expect_one_line_error(proc, "super_natural_instructions", "human_eval, prompt_source, self_instruct")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "tb").exists()


@pytest.mark.multiprocess
def test_finetune_loads_weights_trains_and_resumes(tmp_path, tokenizer):
    from transformers import LlamaForCausalLM

    from llama_recipe.model import build_model, get_model_config

    torch.manual_seed(123)
    pretrained = build_model(get_model_config("tiny"), "sdpa")
    pretrained.save_pretrained(tmp_path / "pretrained")  # a plain Hugging Face directory, one safetensors file
    common = [
        "--model_path", str(tmp_path / "pretrained"), "-p", "zero2", "-d", str(SHIPPED), "--task_name", "self_instruct",
        "-l", "128", "-b", "2", "--lr", "3e-3", "--warmup_ratio", "0", "--max_steps", "6", "-o", str(tmp_path / "ckpt"),
    ]  # fmt: skip
    full = run_script("finetune.py", [*common, "-i", "3", "--eval_interval", "3", "-t", str(tmp_path / "tb")], nproc=2)
    check_ok(full)
    held_out = read_scalars(tmp_path / "tb", "eval/loss")
    assert sorted(held_out) == [0, 3, 6]
    assert held_out[6] < held_out[0] - 0.1, held_out  # finetuning lowers the loss on examples it never saw
    assert full.stdout.count("--- model answer:") == 3  # and shows its answers to held-out prompts
    resumed = run_script(
        "finetune.py",
        [*common, "-i", "0", "-t", str(tmp_path / "tb2"), "-f", str(tmp_path / "ckpt" / "step-3")],
        nproc=2,
    )
    check_ok(resumed)
    losses, resumed_losses = read_scalars(tmp_path / "tb"), read_scalars(tmp_path / "tb2")

    # Step 1's loss is the pretrained model's loss on each replica's first batch: the weights were loaded.
    model = LlamaForCausalLM.from_pretrained(tmp_path / "pretrained").eval()
    rows, _ = split_held_out(load_instruction_rows(str(SHIPPED), "self_instruct"), 0.05, seed=42)  # what it trains on
    with torch.no_grad():
        first = [
            model(**InstructionBatches(rows, tokenizer, 128, 2, r, 2, seed=42).next_batch()).loss.item()
            for r in range(2)
        ]
    assert losses[1] == pytest.approx(sum(first) / 2, abs=1e-4)

    assert min(losses[5], losses[6]) < losses[1]
    assert sorted(resumed_losses) == [4, 5, 6]  # the step count continues after resume
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(losses[step], abs=1e-6)
    states = json.loads((tmp_path / "ckpt" / "step-6" / "running_states.json").read_text())
    assert states["step"] == 6 and states["config"]["task_name"] == "self_instruct"


def test_inplace_sgd_finetunes_data_parallel_and_resumes(tmp_path):
    """LOMO-style in-place SGD through finetune.py, 2 data-parallel processes (the gradient all-reduce
    happens in its hooks): the held-out loss falls, the gradient norm is logged, and a resume
    reproduces the uninterrupted run."""
    from llama_recipe.model import build_model, get_model_config

    torch.manual_seed(123)
    build_model(get_model_config("tiny"), "sdpa").save_pretrained(tmp_path / "pretrained")
    common = [
        "--model_path", str(tmp_path / "pretrained"), "-p", "ddp", "--optimizer", "inplace_sgd", "-d", str(SHIPPED),
        "--task_name", "self_instruct", "-l", "128", "-b", "2", "--lr", "0.5", "--warmup_ratio", "0",
        "--grad_clip", "1.0", "--max_steps", "6", "-o", str(tmp_path / "ckpt"),
    ]  # fmt: skip
    full = run_script("finetune.py", [*common, "-i", "3", "-t", str(tmp_path / "tb")], nproc=2)
    check_ok(full)
    assert "optimizer inplace_sgd" in full.stdout
    held_out = read_scalars(tmp_path / "tb", "eval/loss")
    assert held_out[6] < held_out[0] - 0.1, held_out
    grad_norms = read_scalars(tmp_path / "tb", "train/grad_norm")
    assert sorted(grad_norms) == list(range(1, 7)) and all(n > 0 for n in grad_norms.values())
    resumed = run_script(
        "finetune.py",
        [*common, "-i", "0", "-t", str(tmp_path / "tb2"), "-f", str(tmp_path / "ckpt" / "step-3")],
        nproc=2,
    )
    check_ok(resumed)
    losses, resumed_losses = read_scalars(tmp_path / "tb"), read_scalars(tmp_path / "tb2")
    assert sorted(resumed_losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed_losses[step] == losses[step], (step, resumed_losses[step], losses[step])
