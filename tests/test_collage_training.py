"""Collage and pure bf16 inside the real booster plugins, 1–2 processes on CPU.

- Memory: the bytes of every tensor reachable from the boosted model and optimizer (weights,
  gradients, optimizer states, and whatever the plugin keeps: ZeRO's gradient store, fp32 masters),
  per parameter, must be 16 for fp32-master AdamW, 8 for pure-bf16 AdamW, 10 for collage_light and
  12 for collage_plus, under ddp and zero2.
- No fp32 copy survives anywhere in pure bf16, also with 2 ZeRO ranks and with tensor parallelism.
- Resume: Collage's error terms are optimizer state; the steps after a resume reproduce the
  uninterrupted run bit for bit.

These runs compute in real bf16, which is ~10x slower than fp32 on these CPUs (no native bf16), so
they use the tiny model and a handful of steps. They show the optimizer's state and arithmetic, not
bf16 speed.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import TINY_RUN, check_ok, launch, launch_runs, one_rank_process_group, read_scalars, run_in_process
from memory_probe import measure

from llama_recipe.model import get_model_config
from llama_recipe.planner import Layout, Shape, activation_bytes, state_bytes

# (plugin, precision, optimizer) -> expected bytes per parameter of weights + grads + optimizer state
MEMORY_CASES = {
    ("ddp", "bf16", "adamw"): 16,  # fp32 weights (autocast), fp32 grads, fp32 m and v
    ("zero2", "bf16", "adamw"): 16,  # bf16 weights + bf16 grads, fp32 master + m + v
    ("ddp", "pure_bf16", "adamw"): 8,
    ("zero2", "pure_bf16", "adamw"): 8,
    ("ddp", "pure_bf16", "collage_light"): 10,  # + bf16 weight error
    ("zero2", "pure_bf16", "collage_light"): 10,
    ("ddp", "pure_bf16", "collage_plus"): 12,  # + bf16 second-moment error
    ("zero2", "pure_bf16", "collage_plus"): 12,
}
# fp32 tensors allowed in pure bf16: the rotary-embedding frequencies and the optimizer's step counters
FP32_ALLOWANCE_BYTES = 1024


PROBE = ["-c", "tiny", "-l", "64", "-b", "1"]


@pytest.fixture(scope="module")
def memory_reports():
    """One probe per case, one after the other in this process (one rank)."""
    with one_rank_process_group():
        return {case: measure([*PROBE, "-p", case[0], "-x", case[1], "--optimizer", case[2]]) for case in MEMORY_CASES}


@pytest.mark.parametrize("case", list(MEMORY_CASES), ids=["-".join(case) for case in MEMORY_CASES])
def test_bytes_per_parameter(memory_reports, case):
    report = memory_reports[case]
    per_parameter = sum(report["bytes"].values()) / report["parameters"]
    expected = MEMORY_CASES[case]
    assert abs(per_parameter - expected) <= 0.05 * expected, f"{case}: {per_parameter:.3f} B/param, {report}"
    if case[1] == "pure_bf16":
        assert report["param_dtypes"] == ["torch.bfloat16"]
        assert report["bytes"].get("float32", 0) <= FP32_ALLOWANCE_BYTES, report


# collage_plus bytes per parameter on each of 2 ranks: zero2 keeps whole bf16 weights and shards
# the gradients and the 8 bytes of state (2 + 10/2); tensor parallelism splits everything (12/2).
SHARDED_BYTES = {
    "zero2": (["-p", "zero2"], 7),
    "zero2_cpu": (["-p", "zero2_cpu"], 7),  # on a CPU machine "offloaded" state lives where it was
    "tp2": (["-p", "hybrid_parallel", "--tp", "2"], 6),
    "pp2": (
        ["-p", "hybrid_parallel", "--pp", "2", "-b", "2"],
        6,
    ),  # tiny's two stages: embeddings + a layer, a layer + head
}
PLANNED = {  # the planner's layout of each (2 ranks)
    "zero2": Layout("zero2", 2),
    "zero2_cpu": Layout("zero2_cpu", 2, offload=True),
    "tp2": Layout("hybrid_parallel", 2, tp=2),
    "pp2": Layout("hybrid_parallel", 2, pp=2),
}


@pytest.fixture(scope="module")
def sharded_reports(tmp_path_factory) -> dict[str, list[dict]]:
    """Every layout of SHARDED_BYTES measured in turn by one 2-process job: {layout: [rank 0, rank 1]}."""
    out = tmp_path_factory.mktemp("sharded")
    argv = [str(out)]
    for i, (args, _) in enumerate(SHARDED_BYTES.values()):
        argv += [*(["--"] if i else []), *PROBE, *args, "--optimizer", "collage_plus"]
    argv += ["--", "--activations", *PIPELINE_ACTIVATIONS]  # (read by test_planner_pipeline_activation_peaks)
    check_ok(launch("tests/memory_probe.py", argv, nproc=2))
    return {
        layout: [json.loads((out / f"{i}-rank-{r}.json").read_text()) for r in range(2)]
        for i, layout in enumerate([*SHARDED_BYTES, "activations"])
    }


PIPELINE_ACTIVATIONS = ["-c", "tiny4", "-l", "256", "-b", "4", "--mbs", "1", "-p", "hybrid_parallel", "--pp", "2"]
PIPELINE_ACTIVATIONS += ["-x", "fp32"]


@pytest.mark.multiprocess
def test_planner_pipeline_activation_peaks(sharded_reports):
    """pp2 with 4 micro-batches: each stage's activation peak (memory_probe.activation_peak) within 15% of the
    planner's: the first stage holds 2 micro-batches in flight or peaks in the embedding's backward, the last
    runs transformers' own loss (three fp32 copies of the logits)."""
    layout = Layout("hybrid_parallel", 2, pp=2, precision="fp32")
    for report in sharded_reports["activations"]:
        predicted = activation_bytes(Shape.of(get_model_config("tiny4")), layout, 256, 4, report["stage"])
        assert abs(predicted / report["activation_peak"] - 1) <= 0.15, report


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", list(SHARDED_BYTES))
def test_no_fp32_copy_and_sharded_state_with_two_ranks(sharded_reports, layout):
    _, expected = SHARDED_BYTES[layout]
    reports = sharded_reports[layout]
    assert [r["rank"] for r in reports] == [0, 1]
    for report in reports:
        assert report["param_dtypes"] == ["torch.bfloat16"]
        assert report["bytes"].get("float32", 0) <= FP32_ALLOWANCE_BYTES, report
        per_parameter = report["bytes"]["bfloat16"] / report["parameters"]
        assert abs(per_parameter - expected) <= 0.05 * expected, f"{per_parameter:.3f} B/param on one rank, {report}"
        # the planner's state bytes, byte for byte, on each rank (pipeline stage)
        planned = replace(PLANNED[layout], precision="pure_bf16", optimizer="collage_plus")
        stage = report["rank"] if planned.pp > 1 else 0
        assert state_bytes(SHAPE, planned, stage) == report["roles"], layout


SHAPE = Shape.of(get_model_config("tiny"))


@pytest.mark.parametrize("case", list(MEMORY_CASES), ids=["-".join(case) for case in MEMORY_CASES])
def test_planner_state_bytes_equal_the_accounting(memory_reports, case):
    """One rank: ddp and zero2, bf16, pure bf16 and Collage; each role's bytes exactly."""
    plugin, precision, optimizer = case
    assert (
        state_bytes(SHAPE, Layout(plugin, 1, precision=precision, optimizer=optimizer)) == memory_reports[case]["roles"]
    )


RESUME_LAYOUTS = {  # layout: (flags, processes); ddp in this process (the sharded layouts need 2)
    "ddp": (["-p", "ddp"], 1),
    "zero2": (["-p", "zero2"], 2),
    "tp2": (["-p", "hybrid_parallel", "--tp", "2"], 2),
}
STEPS, SAVE_AT = 3, 2  # the step after the resume uses every restored state, error terms included


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", list(RESUME_LAYOUTS))
def test_collage_resume_is_bit_identical(tmp_path, layout):
    flags, nproc = RESUME_LAYOUTS[layout]
    common = [
        *TINY_RUN, *flags, "--optimizer", "collage_plus", "--beta2", "0.999",
        "-o", str(tmp_path / "ckpt"), "--max_steps", str(STEPS), "--log_edq",
    ]  # fmt: skip

    full = [*common, "-i", str(SAVE_AT), "-t", str(tmp_path / "tb")]
    resumed = [*common, "-i", "0", "-t", str(tmp_path / "tb2"), "-f", str(tmp_path / "ckpt" / f"step-{SAVE_AT}")]
    if nproc == 2:  # both runs in one launch, the second from the checkpoint alone
        job = launch_runs({"full": full, "resumed": resumed}, tmp_path)
        check_ok(job)
        stdout = job.stdout
    else:
        first = run_in_process("pretrain.py", full)
        check_ok(first)
        check_ok(run_in_process("pretrain.py", resumed))
        stdout = first.stdout
    assert "pure_bf16" in stdout and "collage_plus" in stdout
    losses, resumed_losses = read_scalars(tmp_path / "tb"), read_scalars(tmp_path / "tb2")
    assert sorted(resumed_losses) == list(range(SAVE_AT + 1, STEPS + 1))
    for step, loss in resumed_losses.items():
        assert loss == losses[step], f"step {step}: {loss!r} after resume vs {losses[step]!r}"
    assert losses[STEPS] < losses[1]
    # --log_edq: the effective descent quality is read back from the real event file
    edq = read_scalars(tmp_path / "tb", "optimizer/edq")
    imprecision = read_scalars(tmp_path / "tb", "optimizer/imprecision_pct")
    assert sorted(edq) == list(range(1, STEPS + 1))
    for step in edq:
        assert 0.5 < edq[step] < 1.5, edq
        assert 0 <= imprecision[step] <= 100, imprecision
