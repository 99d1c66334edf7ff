"""finetune.py: starts from real pretrained weights, trains on completions only, resumes mid-run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import INSTRUCT_DATA as SHIPPED
from conftest import check_ok, expect_one_line_error, launch_runs, read_scalars, run_in_process, run_outputs

from llama_recipe.cli import parse_args
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


def test_a_step_reads_the_same_examples_whatever_the_layout(tokenizer):
    """Examples are dealt to the replicas in turn, so the examples of a step (all replicas, all micro-steps) are
    the same for 1 x -b 4, 2 replicas x -b 2, -b 1 --accumulation_steps 4 and 2 replicas x -b 1 x 2 micro-steps."""
    rows = load_instruction_rows(str(SHIPPED), "self_instruct")

    def steps(batch_size: int, accumulation: int, replicas: int) -> list[set]:
        shares = [InstructionBatches(rows, tokenizer, 128, batch_size, r, replicas, seed=0) for r in range(replicas)]
        examples = []
        for _ in range(3):
            batches = [share.next_batch() for share in shares for _ in range(accumulation)]
            rows_read = [
                (ids, mask) for b in batches for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True)
            ]
            examples.append({tuple(ids[mask == 1].tolist()) for ids, mask in rows_read})
        return examples

    one_batch = steps(4, 1, 1)
    assert all(len(step) == 4 for step in one_batch)
    for layout in [(2, 1, 2), (1, 4, 1), (1, 2, 2)]:
        assert steps(*layout) == one_batch, layout


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


# The 2-process finetune.py runs of this module, in ONE launch (conftest.launch_runs): a zero2 run of 6 steps and
# its resume from step 3; an in-place SGD run and its resume; and 3 steps under each layout of the token-weighting
# check, each a global batch of 4 examples (replicas x -b x --accumulation_steps) compared with one process's -b 4.
COMMON = ["-d", str(SHIPPED), "--task_name", "self_instruct", "-l", "128", "--warmup_ratio", "0"]
INPLACE = ["-p", "ddp", "--optimizer", "inplace_sgd", "--lr", "0.5", "--grad_clip", "1.0"]
GLOBAL_BATCH_OF_4 = {  # name: (flags, its one-process reference)
    "ddp_2x2": (["-p", "ddp", "-b", "2"], "adamw"),
    "zero2_2x1x2": (["-p", "zero2", "-b", "1", "--accumulation_steps", "2"], "adamw"),
    "zero2_cpu_2x2": (["-p", "zero2_cpu", "-b", "2"], "adamw"),
    "tp2_1x4": (["-p", "hybrid_parallel", "--tp", "2", "-b", "1", "--accumulation_steps", "4"], "adamw"),
    "pp2_4_microbatches": (["-p", "hybrid_parallel", "--pp", "2", "-b", "4"], "adamw"),
    "inplace_sgd_2x2": ([*INPLACE, "-b", "2"], "inplace_sgd"),
}
ONE_PROCESS = {  # name: flags, run in this process
    "adamw": ["-b", "4"],
    "adamw_1x4": ["-b", "1", "--accumulation_steps", "4"],  # the same step: its reference is "adamw"
    "inplace_sgd": [*INPLACE, "-b", "4"],
}


# LoRA (--lora_rank) under each plugin that offers it: 6 steps saving at step 3, and a resume from step 3
LORA_PLUGINS = {"lora_zero2": "zero2", "lora_ddp": "ddp"}
LORA = ["--lora_rank", "4", "--lora_alpha", "8", "--lora_targets", "q_proj,v_proj,down_proj", "--lr", "1e-2"]


def lora_runs(root, resumed) -> dict[str, list[str]]:
    runs = {}
    for name, plugin in LORA_PLUGINS.items():
        flags = ["--model_path", str(root / "pretrained"), "-p", plugin, *COMMON, "-b", "2", "--max_steps", "6"]
        runs[name] = [
            *flags,
            *LORA,
            "-o",
            str(root / name),
            "-i",
            "3",
            "--eval_interval",
            "3",
            "-t",
            str(root / f"{name}_tb"),
        ]
        runs[f"{name}_resumed"] = resumed(["--config_file", str(root / name / "step-3" / "run.yaml")], name)
    return runs


THREE_STEPS = ["-x", "fp32", "--lr", "3e-3", "--max_steps", "3", "--eval_split", "0", "-i", "3"]  # nothing held out


def token_weighting_args(root, name: str, flags: list[str]) -> list[str]:
    """3 steps from `root`/pretrained (--lr 3e-3 unless `flags` say otherwise), a checkpoint at step 3."""
    where = ["-o", str(root / name / "ckpt"), "-t", str(root / name / "tb")]
    return ["--model_path", str(root / "pretrained"), *COMMON, *THREE_STEPS, *where, *flags]


@pytest.fixture(scope="module")
def finetune_runs(tmp_path_factory):
    """{run name: (its stdout, or None for a one-process run; its losses by step)} and the root of their files."""
    from llama_recipe.model import build_model, get_model_config

    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(123)
    build_model(get_model_config("tiny"), "sdpa").save_pretrained(root / "pretrained")  # a plain HF directory
    pretrained = ["--model_path", str(root / "pretrained")]
    steps = ["--max_steps", "6"]
    zero2 = [*pretrained, "-p", "zero2", *COMMON, "-b", "2", "--lr", "3e-3", *steps, "-o", str(root / "zero2")]
    packed = ["-l", "256", "-b", "2", "--pack_examples"]
    inplace = [*pretrained, *INPLACE, *COMMON, *packed, *steps, "-o", str(root / "inplace")]

    def resumed(common: list[str], name: str) -> list[str]:
        return [*common, "-i", "0", "-t", str(root / f"{name}_tb2"), "-f", str(root / name / "step-3")]

    runs = {
        "zero2": [*zero2, "-i", "3", "--eval_interval", "3", "-t", str(root / "zero2_tb")],
        **lora_runs(root, resumed),
        "zero2_resumed": resumed(["--config_file", str(root / "zero2" / "step-3" / "run.yaml")], "zero2"),
        "inplace": [*inplace, "-i", "3", "-t", str(root / "inplace_tb")],
        "inplace_resumed": resumed(inplace, "inplace"),
        **{name: token_weighting_args(root, name, flags) for name, (flags, _) in GLOBAL_BATCH_OF_4.items()},
    }
    job = launch_runs(runs, root, script="finetune")
    check_ok(job)
    outputs = run_outputs(job)
    for name, flags in ONE_PROCESS.items():
        single = run_in_process("finetune.py", token_weighting_args(root, name, flags))
        assert single.returncode == 0, single.stderr[-3000:]
    tb = {"zero2": "zero2_tb", "zero2_resumed": "zero2_tb2", "inplace": "inplace_tb", "inplace_resumed": "inplace_tb2"}
    tb.update({name: f"{name}_tb" for name in LORA_PLUGINS} | {f"{n}_resumed": f"{n}_tb2" for n in LORA_PLUGINS})
    found = {
        name: (outputs.get(name), read_scalars(root / tb.get(name, f"{name}/tb"))) for name in [*runs, *ONE_PROCESS]
    }
    return root, found


@pytest.mark.multiprocess
def test_finetune_loads_weights_trains_and_resumes(finetune_runs, tokenizer):
    from transformers import LlamaForCausalLM

    from llama_recipe.loss import target_tokens

    root, runs = finetune_runs
    (full, losses), (_, resumed_losses) = runs["zero2"], runs["zero2_resumed"]
    held_out = read_scalars(root / "zero2_tb", "eval/loss")
    assert sorted(held_out) == [0, 3, 6]
    assert held_out[6] < held_out[0] - 0.1, held_out  # finetuning lowers the loss on examples it never saw
    assert full.count("--- model answer:") == 3  # and shows its answers to held-out prompts

    # Step 1's loss is the pretrained model's loss on the replicas' first batches, over all their completion
    # tokens: the weights were loaded.
    model = LlamaForCausalLM.from_pretrained(root / "pretrained").eval()
    rows, _ = split_held_out(load_instruction_rows(str(SHIPPED), "self_instruct"), 0.05, seed=42)  # what it trains on
    first = [InstructionBatches(rows, tokenizer, 128, 2, r, 2, seed=42).next_batch() for r in range(2)]
    with torch.no_grad():
        token_losses = [model(**batch).loss.item() * target_tokens(batch["labels"]) for batch in first]
    assert losses[1] == pytest.approx(sum(token_losses) / sum(target_tokens(b["labels"]) for b in first), abs=1e-4)

    assert min(losses[5], losses[6]) < losses[1]
    assert sorted(resumed_losses) == [4, 5, 6]  # the step count continues after resume
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(losses[step], abs=1e-6)
    states = json.loads((root / "zero2" / "step-6" / "running_states.json").read_text())
    assert states["step"] == 6 and states["config"]["task_name"] == "self_instruct"
    # The resumed run took its other flags from step-3's run.yaml, which reads back as that run's config
    recorded = json.loads((root / "zero2" / "step-3" / "running_states.json").read_text())["config"]
    again = parse_args("finetune", ["--config_file", str(root / "zero2" / "step-3" / "run.yaml")]).to_dict()
    assert {k for k, v in recorded.items() if again[k] != v} == {"config_file"}


@pytest.mark.multiprocess
def test_inplace_sgd_finetunes_data_parallel_and_resumes(finetune_runs):
    """LOMO-style in-place SGD through finetune.py, 2 data-parallel processes (the gradient all-reduce
    happens in its hooks): the held-out loss falls, the gradient norm is logged, and a resume
    reproduces the uninterrupted run."""
    root, runs = finetune_runs
    (full, losses), (_, resumed_losses) = runs["inplace"], runs["inplace_resumed"]
    assert "optimizer inplace_sgd" in full
    held_out = read_scalars(root / "inplace_tb", "eval/loss")
    assert held_out[6] < held_out[0] - 0.1, held_out
    grad_norms = read_scalars(root / "inplace_tb", "train/grad_norm")
    assert sorted(grad_norms) == list(range(1, 7)) and all(n > 0 for n in grad_norms.values())
    assert sorted(resumed_losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed_losses[step] == losses[step], (step, resumed_losses[step], losses[step])


def relative_difference(root, name: str, reference: str) -> float:
    """|weights - reference's| / |reference's| over the whole model, at step 3."""
    from safetensors.torch import load_file

    def weights(run: str) -> dict:
        tensors = {}
        for shard in (root / run / "ckpt" / "step-3" / "model").glob("*.safetensors"):
            tensors.update(load_file(shard))
        return tensors

    mine, theirs = weights(name), weights(reference)
    assert mine.keys() == theirs.keys()
    difference = sum((mine[k] - theirs[k]).double().square().sum() for k in theirs) ** 0.5
    return float(difference / sum(t.double().square().sum() for t in theirs.values()) ** 0.5)


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["adamw_1x4", *GLOBAL_BATCH_OF_4])
def test_a_global_batch_of_4_takes_the_step_of_one_batch_of_4(finetune_runs, name):
    """Completions differ in length, so a mean of micro-batch means would weigh a token by the length
    of its completion and by the layout (losses up to ~2e-3 relative apart, weights ~7e-2 after 3 steps):
    with the loss weighted by tokens, -b 1 --accumulation_steps 4, 2 replicas x -b 2 (ddp, zero2_cpu),
    2 replicas x -b 1 x 2 micro-steps (zero2), tp2 with 4 micro-steps, pp2 with 4 micro-batches and
    in-place SGD on 2 replicas take one process's -b 4 step: losses and weights within 1e-6 relative."""
    root, runs = finetune_runs
    reference = GLOBAL_BATCH_OF_4[name][1] if name in GLOBAL_BATCH_OF_4 else "adamw"
    losses, expected = runs[name][1], runs[reference][1]
    assert sorted(losses) == [1, 2, 3]
    for step, loss in losses.items():
        assert loss == pytest.approx(expected[step], rel=1e-6), (step, losses, expected)
    assert relative_difference(root, name, reference) <= 1e-6


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


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", LORA_PLUGINS)
def test_lora_trains_only_adapters_saves_only_them_and_resumes_exactly(finetune_runs, name):
    """--lora_rank under zero2 and ddp (ColossalAI's Booster.enable_lora): step 1 is the pretrained model's loss
    (the base was loaded, and the adapters start as zero: B = 0), the held-out loss falls, the checkpoint holds
    the adapters alone (and the optimizer state of nothing else), and a resume from step 3, which rebuilds the
    base from --model_path, repeats steps 4-6 bit for bit (so training never changed the base either)."""
    from safetensors.torch import load_file

    root, runs = finetune_runs
    (out, losses), (_, resumed_losses) = runs[name], runs[f"{name}_resumed"]
    assert "LoRA rank 4, alpha 8 on down_proj,q_proj,v_proj: 3,968 trainable parameters" in out
    assert losses[1] == pytest.approx(runs["zero2"][1][1], abs=1e-6)  # the full-finetuning run's first step
    held_out = read_scalars(root / f"{name}_tb", "eval/loss")
    assert held_out[6] < held_out[0] - 0.01, held_out
    assert out.count("--- model answer:") == 3  # from the final checkpoint: base + adapters, merged
    assert sorted(resumed_losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed_losses[step] == losses[step], (step, resumed_losses[step], losses[step])

    step = root / name / "step-6"
    adapters = load_file(step / "adapter" / "adapter_model.safetensors")
    assert len(adapters) == 2 * 3 * 2 and all(".lora_A." in k or ".lora_B." in k for k in adapters)  # layers x targets
    assert not list((step / "model").glob("*.safetensors"))  # no base weights: only config.json and the tokenizer
    if name == "lora_zero2":  # the ZeRO slices index every tensor the optimizer holds: the adapters' only
        index = json.loads((step / "optimizer" / "zero-slices.json").read_text())
        assert sum(p["numel"] for p in index["params"]) == 3_968, index


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "checkpoint,flags,words",
    [
        ("lora_zero2", [], ["holds LoRA adapters", "with --lora_rank"]),
        ("lora_zero2", [*LORA[:-2], "--lora_rank", "8"], ["--lora_rank 4 -> 8"]),
        ("zero2", ["--lora_rank", "4"], ["holds full weights", "without --lora_rank"]),
    ],
    ids=["adapters-without-lora", "another-rank", "full-weights-with-lora"],
)
def test_a_resume_must_rebuild_what_the_checkpoint_trained(finetune_runs, checkpoint, flags, words):
    """Refused before anything is built: adapters resumed as full weights or with another shape, and full
    weights resumed as adapters."""
    from llama_recipe.errors import UsageError
    from llama_recipe.validation import validate

    root, _ = finetune_runs
    args = ["--model_path", str(root / "pretrained"), "-p", "zero2", *COMMON, "-b", "2", "--max_steps", "6", *flags]
    cfg = parse_args("finetune", [*args, "-o", str(root / checkpoint), "-f", str(root / checkpoint / "step-3")])
    with pytest.raises(UsageError) as refusal:
        validate(cfg, world_size=2, script="finetune")
    assert all(word in str(refusal.value) for word in words), str(refusal.value)


@pytest.mark.multiprocess
def test_lora_matches_across_plugins_and_exports_the_adapted_model(finetune_runs, tmp_path):
    """zero2 and ddp train the same adapters (same global batch); scripts/export_hf.py folds them into the
    base (peft's merge_and_unload), and transformers' LlamaForCausalLM loaded from the export gives the logits
    of the base with the adapters applied by peft's own loader, to 1e-5."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    root, runs = finetune_runs
    for step, loss in runs["lora_ddp"][1].items():
        assert loss == pytest.approx(runs["lora_zero2"][1][step], rel=1e-5), step
    checkpoint = root / "lora_zero2" / "step-6"
    check_ok(run_in_process("scripts/export_hf.py", [str(checkpoint), str(tmp_path / "hf")]))
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    base = LlamaForCausalLM.from_pretrained(root / "pretrained").eval()
    ids = torch.randint(0, base.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, checkpoint / "adapter").eval()
        expected = adapted(input_ids=ids).logits
        got = exported(ids).logits
    assert (expected - base_logits).abs().max() > 1e-3  # the adapters changed the model
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
