"""Everything checked before a run starts, where the check needs several modules at once: one
UsageError listing every problem (`validate`), and the resume policy: what a resumed run must share
with its checkpoint (flags, layout, state files) unless a --reset_* flag accepts the difference."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .checkpoint_io import (
    MODEL_PARALLEL,
    check_checkpoint_dir,
    describe_layout,
    read_data_states,
    read_running_states,
    read_state_file,
    run_layout,
)
from .checkpoint_paths import resolve_checkpoint, save_dir_problems
from .config import TRAINING, OptimConfig, TrainConfig, label_of, range_problems
from .data import check_tokenizer_name, mixture_slices, parse_data_mix
from .distributed import rank
from .errors import UsageError
from .export import check_export_target
from .lora import lora_problems, lora_resume_problems
from .metrics import wandb_problems
from .model import check_weights, get_model_config
from .optim import LRSchedule, finetune_warmup_steps
from .plugins import check_layout, check_model_split
from .prepared import check_data_position, check_prepared_files, check_token_ids
from .sources import check_dataset_source, dataset_kind, source_for


def validate(cfg: TrainConfig, world_size: int, script: str = "pretrain") -> None:
    """Check everything that can be checked before training starts; one UsageError listing all problems."""
    problems = range_problems(cfg, script)
    if problems:  # the checks below assume sane numbers (no division by --tp 0)
        raise UsageError("; ".join(problems))
    model_config = _collect(problems, _model_config, cfg)
    if script != "eval":  # eval.py trains nothing: no plugin, no layout, no compression
        if _collect(problems, check_layout, cfg, world_size) is not False and model_config:
            _collect(problems, check_model_split, cfg, model_config)
        if cfg.model.grad_checkpoint and cfg.model.recompute not in (None, "full"):
            problems.append(f"-g means --recompute full; drop -g or --recompute {cfg.model.recompute}")
        problems += _compression_problems(cfg, model_config)
        problems += lora_problems(cfg)
        problems += _schedule_problems(cfg, script)
    problems += _data_problems(cfg, model_config, script)
    problems += _path_problems(cfg, script)
    problems += wandb_problems(cfg.logging)
    if script in TRAINING:  # the scripts that save to -o: never over another run's checkpoints
        problems += save_dir_problems(cfg.checkpoint, _pretrained(cfg))
    if cfg.checkpoint.load is not None:
        if _collect(problems, check_checkpoint_dir, cfg.checkpoint.load, model_config) is not False:
            problems += _resume_problems(cfg, world_size)
    if problems:
        raise UsageError("; ".join(problems))


def _collect(problems: list[str], fn: Callable, *args):
    """fn(*args), with a UsageError added to `problems` (and False returned) instead of raised."""
    try:
        return fn(*args)
    except UsageError as e:
        problems.append(str(e))
        return False


def _pretrained(cfg: TrainConfig) -> tuple[str, str] | None:
    """The weights a run starts from and the flag that names them: finetuning's and evaluation's
    --model_path, continued pretraining's --init_from; None for a model of -c's shape."""
    if cfg.model.model_path is not None:
        return cfg.model.model_path, "--model_path"
    if cfg.model.init_from is not None:
        return cfg.model.init_from, "--init_from"
    return None


def _model_config(cfg: TrainConfig):
    if pretrained := _pretrained(cfg):  # the shape comes with the weights
        model_dir = resolve_checkpoint(*pretrained)
        config = get_model_config(str(model_dir))
        check_weights(model_dir, config, f"pass {pretrained[1]} with an undamaged model directory")
        return config
    return get_model_config(cfg.model.config)


def _data_problems(cfg: TrainConfig, model_config, script: str) -> list[str]:
    problems, data = [], cfg.data
    kind = dataset_kind(data.dataset)
    pretraining = cfg.model.model_path is None  # (pretrain.py and benchmark.py)
    # pretraining or evaluation data: local files or a hub dataset's (listed now, so a gated or missing one fails here)
    if (pretraining or script == "eval") and kind in ("local", "hub"):
        source = _collect(problems, source_for, data)
    elif kind == "prepared":
        source = _collect(problems, check_prepared_files, data.dataset)
        if source is not False and model_config:
            _collect(problems, check_token_ids, data.dataset, model_config.vocab_size)
    else:
        source = _collect(problems, check_dataset_source, data.dataset)
    if pretraining and not cfg.training.max_steps and kind == "hub":
        problems.append(
            f"-d {data.dataset} is streamed from the Hugging Face hub, so sizing -e epochs would first read all of it; "
            "pass --max_steps, or prepare it locally (scripts/prepare_data.py) to train by epochs"
        )
    if data.data_mix:
        weights = _collect(problems, parse_data_mix, data.data_mix)
        if kind == "prepared":
            problems.append(
                "--data_mix weights the slices of JSONL/Parquet files, not a prepared dataset; mix before preparing"
            )
        elif weights and source:
            _collect(problems, mixture_slices, source, weights)
        if not cfg.training.max_steps:
            problems.append("--data_mix draws from the slices without end; pass --max_steps to set the run's length")
    if data.tokenizer:
        _collect(problems, check_tokenizer_name, data.tokenizer)
    if model_config and (data.max_length or 0) > model_config.max_position_embeddings:
        limit = model_config.max_position_embeddings
        problems.append(
            f"-l/--max_length {data.max_length} exceeds the model's {limit} positions; pass -l {limit} or less"
        )
    stride, max_length = (
        cfg.evaluation.stride,
        data.max_length or (model_config and model_config.max_position_embeddings),
    )
    if stride and max_length and stride > max_length:
        problems.append(
            f"--stride {stride} is larger than -l/--max_length {max_length}; pass --stride {max_length} or less"
        )
    if cfg.evaluation.eval_data:  # the held-out text, checked as -d is
        _collect(problems, source_for, cfg.held_out_data())
    return problems


def _compression_problems(cfg: TrainConfig, model_config) -> list[str]:
    """Tied embeddings in a pipeline are all-reduced between its first and last stages on their own,
    which Optimus-CC fuses with the data-parallel sync (FE); we do not (LLaMA's are untied)."""
    tied = model_config and getattr(model_config, "tie_word_embeddings", False)
    if tied and cfg.compression.grad_compression != "none" and cfg.parallel.pp > 1:
        return [
            "--grad_compression with --pp > 1 and tie_word_embeddings in the model config: the tied embeddings' sync "
            "between the first and last stages (Optimus-CC's fused embedding sync) is not implemented; untie them "
            "or use --pp 1"
        ]
    return []


def _schedule_problems(cfg: TrainConfig, script: str) -> list[str]:
    """--decay_* without wsd, and a wsd decay that does not fit the run. A run sized by epochs knows
    its length only once its data is counted: `trainer.announce` checks it then, before the model is built."""
    opt, default = cfg.optim, OptimConfig()
    decay_flags = (opt.decay_fraction, opt.decay_shape)
    if opt.lr_schedule != "wsd" and decay_flags != (default.decay_fraction, default.decay_shape):
        return [
            f"--decay_fraction and --decay_shape set the decay of --lr_schedule wsd (this run: {opt.lr_schedule}); "
            "add --lr_schedule wsd or drop them"
        ]
    total = cfg.training.max_steps
    if script not in TRAINING or not total:
        return []
    warmup = opt.warmup_steps if script == "pretrain" else finetune_warmup_steps(opt.warmup_ratio, total)
    problem = LRSchedule(opt.lr_schedule, warmup, total, opt.decay_fraction, opt.decay_shape).problem()
    return [problem] if problem else []


def _writable_problem(path: str, flag: str, is_file: bool = False) -> str | None:
    """Why `path` (a directory, or a file with is_file) cannot be written, or None."""
    p = Path(path).expanduser()
    if p.exists():
        if is_file != p.is_file():
            return f"{flag} {path} is a {'directory' if p.is_dir() else 'file'}; pass a {'file' if is_file else 'directory'} path"
        return None if os.access(p, os.W_OK) else f"{flag} {path} is not writable; pass another path"
    parent = next(q for q in p.parents if q.exists())  # the nearest existing ancestor
    if not parent.is_dir():
        return f"{flag} {path} cannot be created: {parent} is a file; pass another path"
    return None if os.access(parent, os.W_OK) else f"{flag} {path} cannot be created in {parent} (not writable)"


def _path_problems(cfg: TrainConfig, script: str) -> list[str]:
    """Every path the run will write, checked before it starts (not at its first save)."""
    ckpt, log = cfg.checkpoint, cfg.logging
    checks = [
        (ckpt.save_dir, "-o/--save_dir", False),
        (log.tensorboard_dir, "-t/--tensorboard_dir", False),
        (log.results, "--results", True),
    ]
    problems = [
        problem for path, flag, is_file in checks if path and (problem := _writable_problem(path, flag, is_file))
    ]
    if ckpt.export_hf:
        problems += [problem] if (problem := _writable_problem(ckpt.export_hf, "--export_hf")) else []
        _collect(problems, check_export_target, ckpt.export_hf, ckpt.save_dir)
    return problems


def _resume_problems(cfg: TrainConfig, world_size: int) -> list[str]:
    """A checkpoint trained with other data, optimizer or schedule flags, unless --reset_* accepts it."""
    states = read_running_states(cfg.checkpoint.load)
    current = cfg.to_dict()
    problems = resume_differences(states.get("config", {}), current)
    problems += lora_resume_problems(cfg, cfg.checkpoint.load, states.get("config", {}))
    kind = dataset_kind(cfg.data.dataset)
    layout = run_layout(cfg, world_size)
    problems += layout_problems(states, layout, current, movable_data=kind != "synthetic")
    if problems:
        return [f"{cfg.checkpoint.load} was trained with other flags or layout: " + "; ".join(problems)]
    return _state_file_problems(cfg, states.get("layout", {}) == layout, kind == "prepared")


def _state_file_problems(cfg: TrainConfig, same_layout: bool, prepared: bool) -> list[str]:
    """The JSON states this rank will resume from, in range (and a prepared dataset's position
    within its rows), checked now rather than when they are loaded."""
    problems, load = [], cfg.checkpoint.load
    if same_layout:
        _collect(problems, read_state_file, load, "rng", rank())
    if not cfg.checkpoint.reset_data:
        data_state = _collect(problems, read_state_file, load, "data", rank() if same_layout else 0)
        if not same_layout:  # every replica's, for the data to move to this layout
            _collect(problems, read_data_states, load)
        if data_state and prepared:
            file = str(Path(load) / "data" / f"rank-{rank() if same_layout else 0}.json")
            _collect(problems, check_data_position, cfg.data.dataset, data_state, file)
    return problems


# ---------------------------------------------------------------------------------------------
# The resume policy


# What a resumed run must share with its checkpoint, by the flag that accepts a difference knowingly.
MUST_MATCH_ON_RESUME = {
    "--reset_data": ("dataset", "data_dir", "data_config", "text_field", "slice_field", "data_mix", "shuffle_buffer", "shuffle_rows",
                     "tokenizer", "max_length", "seed", "task_name", "pack_examples", "eval_split"),
    "--reset_optimizer": ("optimizer", "weight_decay", "beta2", "adam_eps", "mixed_precision", "collage_reference_multiply"),
    "--reset_schedule": ("lr", "warmup_steps", "warmup_ratio", "max_steps", "num_epochs", "lr_schedule",
                         "decay_fraction", "decay_shape"),
    "--reset_compression": ("grad_compression", "powersgd_rank", "powersgd_warmup", "powersgd_no_error_feedback",
                            "compress_stages", "compress_backprop", "compress_backprop_epilogue_only"),
}  # fmt: skip


def flag_differences(saved: dict, current: dict, keys: tuple[str, ...]) -> list[str]:
    """`--flag old -> new` for each of `keys` whose value differs (keys a checkpoint predates: none)."""
    return [f"{label_of(k)} {saved[k]!r} -> {current[k]!r}" for k in keys if k in saved and saved[k] != current[k]]


def resume_differences(saved: dict, current: dict) -> list[str]:
    """Where this run's flags differ from those its checkpoint was trained with, one entry per group
    not accepted by its --reset_* flag."""
    problems = []
    for reset, keys in MUST_MATCH_ON_RESUME.items():
        if current.get(reset[2:]):
            continue
        if diffs := flag_differences(saved, current, keys):
            problems.append(f"{', '.join(diffs)} (pass {reset} to accept)")
    return problems


def layout_problems(states: dict, layout: dict, current: dict, movable_data: bool) -> list[str]:
    """What cannot move from the checkpoint's layout to this run's, unless --reset_* accepts it: the
    global batch (rows per step over all replicas), the optimizer state (resharded only across
    numbers of replicas: same plugin, tp, pp and ZeRO stage), and the data position (a stream's and a
    prepared dataset's move; synthetic data's does not). `layout`: this run's."""
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
    if not current["reset_data"] and not movable_data:
        problems.append(f"synthetic data's position cannot move {moved}: pass --reset_data to restart it")
    if not current["reset_optimizer"] and any(saved.get(k) != layout.get(k) for k in MODEL_PARALLEL):
        problems.append(f"the optimizer state cannot be resharded {moved}: pass --reset_optimizer to start it fresh")
    return problems


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
