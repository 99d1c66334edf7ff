"""Bad input to `pretrain.py` is reported as one line naming the problem and the fix, with exit code 2,
before anything is written or any process group starts.

Each case starts from a valid command line and breaks one thing. The cases run through the scripts'
own entry point (`cli.run_script`) in this process, which is where every check lives; two of them
also run as real processes, for what only a process shows (nothing else on stderr, the exit code).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DATA, expect_one_line_error, launch, run_in_process

from llama_recipe.cli import parse_args, validate
from llama_recipe.plugins import CPU_PLUGINS, PLUGIN_NAMES

VALID = ["-c", "tiny", "-p", "zero2", "-d", str(DATA), "-l", "128", "-b", "2", "--max_steps", "2"]

# case: (arguments added after VALID (later flags win), extra environment, words the message must contain).
# "{tmp}" is replaced by the case's own temporary directory.
CASES = {
    "unknown_plugin": (["-p", "nonsense"], {}, ["nonsense", "-p", *PLUGIN_NAMES]),
    "missing_dataset": (["-d", "/nonexistent/data.jsonl"], {}, ["/nonexistent/data.jsonl", "pass -d"]),
    "empty_glob": (["-d", "{tmp}/nothing-*.jsonl"], {}, ["nothing-*.jsonl", "matches no", "pass -d"]),
    "max_length_above_positions": (["-c", "tiny", "-l", "100000"], {}, ["100000", "1024", "-l"]),
    "missing_checkpoint": (["-f", "/nonexistent/ckpt"], {}, ["/nonexistent/ckpt", "does not exist", "-f"]),
    "incomplete_checkpoint": (["-f", "{tmp}/step-3"], {}, ["step-3", "running_states.json", "-f"]),
    "gemini_on_cpu": (["-p", "gemini"], {}, ["gemini", "CUDA", *CPU_PLUGINS]),
    "gemini_auto_on_cpu": (["-p", "gemini_auto"], {}, ["gemini_auto", "CUDA", *CPU_PLUGINS]),
    "world_size_not_divisible": (
        ["-p", "hybrid_parallel", "--tp", "2"],
        {"WORLD_SIZE": "3"},
        ["world size 3", "tp*pp", "--tp"],
    ),
    "tp_without_hybrid_parallel": (["--tp", "2", "-p", "zero2"], {}, ["--tp", "hybrid_parallel", "zero2"]),
    "zero_tp": (["--tp", "0", "-p", "hybrid_parallel"], {}, ["--tp", "at least 1", "got 0"]),
    "zero_in_hybrid_parallel_fp32": (
        ["-p", "hybrid_parallel", "--zero_stage", "1", "-x", "fp32"],
        {},
        ["--zero_stage", "fp32", "bf16"],
    ),
    "unknown_model_config": (["-c", "nonsense"], {}, ["nonsense", "tiny", "llama2-7b", "70b", "config.json"]),
    "zero_batch_size": (["-b", "0"], {}, ["-b/--batch_size", "at least 1", "got 0"]),
    "non_integer_batch_size": (["-b", "two"], {}, ["-b/--batch_size", "'two'", "int"]),
    "zero_microbatch_size": (["--microbatch_size", "0"], {}, ["--microbatch_size", "at least 1", "got 0"]),
    "nan_learning_rate": (["--lr", "nan"], {}, ["--lr", "above 0", "nan"]),
    "zero_max_steps": (["--max_steps", "0"], {}, ["--max_steps", "at least 1", "got 0"]),
    "negative_grad_clip": (["--grad_clip", "-1"], {}, ["--grad_clip", "at least 0", "got -1"]),
    "negative_seed": (["--seed", "-1"], {}, ["--seed", "at least 0", "got -1"]),
    # sizing epochs of a hub stream would read all of it first
    "hub_stream_without_max_steps": (  # (this case drops VALID's --max_steps)
        ["-d", "someorg/some-corpus", "-e", "1"],
        {},
        ["someorg/some-corpus", "--max_steps", "prepare_data.py"],
    ),
    # Collage and in-place SGD only work where no fp32 master copy / whole gradients are guaranteed
    "collage_with_gemini": (["-p", "gemini", "--optimizer", "collage_plus"], {}, ["gemini", "fp32", "zero2"]),
    "collage_with_mixed_precision": (
        ["--optimizer", "collage_light", "-x", "bf16"],
        {},
        ["collage_light", "master weights", "-x bf16", "pure_bf16"],
    ),
    "pure_bf16_with_hybrid_zero": (
        ["-p", "hybrid_parallel", "-x", "pure_bf16", "--zero_stage", "1"],
        {},
        ["pure_bf16", "--zero_stage 0", "zero2"],
    ),
    "inplace_sgd_with_zero": (["--optimizer", "inplace_sgd", "-p", "zero2"], {}, ["inplace_sgd", "-p ddp", "zero2"]),
    "inplace_sgd_with_accumulation": (
        ["--optimizer", "inplace_sgd", "-p", "ddp", "--accumulation_steps", "2"],
        {},
        ["inplace_sgd", "--accumulation_steps"],
    ),
    "edq_without_collage": (["--log_edq"], {}, ["--log_edq", "collage_light"]),
    "beta2_out_of_range": (["--beta2", "1.5"], {}, ["--beta2", "1.5"]),
    "document_attention_with_hybrid_parallel": (
        ["--document_attention", "-p", "hybrid_parallel"],
        {},
        ["--document_attention", "hybrid_parallel", "zero2"],
    ),
}
GPU_ONLY_CASES = {"gemini_on_cpu", "gemini_auto_on_cpu"}
# Cases also run as real processes: an argparse error and a validation error.
IN_A_PROCESS = ["non_integer_batch_size", "incomplete_checkpoint"]


def _arguments(case: str, tmp) -> list[str]:
    if case == "incomplete_checkpoint":
        (tmp / "step-3" / "model").mkdir(parents=True)  # a checkpoint whose save never finished
    valid = VALID[:-2] if case == "hub_stream_without_max_steps" else VALID
    output = ["-o", str(tmp / "ckpt"), "-t", str(tmp / "tb")]
    return [*valid, *output, *(a.replace("{tmp}", str(tmp)) for a in CASES[case][0])]


def _check(proc, case: str, tmp, before: list) -> None:
    expect_one_line_error(proc, *CASES[case][2])
    assert not (tmp / "ckpt").exists() and not (tmp / "tb").exists()
    assert sorted(p.relative_to(tmp) for p in tmp.rglob("*")) == before  # nothing else appeared either


def test_the_valid_baseline_passes_validation():
    """The cases break exactly one thing: the starting command line itself is accepted."""
    validate(parse_args("pretrain", VALID), world_size=1)
    validate(parse_args("pretrain", [*VALID, "-p", "hybrid_parallel", "--tp", "2"]), world_size=4)


def _skip_gpu_only(cases):
    gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
    return [pytest.param(case, marks=[gpu] if case in GPU_ONLY_CASES else []) for case in cases]


@pytest.mark.parametrize("case", _skip_gpu_only(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    args = _arguments(case, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    _check(run_in_process("pretrain.py", args, env=CASES[case][1]), case, tmp_path, before)


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", IN_A_PROCESS)
def test_bad_input_in_a_real_process(tmp_path, case):
    """Nothing but the one line reaches stderr (no library chatter at import), and the exit code is 2."""
    args = _arguments(case, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    _check(launch("pretrain.py", args, timeout=120), case, tmp_path, before)
