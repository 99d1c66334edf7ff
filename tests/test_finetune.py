"""finetune.py: starts from real pretrained weights, trains on completions only, resumes mid-run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import INSTRUCT_DATA as SHIPPED
from conftest import check_ok, expect_one_line_error, launch_runs, read_scalars, run_in_process, run_outputs

from llama_recipe.generation import Completion, Step
from llama_recipe.instruct import (
    IGNORE_INDEX,
    InstructionBatches,
    encode_chat,
    encode_example,
    load_instruction_rows,
    shown_answer,
    split_held_out,
)


def test_prompt_tokens_never_get_labels(tokenizer):
    prompt, completion = "Translate to French: good morning\n", "bonjour"
    ids, labels, truncated = encode_example(tokenizer, prompt, completion, max_length=64)
    prompt_len = len(tokenizer(prompt)["input_ids"])
    assert not truncated
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:] and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[prompt_len:-1]) == completion


def test_a_chat_is_the_examples_finetuning_trains_on(tokenizer):
    """Earlier exchanges are finished examples (BOS prompt answer EOS), the last prompt waits for its
    answer (BOS prompt); a system message and the user's message before an answer are one prompt."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def words(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    chat = [("system", "Be brief."), ("user", "Name a colour."), ("assistant", " Red."), ("user", "Another?")]
    first = [bos, *words("Be brief.\n\nName a colour."), *words(" Red."), eos]
    assert encode_chat(tokenizer, chat) == [*first, bos, *words("Another?")]
    assert encode_chat(tokenizer, [("user", "Hi")]) == [bos, *words("Hi")]


def test_a_blank_answer_says_why(tokenizer):
    eos, space = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("▁")
    ended = shown_answer(Completion("", [Step(eos, -0.1)], "stop", [1]), eos)
    assert ended.startswith("(the model ended its answer at once") and "end-of-sequence" in ended
    blank = shown_answer(Completion(" \n ", [Step(space, -0.1)] * 3, "length", [1]), eos)
    assert blank.startswith("(the model's answer is blank: 3 tokens")
    late = shown_answer(Completion(" ", [Step(space, -0.1), Step(eos, -0.1)], "stop", [1]), eos)
    assert late.startswith("(the model's answer is blank: 1 token of")  # it ended, but not at once
    assert shown_answer(Completion(" Red. ", [Step(space, -0.1)], "stop", [1]), eos) == "Red."


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
    proc = run_in_process(
        "finetune.py", ["--model_path", str(tmp_path), "-d", str(SHIPPED), "-o", str(tmp_path / "ckpt")]
    )
    expect_one_line_error(proc, "config.json")
    assert not (tmp_path / "ckpt").exists()


def test_truncated_weights_in_model_path_are_one_line(pretrained_dir, tmp_path):
    """An HF directory whose model.safetensors was cut short: its header and size disagree, found
    before anything is written (no -o, no -t), in one line naming the file."""
    damaged = tmp_path / "tiny"
    shutil.copytree(pretrained_dir, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 1000])
    outputs = ["-o", str(tmp_path / "ckpt"), "-t", str(tmp_path / "tb")]
    proc = run_in_process("finetune.py", ["--model_path", str(damaged), "-d", str(SHIPPED), *outputs])
    expect_one_line_error(proc, str(weights), "cut short", "--model_path")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "tb").exists()


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
    proc = run_in_process("finetune.py", args)  # default --task_name super_natural_instructions is not shipped
    expect_one_line_error(proc, "super_natural_instructions", "human_eval, prompt_source, self_instruct")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "tb").exists()


def train_then_resume(common: list[str], first: list[str], tmp_path) -> tuple[str, dict, dict]:
    """A 2-process run of 6 steps (`first`: its save and eval flags), then a run resumed from its step-3
    checkpoint, in one launch: (the first run's stdout, its losses, the resumed run's losses)."""
    resumed = [*common, "-i", "0", "-t", str(tmp_path / "tb2"), "-f", str(tmp_path / "ckpt" / "step-3")]
    job = launch_runs({"full": [*common, *first], "resumed": resumed}, tmp_path, script="finetune")
    check_ok(job)
    return run_outputs(job)["full"], read_scalars(tmp_path / "tb"), read_scalars(tmp_path / "tb2")


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
    full, losses, resumed_losses = train_then_resume(
        common, ["-i", "3", "--eval_interval", "3", "-t", str(tmp_path / "tb")], tmp_path
    )
    held_out = read_scalars(tmp_path / "tb", "eval/loss")
    assert sorted(held_out) == [0, 3, 6]
    assert held_out[6] < held_out[0] - 0.1, held_out  # finetuning lowers the loss on examples it never saw
    assert full.count("--- model answer:") == 3  # and shows its answers to held-out prompts

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


@pytest.mark.multiprocess
def test_inplace_sgd_finetunes_data_parallel_and_resumes(tmp_path):
    """LOMO-style in-place SGD through finetune.py, 2 data-parallel processes (the gradient all-reduce
    happens in its hooks): the held-out loss falls, the gradient norm is logged, and a resume
    reproduces the uninterrupted run."""
    from llama_recipe.model import build_model, get_model_config

    torch.manual_seed(123)
    build_model(get_model_config("tiny"), "sdpa").save_pretrained(tmp_path / "pretrained")
    common = [
        "--model_path", str(tmp_path / "pretrained"), "-p", "ddp", "--optimizer", "inplace_sgd", "-d", str(SHIPPED),
        "--task_name", "self_instruct", "-l", "256", "-b", "2", "--lr", "0.5", "--warmup_ratio", "0", "--pack_examples",
        "--grad_clip", "1.0", "--max_steps", "6", "-o", str(tmp_path / "ckpt"),
    ]  # fmt: skip
    full, losses, resumed_losses = train_then_resume(common, ["-i", "3", "-t", str(tmp_path / "tb")], tmp_path)
    assert "optimizer inplace_sgd" in full
    held_out = read_scalars(tmp_path / "tb", "eval/loss")
    assert held_out[6] < held_out[0] - 0.1, held_out
    grad_norms = read_scalars(tmp_path / "tb", "train/grad_norm")
    assert sorted(grad_norms) == list(range(1, 7)) and all(n > 0 for n in grad_norms.values())
    assert sorted(resumed_losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed_losses[step] == losses[step], (step, resumed_losses[step], losses[step])


def test_packed_examples_neither_see_nor_teach_each_other(tokenizer):
    """--pack_examples: a row holds several whole examples, and the model's per-token losses on
    packed rows (through the trainer's own input builder, document attention on) equal those of
    each example run alone: no example attends to another or is trained to predict another."""
    import torch.nn.functional as F

    from llama_recipe.attention import model_inputs
    from llama_recipe.model import build_model, get_model_config

    rows = load_instruction_rows(str(SHIPPED), "self_instruct")
    packed = InstructionBatches(rows, tokenizer, 512, 2, 0, 1, seed=0, pack=True)
    batch = packed.next_batch()
    examples = [encode_example(tokenizer, **rows[i], max_length=512)[:2] for i in packed._order[: packed.position]]
    assert len(examples) >= 4  # several per row (2 rows)
    assert (batch["labels"] != IGNORE_INDEX).sum() == sum(sum(lab != IGNORE_INDEX for lab in e[1]) for e in examples)

    torch.manual_seed(0)
    model = build_model(get_model_config("tiny"), "sdpa").eval()

    def token_losses(logits, labels):
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none")
        return losses[labels[:, 1:].flatten() != IGNORE_INDEX]

    with torch.no_grad():
        inputs = model_inputs(batch, "sdpa", document_attention=True, dtype=torch.float32)
        labels = inputs.pop("labels")
        packed_losses = token_losses(model(**inputs).logits, labels)
        alone = torch.cat(
            [token_losses(model(input_ids=torch.tensor([ids])).logits, torch.tensor([lab])) for ids, lab in examples]
        )
    torch.testing.assert_close(packed_losses, alone, atol=1e-4, rtol=1e-4)
    # and without the document mask the examples would see each other: the check can fail
    with torch.no_grad():
        crossed = token_losses(model(input_ids=batch["input_ids"]).logits, labels)
    assert not torch.allclose(crossed, alone, atol=1e-4)


@pytest.mark.parametrize(
    "lines,words",
    [
        ([], ["could not read", "as JSON lines"]),  # an empty file
        (['{"prompt": null, "completion": "x"}', '{"prompt": "p", "completion": 3}'], ["no row with a string prompt"]),
        (["not json at all"], ["could not read", "as JSON lines"]),
    ],
    ids=["empty", "no-usable-row", "not-json"],
)
def test_finetune_data_without_usable_rows_is_one_line(tmp_path, lines, words):
    from llama_recipe.model import build_model, get_model_config

    build_model(get_model_config("tiny")).save_pretrained(tmp_path / "model")
    (tmp_path / "rows.jsonl").write_text("".join(line + "\n" for line in lines))
    args = [
        "--model_path",
        str(tmp_path / "model"),
        "-d",
        str(tmp_path / "rows.jsonl"),
        "-o",
        str(tmp_path / "ckpt"),
        "-t",
        "",
    ]
    expect_one_line_error(run_in_process("finetune.py", args), *words)
    assert not (tmp_path / "ckpt").exists()


def test_rows_with_null_or_non_string_fields_are_skipped_and_counted(tmp_path, capfd):
    good = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(3)]
    bad = [{"prompt": None, "completion": "x"}, {"prompt": "p", "completion": 7}, {"prompt": "p", "completion": ""}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*good, *bad]))
    assert load_instruction_rows(str(tmp_path / "rows.jsonl"), "unused") == good
    assert "skipped 3 rows" in capfd.readouterr().err


@pytest.mark.parametrize("case", ["no_new_tokens", "truncated_weights"])
def test_generate_refuses_bad_input_in_one_line(tmp_path, case):
    from llama_recipe.model import build_model, get_model_config

    build_model(get_model_config("tiny")).save_pretrained(tmp_path / "model")
    args = [str(tmp_path / "model"), "hello"]
    if case == "no_new_tokens":
        args += ["--max_new_tokens", "0"]
        words = ["--max_new_tokens must be at least 1"]
    else:
        weights = tmp_path / "model" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        words = ["model.safetensors", "cut short", "save or export the model again"]
    expect_one_line_error(run_in_process("scripts/generate.py", args), *words)
