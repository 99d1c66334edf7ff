"""Sharded checkpoints through the booster, written so that a crash never leaves a half-written
checkpoint that looks complete, and never touches the previous good one.

    save_dir/step-<N>/
        model/              booster.save_model (sharded safetensors + index + config.json) and the tokenizer:
                            a Hugging Face model directory that from_pretrained loads
        optimizer/          booster.save_optimizer (sharded; includes the fp16 loss scaler where there is one),
                            or under zero2/zero2_cpu each rank's own ZeRO slices (zero_slices.py)
        lr_scheduler.pt     booster.save_lr_scheduler
        data/rank-<R>.json  each rank's position in the data stream
        rng/rank-<R>.json   each rank's random number generator states (torch, CUDA, Python, NumPy)
        running_states.json step, epoch, consumed samples/tokens, layout and the run's config (written last)
    save_dir/latest         the name of the newest complete checkpoint

Everything is written into `.step-<N>.tmp`; rank 0 writes `running_states.json` last and renames the
folder into place once every rank has finished, then points `latest` at it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .colossalai_patches import deferred_state_dict_writes
from .config import TENSORBOARD_SUBDIR, CheckpointConfig, TrainConfig, label_of
from .distributed import any_rank, barrier, is_main_process, print_main, rank, synchronize, world_size
from .errors import CheckpointError, TrainingDiverged, UsageError
from .files import move_into_place, safetensors_header, write_failure, write_safetensors
from .model import check_weights
from .parallel import Parallelism
from .plugins import model_parallel_size, plugin_spec
from .sources import looks_like_a_path
from .zero_slices import check_slices, holds_slices, load_slices, rank_file, rank_slices, write_small_files

RUNNING_STATES = "running_states.json"
DONE = ".done"  # in a checkpoint being written: one empty file per rank whose files are complete
LATEST = "latest"
LOCK = ".lock"  # save_dir/.lock: the host and pid of the run writing there
INT64_MAX = 2**63 - 1  # every count and position a checkpoint records must fit torch's and numpy's integers
REPLACED = ".replaced-"  # save_dir/.replaced-<time>-<pid>/: checkpoints --replace_checkpoints moved aside
# Model-shape fields that must agree between a checkpoint and the run that loads it.
SHAPE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


def checkpoint_path(save_dir: str, step: int) -> Path:
    return Path(save_dir) / f"step-{step}"


def _step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def complete_checkpoints(save_dir: str) -> list[Path]:
    """The complete step-<N> checkpoints in save_dir, oldest first."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.name[5:].isdigit() and (p / RUNNING_STATES).is_file()]
    return sorted(found, key=_step_of)


def follow_latest(pointer: Path) -> Path:
    """The checkpoint a `latest` file names: only a `step-<N>` next to it, never a path elsewhere."""
    name = pointer.read_text().strip()
    if not (name.startswith("step-") and name[5:].isdigit()):
        raise UsageError(f"{pointer} names {name[:80]!r}, not a step-<N> checkpoint beside it; fix or delete it")
    return pointer.parent / name


def resolve_checkpoint(name: str, flag: str, model_dir: bool = True) -> Path:
    """Saved weights as any script's command line names them, resolved the same way everywhere: a
    step-<N> checkpoint, a run's `latest` file, a run's root directory (meaning its `latest`), and
    with `model_dir` also an exported Hugging Face directory or a hub name (downloaded once).
    `flag`: what the messages tell the user to pass it to (`-f`, `--model_path`, `export_hf.py`).
    Returns the step-<N> directory (`model_dir` False: resuming, exporting; read_running_states
    checks that it is complete) or a directory with config.json that from_pretrained loads (for a
    checkpoint, its model/)."""
    path = Path(name).expanduser()
    pointer = path if path.name == LATEST and path.is_file() else path / LATEST
    if pointer.is_file() and not (path / RUNNING_STATES).is_file():
        path = follow_latest(pointer)
        if not path.is_dir():
            raise UsageError(f"{pointer} names {path.name}, which does not exist; pass {flag} another checkpoint")
    elif path.is_dir() and not (path / "config.json").is_file() and complete_checkpoints(str(path)):
        newest = complete_checkpoints(str(path))[-1]
        raise UsageError(f"{name} holds checkpoints but no `{LATEST}` file; pass {flag} {newest}")
    if (path / RUNNING_STATES).is_file():
        if not model_dir:
            return path
        path = path / "model"
    elif not model_dir:
        if (path / "config.json").is_file():
            raise UsageError(
                f"{name} is a model directory, not a step-<N> checkpoint (no {RUNNING_STATES}); "
                f"pass {flag} a step-<N> directory, a run's directory or its `{LATEST}` file"
            )
        return path  # missing or incomplete: read_running_states says which part
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} has no config.json; pass {flag} a model directory or a complete checkpoint")
        return path
    if path.exists() or looks_like_a_path(name):  # a mistyped local path is said so at once, not looked up
        raise UsageError(
            f"{name} does not exist; pass {flag} a step-<N> checkpoint, a run's directory or its `{LATEST}` file, "
            "an exported model directory or a hub name"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model"]))
    except Exception as e:
        raise UsageError(
            f"could not download {name!r} from the Hugging Face hub ({type(e).__name__}); "
            f"pass {flag} a local directory (a checkpoint's step-<N>, a run's directory or an exported model)"
        ) from None


def resolve_load_path(load: str | None, save_dir: str, auto_resume: bool) -> str | None:
    """`-f latest` (or --auto_resume) means the checkpoint save_dir/latest names; any other -f is
    resolved as every script resolves a checkpoint (resolve_checkpoint)."""
    if load not in (None, LATEST):
        return str(resolve_checkpoint(load, "-f", model_dir=False))
    if not (load == LATEST or auto_resume):
        return load
    pointer = Path(save_dir) / LATEST
    if pointer.is_file():
        return str(follow_latest(pointer))
    if load == LATEST:
        raise UsageError(
            f"-f latest: {pointer} does not exist (no complete checkpoint in -o {save_dir}); drop -f to start fresh"
        )
    return None  # --auto_resume with nothing to resume: start fresh


def read_running_states(path: str, flag: str = "-f") -> dict:
    """The running states of a complete checkpoint; UsageError naming what is wrong otherwise (and
    `flag`, what to pass another checkpoint to)."""
    p = Path(path)
    if not p.is_dir():
        raise UsageError(
            f"checkpoint {path} does not exist; pass {flag} a step-<N> directory, a run's directory or its `{LATEST}` file"
        )
    if not (p / RUNNING_STATES).is_file():
        raise UsageError(f"{path} is not a complete checkpoint (no {RUNNING_STATES}); pass {flag} a complete step-<N>")
    try:
        states = json.loads((p / RUNNING_STATES).read_text())
        assert isinstance(states, dict)
        for key in ("step", "consumed_samples", "consumed_tokens"):
            assert type(states.get(key)) is int, key
        assert isinstance(states.get("layout", {}), dict) and isinstance(states.get("config", {}), dict)
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError):
        raise UsageError(f"{p / RUNNING_STATES} is corrupt or incomplete; pass {flag} another checkpoint") from None
    for key in ("step", "consumed_samples", "consumed_tokens", "epoch"):
        if key in states and not (type(states[key]) is int and 0 <= states[key] <= INT64_MAX):
            raise UsageError(
                f"{p / RUNNING_STATES}: {key} is {str(states[key])[:40]}, not a count from 0 to 2**63-1; it is "
                f"corrupt: pass {flag} another checkpoint"
            )
    for part in ("model", "optimizer", "lr_scheduler.pt"):
        if not (p / part).exists():
            raise UsageError(f"{path} is incomplete: {part} is missing; pass {flag} another checkpoint")
    return states


def _newest_saved(save_dir: str) -> str | None:
    """The checkpoint a run left in save_dir: what its `latest` names, else its newest complete
    step-<N>; None where no run has saved."""
    pointer = Path(save_dir) / LATEST
    if pointer.is_file():
        return str(pointer.parent / pointer.read_text().strip()[:80])
    found = complete_checkpoints(save_dir)
    return str(found[-1]) if found else None


def save_dir_problems(ckpt: CheckpointConfig, weights: tuple[str, str] | None = None) -> list[str]:
    """A run that starts afresh (no -f, nothing for --auto_resume to resume) never writes over another
    run's checkpoints: an -o that holds any (a complete step-<N>, or a `latest`) is refused, unless
    --replace_checkpoints moves them aside (set_aside). `weights`: (--init_from or --model_path, its
    flag), which --replace_checkpoints must not move away."""
    resuming = "--auto_resume" if ckpt.auto_resume else "-f"
    if ckpt.replace_checkpoints and ckpt.load is not None:
        return [f"--replace_checkpoints starts -o afresh but {resuming} resumes {ckpt.load}; pass one of them"]
    newest = _newest_saved(ckpt.save_dir) if ckpt.save_dir and ckpt.load is None else None
    if newest is None:
        return []
    if not ckpt.replace_checkpoints:
        return [
            f"-o {ckpt.save_dir} holds another run's checkpoints (the newest: {newest}); to go on with that run pass "
            "-f latest or --auto_resume, to start another pass a new -o, or pass --replace_checkpoints to move them "
            "aside (they are deleted once this run has saved its first checkpoint)"
        ]
    root = Path(ckpt.save_dir).expanduser().resolve()
    if weights and root in Path(weights[0]).expanduser().resolve().parents:
        return [
            f"{weights[1]} {weights[0]} lies in -o {ckpt.save_dir}, whose checkpoints --replace_checkpoints moves "
            f"aside; pass a new -o, or export or copy those weights elsewhere first"
        ]
    return []


def set_aside(save_dir: str) -> Path | None:
    """--replace_checkpoints (rank 0, under the save-directory lock): move save_dir's checkpoints, its
    `latest` and its default TensorBoard directory into save_dir/.replaced-<time>/, out of the view of
    `latest`, --auto_resume, --keep_last and the new run's loss curve; the Checkpointer deletes them
    once this run has saved. Returns that directory."""
    root = Path(save_dir)
    checkpoints = complete_checkpoints(save_dir)
    pointer = [root / LATEST] if (root / LATEST).exists() else []
    if not checkpoints and not pointer:
        return None
    aside = root / f"{REPLACED}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    aside.mkdir()
    events = [root / TENSORBOARD_SUBDIR] if (root / TENSORBOARD_SUBDIR).is_dir() else []  # else mixed with ours
    for path in [*pointer, *checkpoints, *events]:  # `latest` first: it never names a checkpoint already moved
        os.rename(path, aside / path.name)
    print_main(
        f"--replace_checkpoints: moved the earlier run's {len(checkpoints)} checkpoints and its "
        f"`{LATEST}` to {aside}; they are deleted once this run has saved its first checkpoint (to keep them, stop "
        f"this run before then and move them back: mv {aside}/* {root}/ && rmdir {aside})"
    )
    return aside


def finished_message(load: str | None, max_steps: int | None) -> str | None:
    """The one line a run says instead of training when the checkpoint it resumes is already at
    --max_steps (a second `make demo`); None when there is training to do."""
    if load is None or not max_steps:
        return None
    step = read_running_states(load)["step"]
    if step < max_steps:
        return None
    return (
        f"nothing to train: {load} is already at step {step} of --max_steps {max_steps}; to train on, pass a larger "
        "--max_steps with --reset_schedule; to start another run, pass a new -o"
    )


def check_checkpoint_dir(path: str, model_config=None) -> None:
    """Fail early on a missing, partial or corrupt checkpoint, or one of another model shape: its
    weights and ZeRO slices are checked against their headers, indexes and the model (files' headers
    and sizes only, nothing loaded). Its JSON states are checked by `read_state_file`."""
    read_running_states(path)
    if holds_slices(Path(path) / "optimizer"):
        check_slices(Path(path) / "optimizer")
    if not model_config:  # (False: the model config itself was refused)
        return
    try:
        saved = json.loads((Path(path) / "model" / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise UsageError(f"{path}/model/config.json is missing or corrupt; pass -f with another checkpoint") from None
    different = [
        f"{k} {saved.get(k)} vs {getattr(model_config, k)}"
        for k in SHAPE_FIELDS
        if saved.get(k, getattr(model_config, k)) != getattr(model_config, k)
    ]
    if different:
        raise UsageError(
            f"{path} holds a different model ({'; '.join(different)}, checkpoint vs -c); pass the -c it was trained with"
        )
    check_weights(Path(path) / "model", model_config, "pass -f with another checkpoint")


def _out_of_range(value, field: str = "") -> str | None:
    """The first integer in a JSON state that is negative or too big (`field`: where it is, dotted),
    or None. Positions and counts must fit int64; a random generator's own state (under "rng") may
    use up to 128 bits (numpy's PCG64)."""
    if isinstance(value, dict):
        return next((f for k, v in value.items() if (f := _out_of_range(v, f"{field}.{k}".lstrip(".")))), None)
    if isinstance(value, list):
        return next((f for i, v in enumerate(value) if (f := _out_of_range(v, f"{field}[{i}]"))), None)
    limit = 2**128 if "rng" in field.split(".") else INT64_MAX + 1
    return field if type(value) is int and not 0 <= value < limit else None


def _ints(values, n: int | None, limit: int) -> bool:
    """`values` is a list of n integers (any number: None), each in [0, limit)."""
    ok = isinstance(values, list) and (n is None or len(values) == n)
    return ok and all(type(v) is int and 0 <= v < limit for v in values)


def _rng_problem(state: dict) -> str | None:
    """The field of an rng/rank-<R>.json that `_set_rng_state` could not restore, or None."""
    python, numpy = state.get("python"), state.get("numpy")
    python_ok = isinstance(python, list) and len(python) == 3 and python[0] == 3 and _ints(python[1], 625, 2**32)
    python_ok = python_ok and (python[2] is None or type(python[2]) is float)  # (version, MT words, gauss)
    numpy_ok = isinstance(numpy, list) and len(numpy) == 5 and numpy[0] == "MT19937"
    numpy_ok = numpy_ok and _ints(numpy[1], 624, 2**32) and _ints(numpy[2:3], 1, 625) and _ints(numpy[3:4], 1, 2)
    numpy_ok = numpy_ok and type(numpy[4]) in (int, float)  # (kind, MT words, position, has_gauss, cached)
    checks = {
        "torch": _ints(state.get("torch"), torch.get_rng_state().numel(), 256),
        "python": python_ok,
        "numpy": numpy_ok,
        "cuda": "cuda" not in state or _ints(state["cuda"], None, 256),
    }
    return next((name for name, ok in checks.items() if not ok), None)


def read_state_file(path: str | Path, part: str, rank: int) -> dict:
    """A checkpoint's data/rank-<R>.json or rng/rank-<R>.json, with every number in range (a position
    of 10**30 would end in a library traceback, or be silently skipped past). UsageError naming the
    file and the field otherwise."""
    file = Path(path) / part / f"rank-{rank}.json"
    try:
        state = json.loads(file.read_text())
    except FileNotFoundError:
        raise UsageError(f"{file} is missing; pass -f with a complete checkpoint of this layout") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"{file} is not valid JSON; it is corrupt: pass -f with another checkpoint") from None
    if not isinstance(state, dict):
        raise UsageError(f"{file} is not a JSON object; it is corrupt: pass -f with another checkpoint")
    field = _out_of_range(state) or (_rng_problem(state) if part == "rng" else None)
    if field:
        raise UsageError(
            f"{file}: {field} is out of range or malformed; it is corrupt: pass -f with another checkpoint"
        )
    return state


# What a resumed run must share with its checkpoint, by the flag that accepts a difference knowingly.
MUST_MATCH_ON_RESUME = {
    "--reset_data": ("dataset", "data_dir", "data_config", "text_field", "slice_field", "data_mix", "shuffle_buffer",
                     "tokenizer", "max_length", "seed", "task_name", "pack_examples", "eval_split"),
    "--reset_optimizer": ("optimizer", "weight_decay", "beta2", "adam_eps", "mixed_precision", "collage_reference_multiply"),
    "--reset_schedule": ("lr", "warmup_steps", "warmup_ratio", "max_steps", "num_epochs"),
    "--reset_compression": ("grad_compression", "powersgd_rank", "powersgd_warmup", "powersgd_no_error_feedback",
                            "compress_stages", "compress_backprop", "compress_backprop_epilogue_only"),
}  # fmt: skip
MODEL_PARALLEL = ("plugin", "tp", "pp", "zero_stage")  # a layout that differs only in replicas keeps these


def run_layout(cfg: TrainConfig, world_size: int) -> dict:
    """The layout a checkpoint records, as this run will have it (known before the process group exists)."""
    par = cfg.parallel
    dp_size = world_size // model_parallel_size(par) if plugin_spec(par.plugin).model_parallel else world_size
    return dict(
        plugin=par.plugin, world_size=world_size, dp_size=dp_size, tp=par.tp, pp=par.pp, zero_stage=par.zero_stage
    )


def resume_differences(saved: dict, current: dict) -> list[str]:
    """Where this run's flags differ from those its checkpoint was trained with, one entry per group
    not accepted by its --reset_* flag."""
    problems = []
    for reset, keys in MUST_MATCH_ON_RESUME.items():
        if current.get(reset[2:]):
            continue
        diffs = [f"{label_of(k)} {saved[k]!r} -> {current[k]!r}" for k in keys if k in saved and saved[k] != current[k]]
        if diffs:
            problems.append(f"{', '.join(diffs)} (pass {reset} to accept)")
    return problems


def layout_problems(states: dict, layout: dict, current: dict, prepared_data: bool) -> list[str]:
    """What cannot move from the checkpoint's layout to this run's, unless --reset_* accepts it: the
    global batch (rows per step over all replicas), the optimizer state (resharded only across
    numbers of replicas: same plugin, tp, pp and ZeRO stage), and a streamed dataset's position (only
    a prepared dataset's moves: it is one global position). `layout`: this run's."""
    saved, config, problems = states.get("layout", {}), states.get("config", {}), []
    saved_rows = config.get("batch_size", 0) * config.get("accumulation_steps", 1) * saved.get("dp_size", 1)
    rows = current["batch_size"] * current["accumulation_steps"] * layout["dp_size"]
    if not current["reset_data"] and saved_rows and saved_rows != rows:
        problems.append(
            f"this run would train {rows} rows per step instead of {saved_rows}: keep -b x --accumulation_steps "
            "x replicas the same, or pass --reset_data"
        )
    if saved == layout:
        return problems
    moved = f"from {describe_layout(saved)} to {describe_layout(layout)}"
    if not current["reset_data"] and not prepared_data:
        problems.append(
            f"the data position cannot move {moved} (only a prepared dataset's can: it is one global position; a "
            "stream's is each replica's own): pass --reset_data to restart the data, or train from a prepared dataset"
        )
    if not current["reset_optimizer"] and any(saved.get(k) != layout.get(k) for k in MODEL_PARALLEL):
        problems.append(f"the optimizer state cannot be resharded {moved}: pass --reset_optimizer to start it fresh")
    return problems


def _directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _rng_state() -> dict:
    """Every generator's state as JSON (plain numbers, no pickle: reading it back runs no code)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _write_latest(save_dir: str, name: str) -> None:
    tmp = Path(save_dir) / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, Path(save_dir) / LATEST)  # atomic: readers see the old or the new name, never half


def _prune(save_dir: str, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints; returns what was deleted."""
    doomed = complete_checkpoints(save_dir)[:-keep_last] if keep_last > 0 else []
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def to_host(x: torch.Tensor) -> torch.Tensor:
    """A tensor as --async_save's background writer reads it: host tensors as they are (training
    waits before it changes them again: Checkpointer.before_update), device tensors copied to page-
    locked host memory (the stall; the caller synchronizes once after all copies were queued)."""
    x = x.detach()
    if x.device.type == "cpu":
        return x
    return torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, non_blocking=True)


def _write_states(par: Parallelism, model, optimizer, lr_scheduler, tmp: Path, data_state: dict,
                  deferred: list | None = None) -> None:  # fmt: skip
    """Every rank's part of a checkpoint, through the booster (collective); ZeRO's optimizer state
    as each rank's own slices where the plugin says so (zero_slices.py). With `deferred`
    (--async_save), the model and optimizer files are not written now but appended there as calls
    that write them (`to_host` says what they read)."""
    background = deferred is not None
    with deferred_state_dict_writes(deferred, to_host) if background else contextlib.nullcontext():
        par.booster.save_model(model, str(tmp / "model"), shard=True, use_safetensors=True)
        if not par.spec.zero_slices:
            par.booster.save_optimizer(optimizer, str(tmp / "optimizer"), shard=True)
    if par.spec.zero_slices:
        (tmp / "optimizer").mkdir(exist_ok=True)
        tensors, index, zero_rank = rank_slices(optimizer)
        write_small_files(optimizer, tmp / "optimizer", index)
        host = to_host if background else torch.Tensor.cpu
        write = functools.partial(
            write_safetensors, {name: host(t) for name, t in tensors.items()}, rank_file(tmp / "optimizer", zero_rank)
        )
        if background:
            deferred.append(write)
        else:
            write()
    par.booster.save_lr_scheduler(lr_scheduler, str(tmp / "lr_scheduler.pt"))
    (tmp / "data" / f"rank-{rank()}.json").write_text(json.dumps(data_state))
    (tmp / "rng" / f"rank-{rank()}.json").write_text(json.dumps(_rng_state()))
    if par.compresses:  # each rank's own error buffers, LEP residuals and warm-start factors (small: written now)
        save_file(par.compression_state(), str(tmp / "compression" / f"rank-{rank()}.safetensors"))


def _complete(tmp: Path, final: Path, running_states: dict, tokenizer, keep_last: int) -> int:
    """Rank 0, once every rank's files are in `tmp`: the last files, the rename, `latest`, pruning.
    Returns the checkpoint's bytes."""
    if tokenizer is not None:  # makes model/ a complete Hugging Face model directory
        tokenizer.save_pretrained(tmp / "model")
    running_states = dict(running_states, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    (tmp / RUNNING_STATES).write_text(json.dumps(running_states, indent=2))
    size = _directory_bytes(tmp)
    move_into_place(tmp, final)  # re-saving the same step replaces it
    _write_latest(str(final.parent), final.name)
    _prune(str(final.parent), keep_last)
    return size


def _temporary_dir(final: Path, par: Parallelism) -> Path:
    """Rank 0 makes the empty `.step-<N>.tmp` every rank writes into (all ranks wait for it)."""
    tmp = final.with_name(f".{final.name}.tmp")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crashed save
        for part in ("data", "rng", DONE, *(["compression"] if par.compresses else [])):
            (tmp / part).mkdir(parents=True)
    barrier()
    return tmp


def _save_failed(final: Path, tmp: Path, error: Exception) -> Exception:
    """What a save that could not be written raises, its temporary directory removed: one line
    (CheckpointError) when the filesystem is to blame, else the error itself (a bug)."""
    reason = write_failure(error, final.parent)
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    if reason is None:
        return error
    return CheckpointError(f"saving {final} failed ({reason}); the previous checkpoints in {final.parent} are intact")


def save_checkpoint(
    par: Parallelism,
    model,
    optimizer,
    lr_scheduler,
    save_dir: str,
    running_states: dict,
    data_state: dict,
    tokenizer=None,
    keep_last: int = 0,
) -> tuple[Path, float, int]:
    """Returns the checkpoint directory, the seconds the save took and its size in bytes."""
    started = time.perf_counter()
    final = checkpoint_path(save_dir, running_states["step"])
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        tmp = _temporary_dir(final, par)
        _write_states(par, model, optimizer, lr_scheduler, tmp, data_state)
        barrier()
        size = 0
        if is_main_process():
            shutil.rmtree(tmp / DONE)  # only background saves use the done-markers
            size = _complete(tmp, final, running_states, tokenizer, keep_last)
        barrier()
    except Exception as e:  # a full disk, a quota, a vanished mount: earlier checkpoints are untouched
        raise _save_failed(final, tmp, e) from None
    return final, time.perf_counter() - started, size


class BackgroundSave:
    """--async_save: one checkpoint written by a background thread after the loop's short stall.

    The stall (`start_background_save`, every rank, collective): the booster's save with every model
    and optimizer file handed to this writer instead of written (device tensors copied to host
    memory on the way), plus the small files. Host tensors are not copied at all: the writer reads
    the weights and optimizer states themselves, while the next step's forward and backward run,
    and the loop waits for it (`wait_written`) only before it would change them (the optimizer
    step; in-place SGD's update inside backward): CheckFreq's pipelined snapshot (FAST '21).

    Each rank's thread writes its files, then a done-marker (`.done/rank-<R>`); rank 0's thread
    waits for every rank's marker (ranks agree through the files, as a thread must not run
    collectives beside training) and completes the checkpoint exactly as a synchronous save does:
    `running_states.json`, the rename into place, then `latest`. A crash or kill -9 before that
    leaves the previous checkpoint the latest one. `wait` (every rank) joins the thread.
    """

    def __init__(self, final: Path, tmp: Path, deferred: list, finish, timeout: float):
        self.final, self.tmp, self.deferred, self.finish, self.timeout = final, tmp, deferred, finish, timeout
        self.started, self.size, self.seconds, self.error = time.perf_counter(), 0, 0.0, None
        self.waited = 0.0  # seconds training waited in `wait_written`
        self.written = threading.Event()  # this rank's files are on disk: training may change the tensors
        self.thread = threading.Thread(target=self._run, name=f"save {final.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            try:
                for write in self.deferred:
                    write()
                self.deferred = []  # the references (or host copies) can go
                (self.tmp / DONE / f"rank-{rank()}").write_text("")
            finally:
                self.written.set()  # also on failure: training must never wait forever
            if self.finish is not None:  # rank 0
                self._wait_for_every_rank()
                shutil.rmtree(self.tmp / DONE)
                self.size = self.finish()
        except Exception as e:  # reported by `wait`; the previous checkpoints stay untouched
            self.error = e
            if self.finish is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
        self.seconds = time.perf_counter() - self.started

    def _wait_for_every_rank(self) -> None:
        deadline = time.monotonic() + self.timeout
        while len(list((self.tmp / DONE).iterdir())) < world_size():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not every rank finished writing within {self.timeout:g} s")
            time.sleep(0.01)

    def wait_written(self) -> None:
        """Block until this rank's files are written (before training changes what they are read from)."""
        if not self.written.is_set():
            started = time.perf_counter()
            self.written.wait()
            self.waited += time.perf_counter() - started

    def wait(self) -> bool:
        """Join the writer; whether every rank's save succeeded (a collective: every rank calls it)."""
        self.thread.join()
        return not any_rank(self.error is not None)


def load_checkpoint(
    par: Parallelism, model, optimizer, lr_scheduler, path: str, layout: dict,
    optimizer_too: bool = True, schedule_too: bool = True, data_too: bool = True, compression_too: bool = True,
) -> tuple[dict, dict | None]:  # fmt: skip
    """Restore a checkpoint in place. Returns (running_states, this rank's data state or None).

    Under the layout it was saved with, everything comes back: model, optimizer, scheduler, data
    position, RNG (less what the caller leaves out: --reset_*). Under another layout (another plugin
    or another number of replicas), only the model weights and the schedule position can be
    resharded; the caller is told (data state None).
    """
    running_states = read_running_states(path)
    p = Path(path)
    saved = running_states.get("layout", {})
    same_layout = saved == layout
    replicas_only = all(saved.get(k) == layout.get(k) for k in MODEL_PARALLEL)  # the optimizer can be resharded
    data_state = None
    try:
        par.booster.load_model(model, str(p / "model"))
        if schedule_too:
            par.booster.load_lr_scheduler(lr_scheduler, str(p / "lr_scheduler.pt"))
        if optimizer_too and replicas_only and holds_slices(p / "optimizer"):
            load_slices(optimizer, p / "optimizer")
        elif optimizer_too and replicas_only:
            par.booster.load_optimizer(optimizer, str(p / "optimizer"))
            _check_optimizer_state(optimizer, p / "optimizer")
        if data_too:  # under another layout only a prepared dataset's global position moves (validated)
            data_state = read_state_file(p, "data", data_rank(same_layout))
        if same_layout:
            _set_rng_state(read_state_file(p, "rng", rank()))
        if par.compresses:
            _load_compression(par, p, running_states["step"], same_layout, compression_too)
    except (OSError, SafetensorError) as e:  # a file missing or unreadable (what the checks above cannot see)
        raise UsageError(
            f"could not load {path} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no detail'}); "
            "it may be corrupt or from another layout: pass -f with another checkpoint"
        ) from None
    return running_states, data_state


def data_rank(same_layout: bool) -> int:
    """Whose data/rank-<R>.json this rank resumes from: its own, or under another layout rank 0's
    (only a prepared dataset's one global position moves)."""
    return rank() if same_layout else 0


def _check_optimizer_state(optimizer, directory: Path) -> None:
    """Every state tensor ColossalAI's own loader put in (AdamW's moments) has its parameter's shape:
    torch's load_state_dict copies them in unchecked, and a foreign or damaged shard would then
    fail at the first step, or broadcast silently."""
    inner = getattr(optimizer, "optim", optimizer)
    for group in inner.param_groups:
        for param in group["params"]:
            for name, value in inner.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and name != "step" and value.shape != param.shape:
                    raise UsageError(
                        f"{directory}: a parameter's {name} has shape {list(value.shape)}, the parameter "
                        f"{list(param.shape)}; it is damaged or from another model: pass -f with another checkpoint"
                    )


def _load_compression(par: Parallelism, path: Path, step: int, same_layout: bool, wanted: bool) -> None:
    """This rank's compression state, when it was saved under this layout and flags; otherwise the
    state restarts (no error buffers, new factors), and the run says why."""
    file = path / "compression" / f"rank-{rank()}.safetensors"
    if same_layout and wanted and file.is_file():
        safetensors_header(file, "pass -f with another checkpoint, or --reset_compression")  # whole, before reading
        par.load_compression_state(load_file(str(file)))
        return
    par.restart_compression(step)
    why = "--reset_compression" if not wanted else "another layout" if not same_layout else "saved without compression"
    print_main(f"gradient compression starts fresh at step {step} ({why}): no error buffers, new warm-start factors")


def describe_layout(layout: dict) -> str:
    parts = [layout.get("plugin", "?"), f"{layout.get('world_size', '?')} processes"]
    if layout.get("tp", 1) > 1 or layout.get("pp", 1) > 1:
        parts.append(f"tp {layout['tp']} pp {layout['pp']}")
    return ", ".join(parts)


def start_background_save(
    par: Parallelism, model, optimizer, lr_scheduler, save_dir: str, running_states: dict, data_state: dict,
    tokenizer=None, keep_last: int = 0, timeout: float = 1800.0,
) -> BackgroundSave:  # fmt: skip
    """save_checkpoint's work, but returning once the state is handed to a background writer (every rank)."""
    final = checkpoint_path(save_dir, running_states["step"])
    tmp, deferred = final.with_name(f".{final.name}.tmp"), []
    try:
        tmp = _temporary_dir(final, par)
        _write_states(par, model, optimizer, lr_scheduler, tmp, data_state, deferred)
        synchronize()  # the device-to-host copies `to_host` queued have landed
    except Exception as e:
        raise _save_failed(final, tmp, e) from None
    finish = None
    if is_main_process():
        finish = functools.partial(_complete, tmp, final, running_states, tokenizer, keep_last)
    return BackgroundSave(final, tmp, deferred, finish, timeout)


# ---------------------------------------------------------------------------------------------
# What the training loop uses


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class SaveDirLock:
    """One run per -o: while a run trains, rank 0 holds save_dir/.lock, a file lock (flock, through
    `filelock`) whose file names its host, pid and start, so that a second run on the same directory
    is refused in one line naming them instead of overwriting the first one's checkpoints. The kernel
    releases the lock when its process dies: a lock file left by a run that died is taken over, with
    a message. The holder writes its name while it acquires (filelock's on_acquired), and a refused
    run waits for that name rather than taking an unnamed lock for a stale one."""

    def __init__(self, save_dir: str | None):
        self.path = Path(save_dir) / LOCK if save_dir and is_main_process() else None
        self.mine = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.made_dir = False  # a run that ends before saving anything leaves no empty directory behind
        self.lock: FileLock | None = None
        self.inode = -1  # the lock file this run holds (removed at the end only if it is still that one)

    def __enter__(self) -> SaveDirLock:
        if self.path is None:
            return self
        self.made_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(self.path, blocking=False, on_acquired=self._claim)
        deadline = time.monotonic() + 2.0  # the holder writes its name right after it took the lock
        while True:
            try:
                self.lock.acquire()
                return self
            except Timeout:  # held by a live process
                holder = self._holder()
                if holder is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.01)  # its name is being written, or it was just released: look again
        holder = holder or {}
        raise UsageError(
            f"another run (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}) "
            f"is writing to {self.path.parent}; pass another -o, or wait for that run to end"
        )

    def _claim(self, fd: int) -> None:
        """filelock's on_acquired (the lock is ours): a name still in the file is a dead run's; write ours."""
        previous = os.pread(fd, 4096, 0)
        if previous.strip():  # its run died without removing the file
            try:
                pid = json.loads(previous)["pid"]
            except (ValueError, KeyError, TypeError):
                pid = "?"
            print_main(f"taking over {self.path}: the run that held it (pid {pid}) is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.mine).encode(), 0)
        self.inode = os.fstat(fd).st_ino

    def _holder(self) -> dict | None:
        """The name the live holder wrote into the lock file; None while there is none yet (or only a
        dead run's, which the run taking the lock over is replacing)."""
        try:
            holder = json.loads(self.path.read_text())
            host, pid = str(holder["host"]), int(holder["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return None if host == self.mine["host"] and not _pid_alive(pid) else holder

    def __exit__(self, *exc_info) -> None:
        if self.lock is None or not self.lock.is_locked:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.inode:
                # Our own step: filelock leaves the file in place, but a finished run leaves -o as it found it
                # (no lock file, no empty directory). Removed while still held: a run that opened it meanwhile
                # finds it unlinked once it gets the lock (filelock checks) and takes a new one.
                self.path.unlink()
        self.lock.release()
        if self.made_dir:
            with contextlib.suppress(OSError):  # not empty: it holds what this run saved
                self.path.parent.rmdir()


@dataclass
class TrainState:
    """Where a run is: what every checkpoint records besides the model, optimizer and data."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0

    def advance(self, samples: int, tokens: int) -> None:
        self.step += 1
        self.consumed_samples += samples
        self.consumed_tokens += tokens


class Checkpointer:
    """Owns a run's checkpoints: resuming, when to save, saving, and the last good checkpoint."""

    def __init__(self, cfg: TrainConfig, par: Parallelism, tokenizer=None):
        self.cfg = cfg.checkpoint
        self.par = par
        self.tokenizer = tokenizer  # saved into model/, which makes it a complete Hugging Face directory
        self.run_config = cfg.to_dict()
        self.layout = run_layout(cfg, world_size())
        self.last: str | None = None  # the newest checkpoint this run completed
        self.last_size = 0  # its bytes: what the next save will need again
        self.pending: BackgroundSave | None = None  # --async_save: the checkpoint being written
        self.write_timeout = cfg.parallel.dist_timeout  # how long rank 0's writer waits for the other ranks' files
        self.replaced = None  # --replace_checkpoints: where the earlier run's checkpoints wait until this run saved
        if self.cfg.replace_checkpoints and self.cfg.save_dir and self.cfg.load is None and is_main_process():
            self.replaced = set_aside(self.cfg.save_dir)

    def resume(self, model, optimizer, lr_scheduler, batches, initial_weights: str | None = None) -> TrainState:
        """Restore `-f`'s checkpoint (all of it, less what --reset_* leaves out; under another layout
        what can move, validated before), else load `initial_weights` (finetuning), else start fresh."""
        if not self.cfg.load:
            if initial_weights:
                self.par.booster.load_model(model, initial_weights)
                print_main(f"loaded weights from {initial_weights}")
            return TrainState()
        started, cfg = time.perf_counter(), self.cfg
        states, data_state = load_checkpoint(
            self.par, model, optimizer, lr_scheduler, cfg.load, self.layout,
            optimizer_too=not cfg.reset_optimizer, schedule_too=not cfg.reset_schedule, data_too=not cfg.reset_data,
            compression_too=not cfg.reset_compression,
        )  # fmt: skip
        state = TrainState(states["step"], states["consumed_samples"], states["consumed_tokens"])
        if cfg.reset_schedule:  # this run's schedule, continued from the checkpoint's step
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": on purpose
                for _ in range(state.step):
                    lr_scheduler.step()
        resets = [
            f"{flag}: {what}"
            for flag, what, on in [
                ("--reset_optimizer", "the optimizer starts fresh", cfg.reset_optimizer),
                ("--reset_data", "the data stream starts from its beginning", cfg.reset_data),
                ("--reset_schedule", f"this run's lr schedule, from step {state.step}", cfg.reset_schedule),
            ]
            if on
        ]
        if resets:
            print_main("resuming with " + "; ".join(resets))
        if data_state is not None:
            batches.load_state_dict(data_state)
        saved = states.get("layout", {})
        if saved != self.layout:
            print_main(
                f"{cfg.load} was saved with {describe_layout(saved)}; this run uses {describe_layout(self.layout)}: "
                "the weights, schedule"
                + (", optimizer state" if not cfg.reset_optimizer else "")
                + (" and data position (prepared: one global position)" if data_state is not None else "")
                + " moved to the new layout"
            )
        print_main(
            f"resumed from {cfg.load} at step {state.step} (epoch {batches.epoch}, "
            f"{state.consumed_tokens:,} tokens seen) in {time.perf_counter() - started:.1f}s"
        )
        return state

    def roll_back(self, state: TrainState, model, optimizer, lr_scheduler) -> TrainState:
        """--on_spike rollback: the last good checkpoint's weights, optimizer and schedule again; the
        data reads on, so the batches since that checkpoint (the spike's among them) are skipped."""
        self.finish_background()
        states, _ = load_checkpoint(self.par, model, optimizer, lr_scheduler, self.last, self.layout, data_too=False)
        print_main(
            f"rolled back to {self.last} (step {states['step']}): the batches of steps {states['step'] + 1}-{state.step} "
            "are skipped, and training goes on with the next ones"
        )
        return TrainState(states["step"], state.consumed_samples, state.consumed_tokens)

    def maybe_save(self, state: TrainState, model, optimizer, lr_scheduler, batches) -> None:
        """Save every --save_interval steps."""
        if self.cfg.save_interval > 0 and state.step % self.cfg.save_interval == 0:
            self.save(state, model, optimizer, lr_scheduler, batches, background=self.cfg.async_save)

    def save_final(self, state: TrainState, model, optimizer, lr_scheduler, batches) -> None:
        """The end of a run is always saved (unless this step already was), and a save still being
        written in the background is waited for (so SIGTERM and the end of a run leave it complete)."""
        self.finish_background()
        if self.last is None or Path(self.last).name != checkpoint_path("", state.step).name:
            self.save(state, model, optimizer, lr_scheduler, batches)

    def save(self, state: TrainState, model, optimizer, lr_scheduler, batches, background: bool = False) -> None:
        """Save now; with `background`, stall only to hand the state to a writer thread (BackgroundSave)."""
        if not self.cfg.save_dir:
            return
        self.finish_background()  # a second save waits for the first
        if any_rank(not all(bool(torch.isfinite(p).all()) for p in model.parameters())):  # this rank's shards
            raise TrainingDiverged(
                f"the weights are not finite at step {state.step}, so they were not saved; resume from the last "
                f"good checkpoint ({self.last or 'none saved by this run'}) with a lower --lr or a longer warmup"
            )
        running_states = dict(
            step=state.step, epoch=batches.epoch, consumed_samples=state.consumed_samples,
            consumed_tokens=state.consumed_tokens, world_size=self.layout["world_size"], dp_size=self.par.dp_size,
            layout=self.layout, config=self.run_config,
        )  # fmt: skip
        try:
            self._check_room(model)
            if background:
                started = time.perf_counter()
                self.pending = start_background_save(
                    self.par, model, optimizer, lr_scheduler, self.cfg.save_dir, running_states, batches.state_dict(),
                    self.tokenizer, self.cfg.keep_last, self.write_timeout,
                )  # fmt: skip
                print_main(
                    f"checkpoint {self.pending.final}: training stalled {time.perf_counter() - started:.2f}s to hand it "
                    "to the background writer, which writes it while the next step computes"
                )
                return
            path, seconds, size = save_checkpoint(
                self.par, model, optimizer, lr_scheduler, self.cfg.save_dir, running_states, batches.state_dict(),
                self.tokenizer, self.cfg.keep_last,
            )  # fmt: skip
        except CheckpointError as e:
            if not self.cfg.continue_on_save_error:
                raise
            print_main(f"warning: {e}; training on (--continue_on_save_error), the next save will try again")
            return
        print_main(f"saved checkpoint {path} ({size / 2**20:,.1f} MB) in {seconds:.1f}s")
        self._saved(path, size)

    def _saved(self, path: Path, size: int) -> None:
        """A checkpoint of this run is complete: it is the last good one, and what --replace_checkpoints
        set aside can go."""
        self.last, self.last_size = str(path), size
        if self.replaced is not None:
            shutil.rmtree(self.replaced)
            print_main(f"deleted the earlier run's checkpoints in {self.replaced}: this run saved {path}")
            self.replaced = None

    def before_update(self) -> None:
        """Called before training changes the weights or the optimizer state: a checkpoint still
        being written from them is finished first (--async_save; at once otherwise)."""
        if self.pending is not None:
            self.pending.wait_written()

    def finish_background(self) -> None:
        """Wait for the checkpoint being written in the background, if any (every rank calls it)."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        if pending.wait():
            size = f" ({pending.size / 2**20:,.1f} MB)" if pending.size else ""
            print_main(
                f"saved checkpoint {pending.final}{size} in {pending.seconds:.1f}s, in the background (training "
                f"waited {pending.waited:.2f}s for it before the next update)"
            )
            self._saved(pending.final, pending.size)
            return
        reason = f"{type(pending.error).__name__}: {pending.error}" if pending.error else "on another rank"
        error = CheckpointError(
            f"saving {pending.final} in the background failed ({reason}); the previous checkpoints in "
            f"{self.cfg.save_dir} are intact"
        )
        if not self.cfg.continue_on_save_error:
            raise error
        print_main(f"warning: {error}; training on (--continue_on_save_error), the next save will try again")

    def _check_room(self, model) -> None:
        """Refuse a save the disk cannot hold before any rank writes a byte, all ranks agreeing (a
        rank failing mid-write while the others wait for it would hang them). It needs what the last
        save took, or for the first one at least the weights."""
        root = Path(self.cfg.save_dir)
        free = shutil.disk_usage(next(p for p in [root, *root.parents] if p.exists())).free
        need = self.last_size or sum(p.numel() * p.element_size() for p in model.parameters())
        if any_rank(is_main_process() and free < need):
            raise CheckpointError(
                f"saving to {root} needs about {need / 2**20:,.0f} MB but {free / 2**20:,.0f} MB are free; "
                f"the previous checkpoints are intact (the last: {self.last or 'none by this run'}); free some space"
            )
