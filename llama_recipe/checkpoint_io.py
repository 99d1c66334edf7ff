"""A checkpoint's files, written and read: every rank's states saved through the booster so that a
crash never leaves a half-written checkpoint that looks complete (and never touches the previous
good one), loaded back in place (under another layout, what can move), and its JSON state files
(running states, data positions, random generator states) checked before anything trusts them.

Everything is written into `.step-<N>.tmp`; rank 0 writes the run's flags (`run.yaml`, which
--config_file reads back) and `running_states.json` last, and renames the
folder into place once every rank has finished, then points `latest` at it (checkpoint_paths.py
names the files; background_save.py writes the same files beside training).
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import shutil
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint_paths import LATEST, RUN_FILE, RUNNING_STATES, checkpoint_path, prune, write_latest
from .colossalai_patches import deferred_state_dict_writes
from .config import SECTIONS, TENSORBOARD_IN_SAVE_DIR, TENSORBOARD_SUBDIR, TrainConfig, flag_of
from .distributed import barrier, is_main_process, print_main, rank
from .errors import CheckpointError, UsageError
from .files import WRITE_ERRORS, move_into_place, safetensors_header, write_failure, write_safetensors
from .lora import ADAPTER_DIR, ADAPTER_WEIGHTS, is_lora_checkpoint, load_adapters, save_adapters
from .model import check_weights
from .parallel import Parallelism
from .plugins import model_parallel_size, plugin_spec
from .zero_slices import check_slices, holds_slices, load_slices, rank_file, rank_slices, write_small_files

DONE = ".done"  # in a checkpoint being written: one empty file per rank whose files are complete
INT64_MAX = 2**63 - 1  # every count and position a checkpoint records must fit torch's and numpy's integers
# Model-shape fields that must agree between a checkpoint and the run that loads it.
SHAPE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


# ---------------------------------------------------------------------------------------------
# Reading and checking a checkpoint's states


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


def check_checkpoint_dir(path: str, model_config=None) -> None:
    """Fail early on a missing, partial or corrupt checkpoint, or one of another model shape: its
    weights and ZeRO slices are checked against their headers, indexes and the model (files' headers
    and sizes only, nothing loaded). Its JSON states are checked by `read_state_file`."""
    read_running_states(path)
    if is_lora_checkpoint(path):  # whole (its tensors are checked against the model's adapters as they load)
        safetensors_header(Path(path) / ADAPTER_DIR / ADAPTER_WEIGHTS, "pass -f with another checkpoint")
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


# ---------------------------------------------------------------------------------------------
# The layout a checkpoint records


MODEL_PARALLEL = ("plugin", "tp", "pp", "zero_stage")  # a layout that differs only in replicas keeps these


def run_layout(cfg: TrainConfig, world_size: int) -> dict:
    """The layout a checkpoint records, as this run will have it (known before the process group exists)."""
    par = cfg.parallel
    dp_size = world_size // model_parallel_size(par) if plugin_spec(par.plugin).model_parallel else world_size
    return dict(
        plugin=par.plugin, world_size=world_size, dp_size=dp_size, tp=par.tp, pp=par.pp, zero_stage=par.zero_stage
    )


def describe_layout(layout: dict) -> str:
    parts = [layout.get("plugin", "?"), f"{layout.get('world_size', '?')} processes"]
    if layout.get("tp", 1) > 1 or layout.get("pp", 1) > 1:
        parts.append(f"tp {layout['tp']} pp {layout['pp']}")
    return ", ".join(parts)


def read_data_states(path: str | Path) -> list[dict]:
    """Every replica's data state in a checkpoint, in replica order (the ranks of one replica hold
    the same; a prepared dataset's or synthetic data's, which name no replica: every rank's)."""
    ranks = sorted(int(f.stem.removeprefix("rank-")) for f in (Path(path) / "data").glob("rank-*.json"))
    states: dict[int, dict] = {}
    for r in ranks:
        state = read_state_file(path, "data", r)
        states.setdefault(state.get("dp_rank", r), state)
    return [states[k] for k in sorted(states)]


def data_rank(same_layout: bool) -> int:
    """Whose data/rank-<R>.json this rank resumes from: its own, or under another layout rank 0's
    (only a prepared dataset's one global position moves)."""
    return rank() if same_layout else 0


# ---------------------------------------------------------------------------------------------
# The random generators' states, as JSON


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


# ---------------------------------------------------------------------------------------------
# Saving


def _directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def to_host(x: torch.Tensor) -> torch.Tensor:
    """A tensor as --async_save's background writer reads it: host tensors as they are (training
    waits before it changes them again: Checkpointer.before_update), device tensors copied to page-
    locked host memory (the stall; the caller synchronizes once after all copies were queued)."""
    x = x.detach()
    if x.device.type == "cpu":
        return x
    return torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, non_blocking=True)


def write_states(
    par: Parallelism, model, optimizer, lr_scheduler, tmp: Path, data_state: dict, deferred: list | None = None
) -> None:
    """Every rank's part of a checkpoint, through the booster (collective); ZeRO's optimizer state
    as each rank's own slices where the plugin says so (zero_slices.py). With `deferred`
    (--async_save), the model and optimizer files are not written now but appended there as calls
    that write them (`to_host` says what they read)."""
    background = deferred is not None
    if par.lora:  # the adapters only (small: written now, also with --async_save; training waits before changing them)
        save_adapters(par.booster, model, tmp)
    with deferred_state_dict_writes(deferred, to_host) if background else contextlib.nullcontext():
        if not par.lora:
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
    data_file = tmp / "data" / f"rank-{rank()}.json"
    write_data = functools.partial(_write_json, data_file, data_state)  # a snapshot: safe to write later
    if background:
        deferred.append(write_data)
    else:
        write_data()
    (tmp / "rng" / f"rank-{rank()}.json").write_text(json.dumps(_rng_state()))
    if par.compresses:  # each rank's own error buffers, LEP residuals and warm-start factors (small: written now)
        save_file(par.compression_state(), str(tmp / "compression" / f"rank-{rank()}.safetensors"))


def _write_json(file: Path, state: dict) -> None:
    file.write_text(json.dumps(state))


def complete_checkpoint(
    tmp: Path, final: Path, running_states: dict, tokenizer, keep_last: int, run_file: str | None = None
) -> int:
    """Rank 0, once every rank's files are in `tmp`: the last files (`run_file`: the run's flags, as
    run_file_text below), the rename, `latest`, pruning. Returns the checkpoint's bytes."""
    if tokenizer is not None:  # makes model/ a complete Hugging Face model directory
        tokenizer.save_pretrained(tmp / "model")
    if run_file is not None:
        (tmp / RUN_FILE).write_text(run_file)
    running_states = dict(running_states, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    (tmp / RUNNING_STATES).write_text(json.dumps(running_states, indent=2))
    size = _directory_bytes(tmp)
    move_into_place(tmp, final)  # re-saving the same step replaces it
    write_latest(str(final.parent), final.name)
    prune(str(final.parent), keep_last)
    return size


# Flags a run file never records: where it came from, and what acts once as a run starts (resume from
# -f, reset a state, set earlier checkpoints aside). Resuming from run.yaml must continue the run, not
# reset its optimizer again; the resume names its checkpoint with -f.
NOT_RECORDED = (
    "config_file",
    "load",
    "reset_optimizer",
    "reset_data",
    "reset_schedule",
    "reset_compression",
    "replace_checkpoints",
)


def recorded_flags(cfg: TrainConfig, script: str) -> dict:
    """Every flag `script`.py offers, as resolved, less NOT_RECORDED: what run.yaml holds and what W&B
    gets as the run's config. A -t that is the default's `<-o>/tensorboard` stays that, so a resume
    into another -o logs there."""
    values = cfg.to_dict()
    save_dir = cfg.checkpoint.save_dir
    if save_dir and values["tensorboard_dir"] == str(Path(save_dir) / TENSORBOARD_SUBDIR):
        values["tensorboard_dir"] = TENSORBOARD_IN_SAVE_DIR
    offered = [
        f.name
        for section in SECTIONS.values()
        for f in fields(section)
        if flag_of(f) and script in flag_of(f).scripts and f.name not in NOT_RECORDED
    ]
    return {name: values[name] for name in offered}


def run_file_text(cfg: TrainConfig, script: str) -> str:
    """The run as a file `script`.py reads back with --config_file (recorded_flags)."""
    header = (
        f"# {script}.py's flags of the run that saved this checkpoint. To resume it:\n"
        f"#   {script}.py --config_file <this file> -f <this file's directory>\n"
        f"# (-f and the --reset_* flags act once as a run starts: not recorded)\n"
    )
    return header + yaml.safe_dump(recorded_flags(cfg, script), sort_keys=False, default_flow_style=None)


def temporary_dir(final: Path, par: Parallelism) -> Path:
    """Rank 0 makes the empty `.step-<N>.tmp` every rank writes into (all ranks wait for it)."""
    tmp = final.with_name(f".{final.name}.tmp")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crashed save
        for part in ("data", "rng", DONE, *(["compression"] if par.compresses else [])):
            (tmp / part).mkdir(parents=True)
    barrier()
    return tmp


def save_failed(final: Path, tmp: Path, error: Exception) -> Exception:
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
    run_file: str | None = None,
) -> tuple[Path, float, int]:
    """Returns the checkpoint directory, the seconds the save took and its size in bytes."""
    started = time.perf_counter()
    final = checkpoint_path(save_dir, running_states["step"])
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        tmp = temporary_dir(final, par)
        write_states(par, model, optimizer, lr_scheduler, tmp, data_state)
        barrier()
        size = 0
        if is_main_process():
            shutil.rmtree(tmp / DONE)  # only background saves use the done-markers
            size = complete_checkpoint(tmp, final, running_states, tokenizer, keep_last, run_file)
        barrier()
    except WRITE_ERRORS as e:  # a full disk, a quota, a vanished mount: earlier checkpoints are untouched
        raise save_failed(final, tmp, e) from None
    return final, time.perf_counter() - started, size


# ---------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(
    par: Parallelism,
    model,
    optimizer,
    lr_scheduler,
    path: str,
    layout: dict,
    optimizer_too: bool = True,
    schedule_too: bool = True,
    data_too: bool = True,
    compression_too: bool = True,
) -> tuple[dict, dict | None]:
    """Restore a checkpoint in place. Returns (running_states, this rank's data state, or under
    another layout a list of every replica's, or None).

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
        if par.lora:  # the adapters; the frozen base was loaded from --model_path as the model was built
            load_adapters(model, p / ADAPTER_DIR)
        else:
            par.booster.load_model(model, str(p / "model"))
        if schedule_too:
            par.booster.load_lr_scheduler(lr_scheduler, str(p / "lr_scheduler.pt"))
        if optimizer_too and replicas_only and holds_slices(p / "optimizer"):
            load_slices(optimizer, p / "optimizer")
        elif optimizer_too and replicas_only:
            par.booster.load_optimizer(optimizer, str(p / "optimizer"))
            _check_optimizer_state(optimizer, p / "optimizer")
        if data_too:  # under another layout: every replica's, for the data to move (validated)
            data_state = read_state_file(p, "data", rank()) if same_layout else read_data_states(p)
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
