"""Elastic resume: a checkpoint saved with 2 data-parallel replicas resumes with 1 and the other way
round, optimizer state resharded (ColossalAI saves it whole) and the data position carried over as
one global position of a prepared dataset, so the steps after the resume match the uninterrupted
run's (same rows per step; only the order of the sums differs). What cannot move is refused."""

from __future__ import annotations

import pytest
from conftest import TINY_RUN, check_ok, expect_one_line_error, launch_runs, read_scalars, run_in_process, run_outputs

pytestmark = pytest.mark.multiprocess
STEPS, SAVE_AT = 4, 2


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer) -> str:
    from conftest import DATA

    from llama_recipe.prepared import prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "sample"
    prepare_dataset(str(DATA), str(out), tokenizer, progress=False)
    return str(out)


CASES = [("zero2", 2, 1), ("zero2", 1, 2), ("ddp", 2, 1)]  # (plugin, replicas before, replicas after)
ROWS = 4  # rows per step, whatever the number of replicas: -b x replicas


def _flags(plugin: str, replicas: int, root, phase: str, prepared: str) -> list[str]:
    """Case `root`'s run: "full" saves at SAVE_AT, "resumed" resumes from there with `replicas`."""
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
        str(root / "ckpt"),
        "-b",
        str(ROWS // replicas),
    ]
    if phase == "full":
        return [*common, "-i", str(SAVE_AT), "-t", str(root / "tb")]
    return [*common, "-i", "0", "-t", str(root / "tb2"), "-f", str(root / "ckpt" / f"step-{SAVE_AT}")]


@pytest.fixture(scope="module")
def elastic_runs(tmp_path_factory, prepared) -> dict:
    """Every case's full run and resume; the 2-process runs of all cases in ONE launch (each from its
    own flags: a resume reads only its checkpoint), the 1-process ones in this process, in the order
    each case needs. {case: (root, the resumed run's stdout)}."""
    roots = {case: tmp_path_factory.mktemp("-".join(map(str, case))) for case in CASES}
    for (plugin, before, _), root in roots.items():  # 1-process full runs first (zero2 1 -> 2 resumes from one)
        if before == 1:
            check_ok(run_in_process("pretrain.py", _flags(plugin, 1, root, "full", prepared)))
    two = {}
    for (plugin, before, after), root in roots.items():
        if before == 2:
            two[f"{plugin}-{before}-{after}-full"] = _flags(plugin, 2, root, "full", prepared)
        if after == 2:
            two[f"{plugin}-{before}-{after}-resumed"] = _flags(plugin, 2, root, "resumed", prepared)
    job = launch_runs(two, tmp_path_factory.mktemp("elastic"))
    check_ok(job)
    outputs, resumed = run_outputs(job), {}
    for (plugin, before, after), root in roots.items():
        if after == 1:
            proc = run_in_process("pretrain.py", _flags(plugin, 1, root, "resumed", prepared))
            check_ok(proc)
            resumed[(plugin, before, after)] = (root, proc.stdout)
        else:
            resumed[(plugin, before, after)] = (root, outputs[f"{plugin}-{before}-{after}-resumed"])
    return resumed


@pytest.mark.parametrize("plugin,before,after", CASES)
def test_resume_under_another_number_of_replicas(elastic_runs, plugin, before, after):
    root, stdout = elastic_runs[(plugin, before, after)]
    assert f"was saved with {plugin}, {before} processes" in stdout
    assert "optimizer state and data position moved" in stdout
    losses, resumed_losses = read_scalars(root / "tb"), read_scalars(root / "tb2")
    assert sorted(resumed_losses) == [3, 4]
    for step in (3, 4):  # the same rows and the same optimizer state: the same losses, but for rounding
        assert resumed_losses[step] == pytest.approx(losses[step], abs=1e-4), (step, resumed_losses, losses)


def test_what_cannot_move_to_another_layout_is_refused(tmp_path, layout_runs):
    """zero2 x2 on the streamed sample -> 1 process: a changed global batch is one line (with the
    --reset_data that accepts it), as is an optimizer that cannot be resharded; nothing is written.
    With the same rows per step the stream moves (its exactly-once is tests/test_data_scale.py's)."""
    checkpoint = layout_runs("zero2")["root"] / "ckpt" / "step-4"
    args = [*TINY_RUN, "-p", "zero2", "--max_steps", "6", "-f", str(checkpoint), "-o", str(tmp_path / "o"), "-t", ""]
    message = expect_one_line_error(run_in_process("pretrain.py", args), "would train 2 rows per step instead of 4")
    assert "--reset_data" in message and "optimizer" not in message  # zero2 -> zero2 reshards
    tp = run_in_process("pretrain.py", [*args, "-p", "hybrid_parallel", "--tp", "1", "-b", "4"])
    assert "the optimizer state cannot be resharded" in tp.stderr and "--reset_optimizer" in tp.stderr
    assert not (tmp_path / "o").exists()
    moved = run_in_process("pretrain.py", [*args, "-b", "4", "-i", "0"])
    check_ok(moved)
    assert "optimizer state and data position moved to the new layout" in moved.stdout
    assert "resumed from" in moved.stdout and "step 6" in moved.stdout
