"""Bad input to `pretrain.py` is reported as one line naming the problem and the fix, with exit code 2,
before anything is written or any process group starts.

Each case starts from a valid command line, breaks one thing, and runs the real script (one process,
no launcher). The scripts take a few seconds each to import torch, so the selected cases run
concurrently, once, in a module fixture; each test then checks its own case.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import DATA, run_script, script_env

from llama_recipe.plugins import PLUGIN_NAMES

VALID = ["-c", "tiny", "-p", "zero2", "-d", str(DATA), "-l", "128", "-b", "2", "--max_steps", "2"]
CPU_PLUGIN_NAMES = ["ddp", "zero2", "zero2_cpu", "hybrid_parallel"]

# case: (arguments added after VALID (later flags win), extra environment, words the message must contain).
# "{tmp}" is replaced by the case's own temporary directory.
CASES = {
    "unknown_plugin": (["-p", "nonsense"], {}, ["nonsense", "-p", *PLUGIN_NAMES]),
    "missing_dataset": (["-d", "/nonexistent/data.jsonl"], {}, ["/nonexistent/data.jsonl", "pass -d"]),
    "empty_glob": (["-d", "{tmp}/nothing-*.jsonl"], {}, ["nothing-*.jsonl", "matches no", "pass -d"]),
    "max_length_above_positions": (["-c", "tiny", "-l", "100000"], {}, ["100000", "1024", "-l"]),
    "missing_checkpoint": (["-f", "/nonexistent/ckpt"], {}, ["/nonexistent/ckpt", "does not exist", "-f"]),
    "incomplete_checkpoint": (["-f", "{tmp}/step-3"], {}, ["step-3", "running_states.json", "-f"]),
    "gemini_on_cpu": (["-p", "gemini"], {}, ["gemini", "CUDA", *CPU_PLUGIN_NAMES]),
    "gemini_auto_on_cpu": (["-p", "gemini_auto"], {}, ["gemini_auto", "CUDA", *CPU_PLUGIN_NAMES]),
    "world_size_not_divisible": (
        ["-p", "hybrid_parallel", "--tp", "2"],
        {"WORLD_SIZE": "3"},
        ["world size 3", "tp*pp", "--tp"],
    ),
    "tp_without_hybrid_parallel": (["--tp", "2", "-p", "zero2"], {}, ["--tp", "hybrid_parallel", "zero2"]),
    "zero_in_hybrid_parallel_fp32": (
        ["-p", "hybrid_parallel", "--zero_stage", "1", "-x", "fp32"],
        {},
        ["--zero_stage", "fp32", "bf16"],
    ),
    "unknown_model_config": (["-c", "nonsense"], {}, ["nonsense", "tiny", "llama2-7b", "70b", "config.json"]),
    "zero_batch_size": (["-b", "0"], {}, ["-b/--batch_size", "at least 1", "got 0"]),
    "non_integer_batch_size": (["-b", "two"], {}, ["-b/--batch_size", "'two'", "int"]),
    # --max_steps 0 is "not given": sizing epochs of a hub stream would read all of it first
    "hub_stream_without_max_steps": (
        ["-d", "someorg/some-corpus", "--max_steps", "0"],
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
}
GPU_ONLY_CASES = {"gemini_on_cpu", "gemini_auto_on_cpu"}


def _prepare(case: str, tmp) -> list[str]:
    if case == "incomplete_checkpoint":
        (tmp / "step-3" / "model").mkdir(parents=True)  # a checkpoint whose save never finished
    args, _, _ = CASES[case]
    return [a.replace("{tmp}", str(tmp)) for a in args]


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """Run every case this session selected, concurrently; {case: (tmp dir, entries before, process)}."""
    selected = set()
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if getattr(item, "module", None) is request.module and callspec is not None and "case" in callspec.params:
            selected.add(callspec.params["case"])
    if torch.cuda.is_available():
        selected -= GPU_ONLY_CASES

    def run(case: str):
        tmp = tmp_path_factory.mktemp(case)
        args = _prepare(case, tmp)
        before = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
        output = ["-o", str(tmp / "ckpt"), "-t", str(tmp / "tb")]
        proc = run_script(
            "pretrain.py", [*VALID, *output, *args], env=dict(script_env(), **CASES[case][1]), timeout=120
        )
        return tmp, before, proc

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {case: pool.submit(run, case) for case in sorted(selected)}
        return {case: future.result() for case, future in futures.items()}


def test_the_valid_baseline_passes_validation():
    """The cases break exactly one thing: the starting command line itself is accepted."""
    from llama_recipe.config import parse_pretrain_args, validate

    validate(parse_pretrain_args(VALID), world_size=1)
    validate(parse_pretrain_args([*VALID, "-p", "hybrid_parallel", "--tp", "2"]), world_size=4)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            case,
            marks=[pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")]
            if case in GPU_ONLY_CASES
            else [],
        )
        for case in CASES
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(outcomes, case):
    tmp, before, proc = outcomes[case]
    report = f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    assert proc.returncode == 2, report
    assert "Traceback" not in proc.stderr, report
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, report
    message = lines[0]
    assert message.startswith("error: "), report
    for word in CASES[case][2]:
        assert word in message, f"{word!r} missing from: {message}"

    assert not (tmp / "ckpt").exists() and not (tmp / "tb").exists()
    assert sorted(p.relative_to(tmp) for p in tmp.rglob("*")) == before  # nothing else appeared either
