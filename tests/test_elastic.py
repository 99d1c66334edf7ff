"""Elastic resume: a checkpoint saved with 2 data-parallel replicas resumes with 1 and the other way
round, optimizer state resharded (ColossalAI saves it whole) and the data position carried over as
one global position of a prepared dataset, so the steps after the resume match the uninterrupted
run's (same rows per step; only the order of the sums differs). What cannot move is refused."""

from __future__ import annotations

import pytest
from conftest import TINY_RUN, check_ok, expect_one_line_error, launch, read_scalars, run_in_process

pytestmark = pytest.mark.multiprocess
STEPS, SAVE_AT = 4, 2


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer) -> str:
    from conftest import DATA

    from llama_recipe.prepared import prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "sample"
    prepare_dataset(str(DATA), str(out), tokenizer, progress=False)
    return str(out)


def _run(args: list[str], nproc: int):
    return launch("pretrain.py", args, nproc=2) if nproc == 2 else run_in_process("pretrain.py", args)


@pytest.mark.parametrize("plugin,before,after", [("zero2", 2, 1), ("zero2", 1, 2), ("ddp", 2, 1)])
def test_resume_under_another_number_of_replicas(tmp_path, prepared, plugin, before, after):
    common = [
        "-c",
        "tiny",
        "-d",
        prepared,
        "-l",
        "128",
        "-s",
        "0",
        "--lr",
        "5e-3",
        "-p",
        plugin,
        "--max_steps",
        str(STEPS),
        "-o",
        str(tmp_path / "ckpt"),
    ]
    rows = 4  # rows per step, whatever the number of replicas: -b x replicas
    full = _run([*common, "-b", str(rows // before), "-i", str(SAVE_AT), "-t", str(tmp_path / "tb")], before)
    check_ok(full)
    resume = [
        "-b",
        str(rows // after),
        "-i",
        "0",
        "-t",
        str(tmp_path / "tb2"),
        "-f",
        str(tmp_path / "ckpt" / f"step-{SAVE_AT}"),
    ]
    resumed = _run([*common, *resume], after)
    check_ok(resumed)
    assert f"was saved with {plugin}, {before} processes" in resumed.stdout
    assert "optimizer state and data position (prepared: one global position) moved" in resumed.stdout
    losses, resumed_losses = read_scalars(tmp_path / "tb"), read_scalars(tmp_path / "tb2")
    assert sorted(resumed_losses) == [3, 4]
    for step in (3, 4):  # the same rows and the same optimizer state: the same losses, but for rounding
        assert resumed_losses[step] == pytest.approx(losses[step], abs=1e-4), (step, resumed_losses, losses)


def test_what_cannot_move_to_another_layout_is_refused(tmp_path, layout_runs):
    """zero2 x2 on the streamed sample -> 1 process: the stream's position and a changed global batch
    are one line each (with the --reset_* that accepts them); nothing is written."""
    checkpoint = layout_runs("zero2")["root"] / "ckpt" / "step-4"
    args = [*TINY_RUN, "-p", "zero2", "--max_steps", "6", "-f", str(checkpoint), "-o", str(tmp_path / "o"), "-t", ""]
    message = expect_one_line_error(
        run_in_process("pretrain.py", args), "from zero2, 2 processes to zero2, 1 processes"
    )
    assert "would train 2 rows per step instead of 4" in message and "--reset_data" in message
    assert "the data position cannot move" in message and "optimizer" not in message  # zero2 -> zero2 reshards
    tp = run_in_process("pretrain.py", [*args, "-p", "hybrid_parallel", "--tp", "1", "-b", "4"])
    assert "the optimizer state cannot be resharded" in tp.stderr and "--reset_optimizer" in tp.stderr
    assert not (tmp_path / "o").exists()
