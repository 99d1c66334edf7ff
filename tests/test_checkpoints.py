"""Checkpoints users can trust: atomic saves, `latest`, keep-last-k, SIGTERM, kill -9, HF export,
loading across layouts, a non-finite loss, and one-line errors for bad checkpoints. Real runs on CPU."""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    RESUME_FROM,
    STEPS,
    TINY_RUN,
    assert_ledger_line_is,
    check_ok,
    expect_error_after_training,
    expect_one_line_error,
    launch,
    launch_runs,
    ledger_lines,
    read_scalars,
    run_in_process,
    run_outputs,
    signal_job,
    trainer_batches,
)

from llama_recipe.cli import parse_args


def latest_checkpoint(save_dir: Path) -> Path:
    return save_dir / (save_dir / "latest").read_text().strip()


@pytest.fixture
def zero2_run(layout_runs) -> Path:
    """conftest's zero2 run: 6 steps on 2 processes, a checkpoint every step, keeping the newest 4."""
    return layout_runs("zero2")["root"]


@pytest.mark.multiprocess
def test_keep_last_keeps_exactly_k_and_latest_points_to_the_newest(zero2_run):
    ckpt = zero2_run / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-3", "step-4", "step-5", "step-6"]
    assert latest_checkpoint(ckpt).name == f"step-{STEPS}"
    rng_files = sorted(p.name for p in (ckpt / f"step-{STEPS}" / "rng").iterdir())
    assert rng_files == ["rank-0.json", "rank-1.json"]  # JSON: reading it back runs no code


@pytest.mark.multiprocess
def test_training_logs_mfu_with_the_benchmark_formula(zero2_run):
    """Both conventions (metrics.MFU_FORMULA) at every step: attention halved for the causal mask, and
    counted whole as PaLM, nanoGPT and torchtitan count, higher by exactly the ratio of their FLOPs."""
    from llama_recipe.metrics import training_flops_per_token
    from llama_recipe.model import get_model_config

    mfu = read_scalars(zero2_run / "tb", "train/mfu")
    assert sorted(mfu) == list(range(1, STEPS + 1)) and all(0 < v < 1 for v in mfu.values())
    full = read_scalars(zero2_run / "tb", "train/mfu_full_attention")
    config = get_model_config("tiny")
    ratio = training_flops_per_token(config, 128, causal=False) / training_flops_per_token(config, 128)
    assert sorted(full) == sorted(mfu) and all(full[s] == pytest.approx(mfu[s] * ratio, rel=1e-6) for s in mfu)


@pytest.mark.multiprocess
def test_pretraining_trains_with_llama2s_adam_epsilon(zero2_run):
    """The optimizer the run saved took --adam_eps's pretraining default, Llama 2's 1e-5."""
    groups = torch.load(zero2_run / "ckpt" / f"step-{STEPS}" / "optimizer" / "pytorch_optim_group.bin")
    assert [group["eps"] for group in groups] == [1e-5, 1e-5]  # the decayed and the undecayed group


@pytest.mark.multiprocess
def test_a_resumed_runs_loss_curve_covers_the_whole_run(zero2_run):
    """The launch resumed from step 3 logs steps 4-6 to its own -t, yet its loss.png draws steps 1-6:
    1-3 read back from the event files of the run that saved step 3 (its recorded -t)."""
    from PIL import Image

    assert sorted(read_scalars(zero2_run / "tb_resumed")) == list(range(4, STEPS + 1))
    for tb in ("tb", "tb_resumed"):
        described = Image.open(zero2_run / tb / "loss.png").text["Description"]
        assert described == f"training loss at {STEPS} steps, 1 to {STEPS}", tb


@pytest.mark.multiprocess
def test_each_checkpoints_run_yaml_reads_back_as_its_runs_config(zero2_run):
    """Every checkpoint holds run.yaml, its run's flags: read back with --config_file they give the config
    its running_states.json records, less where they came from and -f (not recorded). conftest's resumed
    run took its flags from step-3's run.yaml (its bit-identical losses: test_plugins_cpu.py)."""
    ckpt = zero2_run / "ckpt"
    recorded = {}
    for step, not_recorded in ((RESUME_FROM, {"config_file"}), (STEPS, {"config_file", "load"})):
        recorded[step] = json.loads((ckpt / f"step-{step}" / "running_states.json").read_text())["config"]
        again = parse_args("pretrain", ["--config_file", str(ckpt / f"step-{step}" / "run.yaml")]).to_dict()
        assert sorted(again) == sorted(recorded[step])
        assert {k for k, v in recorded[step].items() if again[k] != v} == not_recorded
    full, resumed = recorded[RESUME_FROM], recorded[STEPS]  # the resumed run typed -f, -i and -t
    assert resumed["config_file"] == str(ckpt / f"step-{RESUME_FROM}" / "run.yaml")
    typed = {"config_file", "load", "save_interval", "tensorboard_dir"}
    assert {k for k, v in full.items() if resumed[k] != v} == typed


@pytest.mark.multiprocess
def test_hf_export_round_trips_with_identical_logits(zero2_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = zero2_run / "ckpt" / f"step-{STEPS}"
    check_ok(run_in_process("scripts/export_hf.py", [str(checkpoint), str(tmp_path / "hf")]))
    # Same attention kernel on both sides, so the comparison is about the weights and config alone.
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    trained = AutoModelForCausalLM.from_pretrained(checkpoint / "model", attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert len(tokenizer) == 32000 and (tmp_path / "hf" / "model.safetensors").is_file()
    ids = tokenizer("The meaning of pretraining is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, trained(ids).logits)
    # The exported weights are the trained ones: the run's next loss would come from them.
    for name, tensor in trained.state_dict().items():
        assert torch.equal(tensor, exported.state_dict()[name]), name


def _first_batch_loss(model_dir: Path, dp_size: int, tokenizer) -> float:
    """HF loss of these weights on the first batch each of `dp_size` replicas reads."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    losses = []
    for r in range(dp_size):
        batch = trainer_batches(tokenizer, r, dp_size).next_batch()
        with torch.no_grad():  # the trainer feeds input_ids and labels (positions stay continuous)
            losses.append(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item())
    return sum(losses) / dp_size


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout,nproc", [(["-p", "hybrid_parallel", "--tp", "2"], 2), (["-p", "ddp"], 1)],
                         ids=["zero2x2->tp2", "zero2x2->ddp1"])  # fmt: skip
def test_weights_load_across_layouts_with_a_clear_message(zero2_run, tmp_path, tokenizer, layout, nproc):
    checkpoint = zero2_run / "ckpt" / f"step-{STEPS}"
    args = [*TINY_RUN, *layout, "--max_steps", str(STEPS + 1), "-f", str(checkpoint), "-o", str(tmp_path / "ckpt")]
    # knowingly: another schedule (one more step), a fresh optimizer (another plugin), the stream from its start
    args += ["--reset_schedule", "--reset_optimizer", "--reset_data"]
    args += ["-t", str(tmp_path / "tb")]
    proc = launch("pretrain.py", args, nproc=2) if nproc == 2 else run_in_process("pretrain.py", args)
    check_ok(proc)
    assert "was saved with zero2, 2 processes" in proc.stdout
    assert "the weights, schedule moved to the new layout" in proc.stdout
    assert "--reset_optimizer: the optimizer starts fresh; --reset_data: the data stream starts" in proc.stdout
    losses = read_scalars(tmp_path / "tb")
    assert list(losses) == [STEPS + 1]  # the step count continues
    # The data restarted, so the step trains on the stream's first batch, with the checkpoint's weights.
    assert losses[STEPS + 1] == pytest.approx(_first_batch_loss(checkpoint / "model", 1, tokenizer), abs=1e-4)


@pytest.mark.multiprocess
def test_the_data_ledger_is_what_each_rank_trained_on(layout_runs, tokenizer):
    """conftest's zero2 run on 2 replicas and its resume from step 3 each write a ledger beside their
    -t: each rank's lines for steps 1-6 (the full run's) are the batches that rank reads, rebuilt here;
    the resume's for steps 4-6 are the same (it checked its first step against the full run's line,
    found through step-3's recorded -t, and so warned of nothing)."""
    run = layout_runs("zero2")
    for rank in (0, 1):
        lines = ledger_lines(run["root"] / "tb", rank)
        assert [entry["step"] for entry in lines] == list(range(1, STEPS + 1))
        assert {entry["rank"] for entry in lines} == {rank}
        rebuilt = trainer_batches(tokenizer, rank, 2)
        for entry in lines:
            assert_ledger_line_is(entry, [rebuilt.next_batch()], tokenizer)
        assert ledger_lines(run["root"] / "tb_resumed", rank) == lines[RESUME_FROM:]
    assert f"data ledger: {run['root'] / 'tb' / 'ledger'}/rank-<R>.jsonl" in run["stdout"]
    assert "warning:" not in run["stdout"]


def resume_in_one_process(args: list[str]):
    """A 2-process run's checkpoint resumed in this process, on one replica: what the fault tests need
    to show is that it loads and trains on (weights and optimizer resharded; the stream restarts,
    --reset_data, as it cannot move to another layout). Cheaper than a second 2-process launch."""
    resumed = run_in_process("pretrain.py", [*args, "--reset_data"])
    check_ok(resumed)
    return resumed


@pytest.mark.multiprocess
def test_kill_9_during_a_save_keeps_latest_on_the_previous_checkpoint(tmp_path, background_jobs, tokenizer):
    """kill -9 of the whole job mid-save: `latest` names a complete checkpoint and the run resumes. Each
    rank's data ledger holds every step up to the kill (less at most the one in flight), as trained on
    (the batches rebuilt here); the resume (on one replica, the data from its start) appends its own
    steps after the line the kill cut short."""
    save_dir = tmp_path / "ckpt"
    tb = tmp_path / "tb"  # (the data ledger is beside it)
    args = [*TINY_RUN, "-p", "zero2", "--max_steps", "40", "-i", "1", "-o", str(save_dir), "-t", str(tb)]
    job = launch("pretrain.py", args, nproc=2, log=tmp_path / "log.txt")
    background_jobs.append(job)
    caught = None
    deadline = time.time() + 240
    while caught is None and time.time() < deadline and job.poll() is None:
        partial = [p for p in save_dir.glob(".step-*.tmp") if int(p.name[6:-4]) >= 3] if save_dir.is_dir() else []
        if partial:
            signal_job(job, signal.SIGKILL)  # every process of the job, mid-save
            caught = partial[0]
        time.sleep(0.001)
    job.wait(timeout=60)
    assert caught is not None, "never caught a save in progress:\n" + (tmp_path / "log.txt").read_text()[-3000:]
    killed_step = int(caught.name[6:-4])

    latest = latest_checkpoint(save_dir)
    states = json.loads((latest / "running_states.json").read_text())
    assert states["step"] in (killed_step - 1, killed_step)  # the rename may just have happened; never a partial one
    assert not (save_dir / f"step-{killed_step}").exists() or states["step"] == killed_step

    kept = {}
    for rank in (0, 1):
        written = (tb / "ledger" / f"rank-{rank}.jsonl").read_text().split("\n")[:-1]  # (less a cut line)
        kept[rank] = len(written)
        assert [json.loads(line)["step"] for line in written] == list(range(1, len(written) + 1))
        assert len(written) >= killed_step - 1
        rebuilt = trainer_batches(tokenizer, rank, 2)
        for line in written:
            assert_ledger_line_is(json.loads(line), [rebuilt.next_batch()], tokenizer)

    resume = ["--max_steps", str(killed_step + 1), "-i", "1", "-f", "latest", "-o", str(save_dir), "-t", str(tb)]
    resumed = resume_in_one_process([*TINY_RUN, "-p", "zero2", *resume, "--reset_schedule"])
    assert f"resumed from {latest} at step {states['step']}" in resumed.stdout
    assert not list(save_dir.glob(".step-*.tmp"))  # the half-written step was written again, whole
    after = ledger_lines(tb, 0)[kept[0] :]  # every line whole: the resume's start on a line of their own
    assert [entry["step"] for entry in after] == list(range(states["step"] + 1, killed_step + 2))
    rebuilt = trainer_batches(tokenizer, 0, 1)  # --reset_data: the stream from its start, on one replica
    for entry in after:
        assert_ledger_line_is(entry, [rebuilt.next_batch()], tokenizer)


def bit_identical(x, y) -> bool:
    """Nested states equal: tensors bit for bit (dtype and shape too), everything else by ==."""
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(bit_identical(x[k], y[k]) for k in x)
    if isinstance(x, list | tuple):
        return type(x) is type(y) and len(x) == len(y) and all(map(bit_identical, x, y))
    return x == y


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every file of checkpoint `b` is in `a` with the same contents: tensors equal bit for bit, the
    same data positions and RNG states, the same step and counters (the run's own config aside)."""
    from safetensors.torch import load_file

    files = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    for name in files:
        if name.suffix in (".safetensors", ".bin", ".pt"):
            read = load_file if name.suffix == ".safetensors" else lambda path: torch.load(path, weights_only=True)
            assert bit_identical(read(a / name), read(b / name)), a / name
        elif name.name == "running_states.json":
            x, y = (json.loads((c / name).read_text()) for c in (a, b))
            for states in (x, y):
                del states["config"], states["saved_at"]  # the flags differ (--async_save), and the clock
            assert x == y
        elif name.name == "run.yaml":  # each run's own flags (they differ): each reads back as its recorded config
            for c in (a, b):
                recorded = json.loads((c / "running_states.json").read_text())["config"]
                again = parse_args("pretrain", ["--config_file", str(c / name)]).to_dict()
                assert {k for k, v in recorded.items() if again[k] != v} <= {"config_file", "load"}, c / name
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), a / name


@pytest.mark.multiprocess
def test_async_save_writes_what_a_synchronous_save_writes_and_resumes_the_same(zero2_run, tmp_path):
    """--async_save with zero2 on 2 processes, a checkpoint every step, the newest 4 kept: the same
    losses bit for bit as conftest's synchronous zero2 run, the same checkpoints (every tensor, data
    position and RNG state), no temporary debris; and a resume from its step 3 reproduces the
    uninterrupted run's losses bit for bit."""
    save_dir, sync_dir = tmp_path / "ckpt", zero2_run / "ckpt"
    common = [*TINY_RUN, "-p", "zero2", "--max_steps", str(STEPS), "--async_save", "-o", str(save_dir)]
    resume = ["-i", "2", "-f", str(save_dir / "step-3"), "-t", str(tmp_path / "tb_resumed")]
    runs = {
        "async": [*common, "-i", "1", "--keep_last", "4", "-t", str(tmp_path / "tb")],
        "resumed": [*common, *resume],
    }
    job = launch_runs(runs, tmp_path)  # one launch: the resume starts from step-3 alone
    check_ok(job)
    assert "to the background writer, which writes it while the next step computes" in run_outputs(job)["async"]
    sync_losses = read_scalars(zero2_run / "tb")
    assert read_scalars(tmp_path / "tb") == sync_losses
    assert sorted(p.name for p in save_dir.iterdir()) == ["latest", "step-3", "step-4", "step-5", "step-6"]
    assert (save_dir / "latest").read_text().strip() == f"step-{STEPS}"
    for step in (3, 5):  # (step-4 and -6: the resumed run wrote them again; the synchronous step-6 too)
        assert_same_checkpoint(save_dir / f"step-{step}", sync_dir / f"step-{step}")
    assert read_scalars(tmp_path / "tb_resumed") == {step: sync_losses[step] for step in range(4, STEPS + 1)}


@pytest.mark.multiprocess
def test_kill_9_during_a_background_write_keeps_the_previous_checkpoint(tmp_path, background_jobs):
    """kill -9 of the whole job after a checkpoint's stall (every rank's small files are there, training
    went on) and before its completion: `latest` names the previous checkpoint, and the run resumes."""
    save_dir = tmp_path / "ckpt"
    common = [*TINY_RUN, "-p", "zero2", "-i", "1", "--async_save", "-o", str(save_dir), "-t", ""]
    job = launch("pretrain.py", [*common, "--max_steps", "40"], nproc=2, log=tmp_path / "log.txt")
    background_jobs.append(job)
    caught, deadline = None, time.time() + 240
    while caught is None and time.time() < deadline and job.poll() is None:
        for tmp in save_dir.glob(".step-*.tmp") if save_dir.is_dir() else []:
            snapshot_done = all((tmp / "rng" / f"rank-{r}.json").is_file() for r in (0, 1))
            if int(tmp.name[6:-4]) >= 3 and snapshot_done and not (tmp / "running_states.json").exists():
                signal_job(job, signal.SIGKILL)
                caught = tmp
                break
        time.sleep(0.001)
    job.wait(timeout=60)
    assert caught is not None, "never caught a background write:\n" + (tmp_path / "log.txt").read_text()[-3000:]
    killed_step = int(caught.name[6:-4])

    latest = latest_checkpoint(save_dir)
    step = json.loads((latest / "running_states.json").read_text())["step"]
    assert step in (killed_step - 1, killed_step)  # it may just have completed; never a partial one
    assert not (save_dir / f"step-{killed_step}").exists() or step == killed_step
    resumed = resume_in_one_process([*common, "--max_steps", str(killed_step + 1), "-f", "latest", "--reset_schedule"])
    assert f"resumed from {latest} at step {step}" in resumed.stdout
    assert not list(save_dir.glob(".step-*.tmp"))
    assert (save_dir / "latest").read_text().strip() == f"step-{killed_step + 1}"


@pytest.mark.multiprocess
def test_sigterm_saves_a_loadable_checkpoint_and_exits(tmp_path, background_jobs):
    """With --async_save and a checkpoint every 2 steps, so SIGTERM often finds a background write in
    flight: the run waits for it (and saves its last step if that one was not due), so `latest` is the
    step it stopped at, complete, with no temporary debris."""
    save_dir, tb = tmp_path / "ckpt", tmp_path / "tb"
    common = [*TINY_RUN, "-p", "zero2", "-i", "2", "--async_save", "--keep_last", "2", "-o", str(save_dir)]
    job = launch("pretrain.py", [*common, "--max_steps", "500", "-t", str(tb)], nproc=2, log=tmp_path / "log.txt")
    background_jobs.append(job)
    deadline = time.time() + 240
    while time.time() < deadline and job.poll() is None:
        try:
            if len(read_scalars(tb)) >= 3:
                break
        except Exception:  # the log directory or its first scalar does not exist yet
            pass
        time.sleep(0.5)
    signal_job(job, signal.SIGTERM)  # what a scheduler does before preemption
    job.wait(timeout=120)
    log = (tmp_path / "log.txt").read_text()
    assert "SIGTERM received: stopping at the end of step" in log, log[-3000:]

    checkpoint = latest_checkpoint(save_dir)
    step = json.loads((checkpoint / "running_states.json").read_text())["step"]
    assert 3 <= step < 500 and checkpoint.name == f"step-{step}"
    assert re.search(rf"SIGTERM received: stopping at the end of step {step}\b", log), log[-3000:]
    assert not list(save_dir.glob(".step-*.tmp"))
    resume = ["--max_steps", str(step + 1), "--reset_schedule", "-f", "latest", "-t", str(tmp_path / "tb2")]
    resume_in_one_process([*common, *resume])
    assert list(read_scalars(tmp_path / "tb2")) == [step + 1]


def test_non_finite_losses_in_a_row_stop_with_one_line_and_keep_the_checkpoint(tmp_path):
    """An absurd learning rate makes every loss from step 2 on NaN: each of those updates is skipped,
    and the third in a row stops the run with one line naming the steps and the last good checkpoint
    (exit code 3); that checkpoint is intact and still `latest`, nothing after it is saved, and the
    signal handlers the loop installed are gone again."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    save_dir = tmp_path / "ckpt"
    args = [*TINY_RUN, "-p", "ddp", "--lr", "1e10", "--max_steps", "10", "-i", "1", "--max_bad_steps", "3"]
    proc = run_in_process("pretrain.py", [*args, "-o", str(save_dir), "-t", ""])
    message = expect_error_after_training(proc, str(save_dir / "step-1"), code=3)
    assert message.startswith("error: 3 steps in a row (steps 2-4) had a non-finite loss"), message
    assert "step 2: loss nan, update skipped (1 in a row; the run stops at 3)" in proc.stdout
    assert "step 2: its " in proc.stdout and "documents are quarantined" in proc.stdout  # (past the read-ahead)
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in save_dir.iterdir()) == ["latest", "step-1"]
    assert latest_checkpoint(save_dir).name == "step-1"
    assert json.loads((save_dir / "step-1" / "running_states.json").read_text())["step"] == 1
    assert {sig: signal.getsignal(sig) for sig in before} == before


# Bad checkpoints: one line, exit code 2, nothing written.


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.multiprocess
def test_corrupt_running_states_is_one_line(zero2_run, tmp_path):
    bad = _copy_checkpoint(zero2_run / "ckpt" / "step-4", tmp_path / "step-4")
    (bad / "running_states.json").write_text("{not json")
    proc = run_in_process("pretrain.py", [*TINY_RUN, "-p", "ddp", "-f", str(bad), "-o", str(tmp_path / "o")])
    expect_one_line_error(proc, "corrupt")
    assert not (tmp_path / "o").exists()


@pytest.mark.multiprocess
def test_checkpoint_of_another_model_is_one_line(zero2_run, tmp_path):
    args = [*TINY_RUN, "-p", "ddp", "-c", "small", "-f", str(zero2_run / "ckpt" / "step-4"), "-o", str(tmp_path / "o")]
    expect_one_line_error(run_in_process("pretrain.py", args), "different model", "hidden_size 64 vs 512")


def test_missing_latest_is_one_line(tmp_path):
    args = [*TINY_RUN, "-p", "ddp", "-f", "latest", "-o", str(tmp_path / "o")]
    expect_one_line_error(run_in_process("pretrain.py", args), "latest", "does not exist")


@pytest.mark.multiprocess
def test_truncated_weights_are_one_line(zero2_run, tmp_path):
    bad = _copy_checkpoint(zero2_run / "ckpt" / "step-4", tmp_path / "step-4")
    shard = next((bad / "model").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    args = [*TINY_RUN, "-p", "ddp", "--max_steps", str(STEPS), "-f", str(bad), "-o", str(tmp_path / "o"), "-t", ""]
    args += ["--reset_data", "--reset_optimizer"]  # zero2 x2 -> ddp x1: all that may move, so the load is tried
    expect_one_line_error(run_in_process("pretrain.py", args), shard.name, "damaged (cut short?)")
    assert not (tmp_path / "o").exists()


def _rewrite_safetensors(path: Path, change) -> None:
    """Rewrite a safetensors file (a valid one) after `change(tensors)` edits its tensors."""
    from safetensors.torch import load_file

    from llama_recipe.files import write_safetensors

    tensors = {name: t.clone() for name, t in load_file(str(path)).items()}  # copies: the file is rewritten
    change(tensors)
    write_safetensors(tensors, path)


# damage: (what it does to a copy of step-4, words the one-line error must hold)
DAMAGES = {
    # the measured case: a valid safetensors file holding 1,000 of 2,048,000 elements of one exp_avg
    "exp_avg_cut_short": (
        lambda c: _rewrite_safetensors(
            c / "optimizer" / "zero-rank-0.safetensors", lambda t: t.update({"0.exp_avg": t["0.exp_avg"][:1000]})
        ),
        ["zero-rank-0.safetensors", "0.exp_avg", "1000 elements", "zero-slices.json"],
    ),
    "weight_of_another_shape": (
        lambda c: _rewrite_safetensors(
            next((c / "model").glob("*.safetensors")),
            lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:32]}),
        ),
        ["model-", "model.norm.weight", "[32]", "[64]"],
    ),
    "weight_missing": (
        lambda c: _rewrite_safetensors(next((c / "model").glob("*.safetensors")), lambda t: t.pop("model.norm.weight")),
        ["model.norm.weight"],
    ),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_refused_before_anything_is_written(zero2_run, tmp_path, damage):
    """A real resume (zero2, less one replica: the optimizer state is resliced) from a copy of step-4
    with one tensor wrong: one line naming the file and the tensor, exit 2, no -o; never training
    on zero-filled moments or a model that is not the checkpoint's."""
    bad = _copy_checkpoint(zero2_run / "ckpt" / "step-4", tmp_path / "step-4")
    DAMAGES[damage][0](bad)
    args = [*TINY_RUN, "-p", "zero2", "--max_steps", str(STEPS), "-f", str(bad), "-o", str(tmp_path / "o"), "-t", ""]
    expect_one_line_error(run_in_process("pretrain.py", [*args, "--reset_data"]), *DAMAGES[damage][1])
    assert not (tmp_path / "o").exists()
