"""What users and clusters do to a run, injected for real: exports aimed at checkpoints, crafted pickles
in a checkpoint, a `latest` that points elsewhere, resumes with other flags, a second run on the
same directory, paths that cannot be written, a full disk, and a batch whose loss is NaN."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY_RUN,
    assert_ledger_line_is,
    check_ok,
    expect_error_after_training,
    expect_one_line_error,
    launch,
    ledger_lines,
    one_rank_process_group,
    read_scalars,
    run_in_process,
    signal_job,
    trainer_batches,
)

STEPS = 2  # the small run's length; it saves every step


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """2 steps of ddp, one process, a checkpoint every step: root/ckpt/step-{1,2}, root/tb, and the
    last checkpoint exported at the end (--export_hf root/hf)."""
    root = tmp_path_factory.mktemp("small")
    args = [
        *TINY_RUN,
        "-p",
        "ddp",
        "--max_steps",
        str(STEPS),
        "-i",
        "1",
        "-o",
        str(root / "ckpt"),
        "-t",
        str(root / "tb"),
        "--export_hf",
        str(root / "hf"),
    ]
    check_ok(run_in_process("pretrain.py", args))
    assert (root / "hf" / "config.json").is_file() and (root / "hf" / "tokenizer.json").is_file()
    return root


def _listing(path: Path) -> list:
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*"))


# ---------------------------------------------------------------------------------------------
# Nothing lost


@pytest.mark.parametrize(
    "target", ["ckpt", "ckpt/step-1", "ckpt/step-2/model", "."], ids=["-o", "checkpoint", "inside", "above"]
)
def test_an_export_never_writes_over_checkpoints(small_run, target):
    before = _listing(small_run / "ckpt")
    proc = run_in_process("scripts/export_hf.py", [str(small_run / "ckpt" / "step-2"), str(small_run / target)])
    expect_one_line_error(proc)
    assert _listing(small_run / "ckpt") == before


def test_an_export_replaces_only_an_earlier_export(small_run, tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    expect_one_line_error(
        run_in_process("scripts/export_hf.py", [str(small_run / "ckpt" / "step-2"), str(other)]),
        "not an earlier export",
    )
    assert (other / "mine.txt").read_text() == "keep me"
    out = tmp_path / "hf"
    check_ok(run_in_process("scripts/export_hf.py", [str(small_run / "ckpt" / "latest"), str(out)]))  # `latest` works
    first = (out / "model.safetensors").read_bytes()
    check_ok(
        run_in_process("scripts/export_hf.py", [str(small_run / "ckpt" / "step-1"), str(out)])
    )  # over its own export
    assert (out / "model.safetensors").read_bytes() != first and not list(tmp_path.glob(".hf.*"))


def test_export_hf_into_the_save_dir_is_refused_before_training(tmp_path):
    args = [
        *TINY_RUN,
        "-p",
        "ddp",
        "--max_steps",
        "1",
        "-o",
        str(tmp_path / "ckpt"),
        "--export_hf",
        str(tmp_path / "ckpt" / "hf"),
    ]
    expect_one_line_error(run_in_process("pretrain.py", [*args, "-t", ""]), "--export_hf", "checkpoint directory")
    assert not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------------------------------------
# No code from data


class _Planted:
    """Unpickling this creates `marker`: what a crafted checkpoint file would do to a careless loader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("victim", ["optimizer shard", "optimizer groups", "lr_scheduler.pt"])
def test_a_planted_pickle_in_a_checkpoint_never_runs(small_run, tmp_path, victim):
    copy = tmp_path / "step-1"  # not the last step: a run already at --max_steps loads nothing
    shutil.copytree(small_run / "ckpt" / "step-1", copy)
    files = {
        "optimizer shard": sorted(f for f in (copy / "optimizer").glob("*.bin") if "group" not in f.name)[0],
        "optimizer groups": next((copy / "optimizer").glob("*group*.bin")),
        "lr_scheduler.pt": copy / "lr_scheduler.pt",
    }
    marker = tmp_path / "code-ran"
    torch.save(_Planted(marker), files[victim])
    torch.load(files[victim], weights_only=False)  # the control: a careless load does run it
    assert marker.exists()
    marker.unlink()
    args = [*TINY_RUN, "-p", "ddp", "--max_steps", str(STEPS), "-f", str(copy), "-o", str(tmp_path / "o"), "-t", ""]
    expect_one_line_error(run_in_process("pretrain.py", args), "could not load")
    assert not marker.exists()


def test_latest_may_only_name_a_checkpoint_beside_it(small_run, tmp_path):
    save_dir = tmp_path / "ckpt"
    shutil.copytree(small_run / "ckpt", save_dir)
    (save_dir / "latest").write_text(str(small_run / "ckpt" / "step-1") + "\n")  # an absolute path elsewhere
    args = [*TINY_RUN, "-p", "ddp", "--max_steps", str(STEPS), "-f", "latest", "-o", str(save_dir), "-t", ""]
    expect_one_line_error(run_in_process("pretrain.py", args), "latest", "not a step-<N> checkpoint beside it")


# ---------------------------------------------------------------------------------------------
# Damaged state: refused before anything is written


def _edit_json(path: Path, change) -> None:
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))


def _cut_exp_avg(shard: Path) -> None:
    state = torch.load(shard, weights_only=True)
    state[0]["exp_avg"] = state[0]["exp_avg"][:1000].clone()
    torch.save(state, shard)


# damage: (the file of step-1 it changes, how, words the one-line error must hold)
STATE_DAMAGES = {
    "step_beyond_int64": ("running_states.json", lambda s: s.update(step=10**30), ["running_states.json", "step"]),
    "negative_consumed_tokens": (
        "running_states.json",
        lambda s: s.update(consumed_tokens=-5),
        ["running_states.json", "consumed_tokens"],
    ),
    "data_position_beyond_int64": (
        "data/rank-0.json",
        lambda s: s["documents"].update(read=10**30),
        ["data/rank-0.json", "documents.read"],
    ),
    "negative_data_position": ("data/rank-0.json", lambda s: s.update(next_position=-1), ["data/rank-0.json"]),
    "rng_state_out_of_range": (
        "rng/rank-0.json",
        lambda s: s["numpy"][1].__setitem__(0, 2**40),
        ["rng/rank-0.json", "numpy"],
    ),
    "optimizer_moment_of_another_shape": (
        "optimizer/pytorch_optim-00001.bin",
        None,  # ColossalAI's own format (ddp): checked as it is loaded, before training
        ["optimizer", "exp_avg", "[1000, 64]", "[32000, 64]"],
    ),
}


@pytest.mark.parametrize("damage", STATE_DAMAGES)
def test_damaged_state_in_a_checkpoint_is_refused_before_anything_is_written(small_run, tmp_path, damage):
    """A resume from a copy of step-1 (same layout: every file is read) with one number out of range
    or one optimizer tensor cut short: one line naming the file and the field, exit 2, no -o, no -t."""
    copy = tmp_path / "step-1"
    shutil.copytree(small_run / "ckpt" / "step-1", copy)
    file, change, words = STATE_DAMAGES[damage]
    if change is None:
        _cut_exp_avg(copy / file)
    else:
        _edit_json(copy / file, change)
    args = [*TINY_RUN, "-p", "ddp", "--max_steps", str(STEPS), "-f", str(copy), "-o", str(tmp_path / "o")]
    expect_one_line_error(run_in_process("pretrain.py", [*args, "-t", str(tmp_path / "tb")]), *words)
    assert not (tmp_path / "o").exists() and not (tmp_path / "tb").exists()


def test_a_bug_while_loading_shows_its_traceback(small_run, tmp_path, monkeypatch):
    """Only damaged files are reported as a damaged checkpoint: an error of ours while loading (here
    planted where the generators' states are restored) is not turned into "it may be corrupt"."""

    def bug(state):
        raise ZeroDivisionError("a bug, not a damaged file")

    monkeypatch.setattr("llama_recipe.checkpoint_io._set_rng_state", bug)
    args = [*TINY_RUN, "-p", "ddp", "--max_steps", str(STEPS), "-f", str(small_run / "ckpt" / "step-1")]
    with pytest.raises(ZeroDivisionError, match="a bug"):
        run_in_process("pretrain.py", [*args, "-o", str(tmp_path / "o"), "-t", ""])


# ---------------------------------------------------------------------------------------------
# Resumes that do not match


def _resume_args(small_run: Path, out: Path) -> list[str]:
    return [*TINY_RUN, "-p", "ddp", "-f", str(small_run / "ckpt" / "step-1"), "-o", str(out), "-i", "0"]


# The small run's step-1 checkpoint branched into a WSD decay: 4 steps, the last 2 decaying (1-sqrt)
WSD_BRANCH = ["--lr", "1e-3", "--max_steps", "4", "--lr_schedule", "wsd", "--decay_fraction", "0.5"]


@pytest.fixture(scope="module")
def wsd_branch(small_run, tmp_path_factory) -> tuple[Path, str]:
    """The accepted resume: --reset_schedule, a checkpoint every step (root/o/step-{2,3,4}), root/tb."""
    root = tmp_path_factory.mktemp("wsd")
    args = [*_resume_args(small_run, root / "o"), *WSD_BRANCH, "--reset_schedule", "-i", "1", "-t", str(root / "tb")]
    proc = run_in_process("pretrain.py", args)
    check_ok(proc)
    return root, proc.stdout


def test_resuming_with_other_flags_lists_them_until_a_reset_accepts_them(small_run, wsd_branch, tmp_path):
    changed = [*_resume_args(small_run, tmp_path / "o"), *WSD_BRANCH, "-b", "3", "-t", ""]
    message = expect_one_line_error(run_in_process("pretrain.py", changed), "was trained with other flags")
    for words in (
        "3 rows per step instead of 2",
        "--reset_data",
        "--lr 0.005 -> 0.001",
        "--max_steps 2 -> 4",
        "--lr_schedule 'cosine' -> 'wsd'",
        "--decay_fraction 0.2 -> 0.5",
        "--reset_schedule",
    ):
        assert words in message, message
    assert not (tmp_path / "o").exists()

    root, stdout = wsd_branch  # accepted with --reset_schedule, which says what changes
    changes = "--lr 0.005 -> 0.001, --max_steps 2 -> 4, --lr_schedule 'cosine' -> 'wsd', --decay_fraction 0.2 -> 0.5"
    assert f"resuming with --reset_schedule: this run's lr schedule, from step 1 ({changes})" in stdout
    assert "lr schedule: wsd: 0 warmup, 2 stable, 2 decay (1-sqrt) to 10% of --lr" in stdout
    lrs = read_scalars(root / "tb", "train/lr")
    # the step count continued; the new peak lr and length give the schedule: step 2 (update 1) holds the peak,
    # steps 3 and 4 decay, with progress 1/2 and 1: 0.1 + 0.9 * (1 - sqrt(progress)) of the peak
    assert sorted(lrs) == [2, 3, 4]
    assert [lrs[step] for step in (2, 3, 4)] == pytest.approx([1e-3, 1e-3 * (0.1 + 0.9 * (1 - 0.5**0.5)), 1e-4])


def test_a_resume_in_the_middle_of_a_wsd_decay_is_bit_exact(wsd_branch):
    """From the branch's step 3 (the decay half done) to step 4: the same lr, loss and weights as the
    branch's own step 4, bit for bit (the schedule's position comes back with the checkpoint)."""
    from safetensors.torch import load_file

    root, _ = wsd_branch
    checkpoint = root / "o" / "step-3"
    args = [*TINY_RUN, "-p", "ddp", *WSD_BRANCH, "-f", str(checkpoint), "-o", str(root / "o2"), "-t", str(root / "tb2")]
    proc = run_in_process("pretrain.py", args)
    check_ok(proc)
    assert f"resumed from {checkpoint} at step 3" in proc.stdout
    for tag in ("train/lr", "train/loss"):
        assert read_scalars(root / "tb2", tag) == {4: read_scalars(root / "tb", tag)[4]}
    weights = [
        {
            name: t
            for file in sorted((run / "step-4" / "model").glob("*.safetensors"))
            for name, t in load_file(file).items()
        }
        for run in (root / "o", root / "o2")
    ]
    assert weights[0] and weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


# ---------------------------------------------------------------------------------------------
# One run per directory; paths checked before training


@pytest.mark.multiprocess
def test_a_second_run_on_the_same_save_dir_is_refused(tmp_path, background_jobs):
    save_dir = tmp_path / "ckpt"
    args = [*TINY_RUN, "-p", "ddp", "--max_steps", "500", "-i", "0", "-o", str(save_dir), "-t", ""]
    job = launch("pretrain.py", args, log=tmp_path / "log.txt")
    background_jobs.append(job)
    deadline = time.time() + 120
    while not (save_dir / ".lock").exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.2)
    holder = json.loads((save_dir / ".lock").read_text())
    second = run_in_process("pretrain.py", [*args[:-4], "--max_steps", "2", "-o", str(save_dir), "-t", ""])
    expect_one_line_error(second, "another run", f"pid {holder['pid']}", "pass another -o")
    assert job.poll() is None  # the first run trains on, untouched
    signal_job(job, 15)
    job.wait(timeout=120)


def test_a_stale_lock_is_taken_over(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    save_dir = tmp_path / "ckpt"
    save_dir.mkdir()
    (save_dir / ".lock").write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": dead.pid}))
    args = [*TINY_RUN, "-p", "ddp", "--max_steps", "1", "-o", str(save_dir), "-t", ""]
    proc = run_in_process("pretrain.py", args)
    check_ok(proc)
    assert f"the run that held it (pid {dead.pid}) is no longer running" in proc.stdout
    assert not (save_dir / ".lock").exists() and (save_dir / "step-1").is_dir()  # released at the end


def test_paths_that_cannot_be_written_are_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    for flags, words in [
        (["-o", str(tmp_path / "file" / "ckpt")], ["-o/--save_dir", "is a file"]),
        (["-o", str(tmp_path / "file")], ["-o/--save_dir", "is a file"]),
        (["-t", str(tmp_path / "file" / "tb")], ["-t/--tensorboard_dir", "is a file"]),
        (["--export_hf", str(tmp_path / "file")], ["--export_hf", "is a file"]),
    ]:
        args = [*TINY_RUN, "-p", "ddp", "--max_steps", "1", "-o", str(tmp_path / "ok"), "-t", "", *flags]
        expect_one_line_error(run_in_process("pretrain.py", args), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.fixture
def small_filesystem(tmp_path):
    """`small_filesystem(megabytes, read_only=False)`: a tmpfs mounted under tmp_path (needs root)."""
    mounts = []

    def make(megabytes: int, read_only: bool = False) -> Path:
        where = tmp_path / f"fs{len(mounts)}"
        where.mkdir()
        options = f"size={megabytes}m" + (",ro" if read_only else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True).returncode:
            pytest.skip("mounting a tmpfs needs root")
        mounts.append(where)
        return where

    yield make
    for where in mounts:
        subprocess.run(["umount", "--lazy", str(where)], capture_output=True)  # also if a failed run left a file open


def test_a_read_only_save_dir_is_refused_before_training(small_filesystem):
    read_only = small_filesystem(1, read_only=True)
    args = [*TINY_RUN, "-p", "ddp", "--max_steps", "1", "-o", str(read_only / "ckpt"), "-t", ""]
    expect_one_line_error(run_in_process("pretrain.py", args), "-o/--save_dir", "cannot be created", "not writable")


@pytest.mark.parametrize("keep_going", [False, True], ids=["stop", "continue_on_save_error"])
def test_a_full_disk_keeps_the_last_checkpoint(small_filesystem, keep_going):
    """Room for one checkpoint (52 MB) but not two: the second save is refused before a byte is
    written; the run stops (exit 1, one line) or, with --continue_on_save_error, trains to its end."""
    disk = small_filesystem(80)
    save_dir = disk / "ckpt"
    args = [*TINY_RUN, "-p", "ddp", "--max_steps", "3", "-i", "1", "-o", str(save_dir), "-t", ""]
    proc = run_in_process("pretrain.py", [*args, *(["--continue_on_save_error"] if keep_going else [])])
    if keep_going:
        check_ok(proc)
        assert proc.stdout.count("training on (--continue_on_save_error)") == 3  # steps 2 and 3, and the final save
        assert "checkpoint: " + str(save_dir / "step-1") in proc.stdout
    else:
        expect_error_after_training(proc, "MB are free", "checkpoints are intact", str(save_dir / "step-1"), code=1)
    assert sorted(p.name for p in save_dir.iterdir()) == ["latest", "step-1"]  # no partial step-2, no lock left
    assert (save_dir / "latest").read_text().strip() == "step-1"
    assert json.loads((save_dir / "step-1" / "running_states.json").read_text())["step"] == 1


def test_a_disk_that_fills_during_a_save_or_an_export_leaves_nothing_behind(small_run, small_filesystem, tmp_path):
    """The first save's room check knows only the weights (17 of its 52 MB), so on a 30 MB disk the
    save fails while writing (torch.save's RuntimeError, not an OSError): one line, exit 1, no
    temporary directory left. So does an export onto a disk without room for the weights, from
    scripts/export_hf.py and from --export_hf (whose run keeps its checkpoint)."""
    disk = small_filesystem(30)
    args = [*TINY_RUN, "-p", "ddp", "--max_steps", "1", "-o", str(disk / "ckpt"), "-t", ""]
    expect_error_after_training(run_in_process("pretrain.py", args), "saving", "No space left", code=1)
    assert list(disk.iterdir()) == []  # no .step-1.tmp (and the empty -o goes with the lock)
    small = small_filesystem(8)
    proc = run_in_process("scripts/export_hf.py", [str(small_run / "ckpt" / "step-2"), str(small / "hf")])
    expect_one_line_error(proc, "exporting to", "No space left", "nothing was written", code=1)
    args = [*TINY_RUN, "-p", "ddp", "--max_steps", "1", "-o", str(tmp_path / "ckpt"), "-t", ""]
    proc = run_in_process("pretrain.py", [*args, "--export_hf", str(small / "hf")])
    expect_error_after_training(proc, "exporting to", "No space left", code=1)
    assert list(small.iterdir()) == [] and (tmp_path / "ckpt" / "step-1" / "running_states.json").is_file()


# ---------------------------------------------------------------------------------------------
# A bad step


class _CraftedBatch:
    """The real batches, except batch number `at`, which `craft` rewrites."""

    def __init__(self, batches, at: int, craft):
        self.batches, self.at, self.craft, self.taken = batches, at, craft, 0

    def next_batch(self) -> dict:
        batch = self.batches.next_batch()
        self.taken += 1
        return self.craft(batch) if self.taken == self.at else batch

    def __getattr__(self, name):  # epoch, state_dict, load_state_dict
        return getattr(self.batches, name)


def _no_labels(batch: dict) -> dict:
    """No token to predict: the loss is NaN (0/0)."""
    return dict(batch, labels=torch.full_like(batch["labels"], -100))


def _rare_labels(batch: dict) -> dict:
    """Every label the vocabulary's last token, which text never has: after some training, a loss far
    above the recent ones (11.1 after 25 steps near 7.5)."""
    return dict(batch, labels=torch.full_like(batch["labels"], 31999))


def _fit_with(tmp_path, tokenizer, craft, at: int, steps: int, flags: list[str]) -> dict:
    """pretrain's loop for real (plugin, model, optimizer, checkpoints), on batches with one crafted."""
    from conftest import trainer_batches

    from llama_recipe.cli import parse_args
    from llama_recipe.model import get_model_config
    from llama_recipe.parallel import build_parallelism
    from llama_recipe.trainer import RunPlan, fit

    args = [*TINY_RUN, "-p", "ddp", "--max_steps", str(steps), "-o", str(tmp_path / "ckpt"), "-t", str(tmp_path / "tb")]
    cfg = parse_args("pretrain", [*args, *flags])
    with one_rank_process_group():
        par = build_parallelism(cfg)
        batches = _CraftedBatch(trainer_batches(tokenizer, 0, 1), at, craft)
        return fit(cfg, par, RunPlan(get_model_config("tiny"), batches, steps, 0, tokenizer, 128))


def _adamw_updates(checkpoint: Path) -> set[int]:
    shard = torch.load(checkpoint / "optimizer" / "pytorch_optim-00001.bin", weights_only=True)
    return {int(state["step"]) for state in shard.values()}  # AdamW's own count of its updates


def test_a_nan_batch_skips_one_update_and_training_goes_on(tmp_path, tokenizer, capsys):
    """A crafted batch makes step 3's loss NaN: that step changes no weight, optimizer state or lr,
    is counted, and the run carries on to its end.

    Its documents are quarantined: in the data state of the checkpoints after it, never in a later
    batch, also after a resume; scripts/show_batch.py shows them and exports the list. The data ledger names what every step trained on (checked against
    the batches, rebuilt here with the quarantine taken after the third). A resume from step-4 feeds
    step 5 the same tokens (the quarantine resumes exactly); with the interrupted run's line for step
    5 planted with another fingerprint, it says so in one warning line naming the step."""
    from llama_recipe.ledger import read_ledger

    summary = _fit_with(tmp_path, tokenizer, _no_labels, at=3, steps=5, flags=["-i", "4"])
    assert summary["bad_steps"] == 1 and summary["steps"] == 5
    losses, lrs = read_scalars(tmp_path / "tb"), read_scalars(tmp_path / "tb", "train/lr")
    assert torch.isnan(torch.tensor(losses[3])) and all(losses[s] == losses[s] for s in (1, 2, 4, 5))
    assert lrs[4] == lrs[3]  # the schedule did not move at step 3
    assert _adamw_updates(tmp_path / "ckpt" / "step-5") == {4}  # 5 steps, 4 updates
    assert read_scalars(tmp_path / "tb", "train/bad_steps")[5] == 1

    run, tb = tmp_path / "ckpt", tmp_path / "tb"
    lines = ledger_lines(tb, 0)
    assert [entry["step"] for entry in lines] == [1, 2, 3, 4, 5]
    quarantined = lines[2]["documents"]
    assert "step 3: its " in capsys.readouterr().out
    for step in (4, 5):
        assert json.loads((run / f"step-{step}" / "data" / "rank-0.json").read_text())["quarantine"] == sorted(
            quarantined
        )
    rebuilt = trainer_batches(tokenizer, 0, 1)
    for entry in lines:
        assert_ledger_line_is(entry, [rebuilt.next_batch()], tokenizer)
        if entry["step"] == 3:
            rebuilt.add_quarantine(quarantined)
    planted = [json.dumps(dict(e, fingerprint="0" * 16) if e["step"] == 5 else e) for e in lines]
    (tb / "ledger" / "rank-0.jsonl").write_text("\n".join(planted) + "\n")
    _fit_with(tmp_path, tokenizer, _no_labels, at=0, steps=7, flags=["-i", "0", "-f", str(run / "step-4")])
    out = capsys.readouterr().out
    assert out.count("warning:") == 1 and "warning: step 5 trained on other tokens than the interrupted" in out
    resumed = ledger_lines(tb, 0)[5:]
    assert [entry["step"] for entry in resumed] == [5, 6, 7]
    assert resumed[0] == lines[4]  # the same documents and tokens as before
    assert read_ledger(tb / "ledger" / "rank-0.jsonl")[5] == resumed[0]  # the last written counts
    for entry in lines[3:] + resumed:
        assert not {tuple(d) for d in entry["documents"]} & {tuple(d) for d in quarantined}, entry["step"]
    shown = run_in_process("scripts/show_batch.py", [str(tb), "3"])  # what a user looks at first
    check_ok(shown)
    name, record = quarantined[0]
    text = json.loads([x for x in Path(name).read_text().splitlines() if x.strip()][record])["text"]
    assert f"rank 0: fingerprint {lines[2]['fingerprint']}, {len(quarantined)} documents" in shown.stdout
    assert f"  {name}:{record}  {' '.join(text.split())[:100]}\n" in shown.stdout
    exported = run_in_process("scripts/show_batch.py", ["--quarantine", str(run)])
    check_ok(exported)
    assert json.loads(exported.stdout) == sorted(quarantined)


SPIKE_Z = 2.0


@pytest.mark.parametrize("action", ["log", "skip", "stop", "rollback"])
def test_a_loss_spike_is_logged_skipped_stopped_or_rolled_back(tmp_path, tokenizer, capsys, action):
    """A crafted batch at step 26, after 25 steps of text: a loss spike (z-score logged every step;
    2 here, because the window still holds the first steps' fall from 10.4 to 7: the crafted step's z is 2.36,
    the others' at most 0.14)."""
    from llama_recipe.errors import TrainingDiverged

    flags = ["-i", "20", "--on_spike", action, "--spike_z", str(SPIKE_Z)]
    if action == "stop":
        with pytest.raises(TrainingDiverged, match="a loss spike at step 26"):
            _fit_with(tmp_path, tokenizer, _rare_labels, at=26, steps=30, flags=flags)
        assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step-20"]
        return
    summary = _fit_with(tmp_path, tokenizer, _rare_labels, at=26, steps=30, flags=flags)
    out = capsys.readouterr().out
    assert "step 26: loss spike" in out and out.count("loss spike") == 1  # only the crafted step spikes
    if action != "rollback":  # (a rollback logs steps 21-26 again, with the next batches)
        z = read_scalars(tmp_path / "tb", "train/loss_z")
        assert z[26] > SPIKE_Z and max(v for s, v in z.items() if s != 26) < SPIKE_Z
    states = json.loads((tmp_path / "ckpt" / "step-30" / "running_states.json").read_text())
    updates = _adamw_updates(tmp_path / "ckpt" / "step-30")
    if action == "log":
        assert updates == {30} and states["consumed_samples"] == 60
    elif action == "skip":
        assert updates == {29} and states["consumed_samples"] == 60
    else:  # back to step 20's state, steps 21-26's batches skipped: 36 batches read for 30 steps
        assert "rolled back to" in out and "the batches of steps 21-26 are skipped" in out
        assert updates == {30} and states["consumed_samples"] == 72 and summary["steps"] == 30
        # the spike's documents are quarantined: saved with the checkpoint, and in no later batch
        lines = ledger_lines(tmp_path / "tb", 0)
        spike = next(i for i, entry in enumerate(lines) if entry["step"] == 26)
        quarantined = {tuple(d) for d in lines[spike]["documents"]}
        data_state = json.loads((tmp_path / "ckpt" / "step-30" / "data" / "rank-0.json").read_text())
        assert {tuple(d) for d in data_state["quarantine"]} == quarantined
        assert [entry["step"] for entry in lines[spike + 1 :]] == list(range(21, 31))
        assert all(not {tuple(d) for d in entry["documents"]} & quarantined for entry in lines[spike + 1 :])


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    """A save first checks every rank's weights: NaN weights stop the run (exit 3) instead of becoming
    a checkpoint, and the directory keeps only the good checkpoints it had."""
    from llama_recipe.checkpointer import Checkpointer, TrainState
    from llama_recipe.cli import parse_args
    from llama_recipe.errors import TrainingDiverged
    from llama_recipe.model import get_model_config
    from llama_recipe.parallel import build_parallelism
    from llama_recipe.trainer import build_boosted

    cfg = parse_args("pretrain", [*TINY_RUN, "-p", "ddp", "--max_steps", "2", "-o", str(tmp_path / "ckpt")])
    with one_rank_process_group():
        par = build_parallelism(cfg)
        model, optimizer, schedule = build_boosted(cfg, par, get_model_config("tiny"), "sdpa", 0, 2)
        checkpointer = Checkpointer(cfg, par)
        batches = type("Position", (), {"epoch": 0, "state_dict": lambda self: {}})()
        checkpointer.save(TrainState(1), model, optimizer, schedule, batches)
        with torch.no_grad():
            next(model.parameters())[0, 0] = float("nan")
        with pytest.raises(TrainingDiverged, match="not finite at step 2, so they were not saved.*step-1"):
            checkpointer.save(TrainState(2), model, optimizer, schedule, batches)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step-1"]
