"""The command-line layer: every script's parser, generated from the config fields (config.py);
the checks that need several modules at once; and what every script does around its main
function (bad input as one line with its exit code, a clean exit from the process group)."""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from .checkpoint import (
    SaveDirLock,
    check_checkpoint_dir,
    data_rank,
    finished_message,
    layout_problems,
    read_running_states,
    read_state_file,
    resolve_checkpoint,
    resolve_load_path,
    resume_differences,
    run_layout,
    save_dir_problems,
)
from .compression import GRAD_COMPRESSIONS
from .config import (
    PRECISIONS,
    SECTIONS,
    SHIPPED_HELD_OUT,
    TRAINING,
    TrainConfig,
    declared_type,
    flag_of,
    range_problems,
)
from .data import check_tokenizer_name, mixture_slices, parse_data_mix
from .distributed import print_main, rank, shutdown, world_size
from .errors import EXIT_FAILURE, RECIPE_ERRORS, OneLineErrorParser, UsageError
from .export import check_export_target
from .model import check_weights, get_model_config
from .optim import OPTIMIZER_NAMES
from .plugins import PLUGIN_NAMES, PLUGINS, PP_STYLES, SP_MODES, check_layout, check_model_split
from .prepared import check_data_position, check_prepared_files, check_token_ids
from .recompute import RECOMPUTE_MODES
from .sources import check_dataset_source, dataset_kind, source_for

# What torch.distributed says when a peer is gone or never answers
PEER_FAILURES = (
    "Timed out",
    "timed out",
    "Timeout",
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Socket closed",
)
DESCRIPTIONS = {
    "pretrain": "Pretrain a LLaMA model with a ColossalAI booster plugin.",
    "finetune": "Finetune a LLaMA model on prompt/completion pairs.",
    "benchmark": "Measure training throughput, MFU and memory of a booster plugin on synthetic tokens.",
    "eval": "Score a trained model on held-out text: perplexity, bits per byte, word perplexity, or cloze accuracy.",
}
# The value lists some flags choose from, kept where the values are defined.
CHOICES = {
    "plugin": {"benchmark": list(PLUGINS)},  # benchmark.py also takes 'none', the plain-PyTorch baseline
    "optimizer": OPTIMIZER_NAMES,
    "mixed_precision": PRECISIONS,
    "zero_stage": [0, 1, 2],
    "sp_mode": SP_MODES,
    "pp_style": PP_STYLES,
    "recompute": RECOMPUTE_MODES,
    "on_spike": ["log", "skip", "stop", "rollback"],
    "task": ["perplexity", "cloze"],
    "grad_compression": GRAD_COMPRESSIONS,
}


def _choices(name: str, script: str) -> list | None:
    choices = CHOICES.get(name)
    if name == "plugin":
        return choices.get(script, PLUGIN_NAMES)
    return choices


def build_parser(script: str) -> OneLineErrorParser:
    """`script`'s parser: one argument per config field that the script offers, grouped by section."""
    parser = OneLineErrorParser(prog=f"{script}.py", description=DESCRIPTIONS[script])
    for section_name, section in SECTIONS.items():
        offered = [f for f in fields(section) if flag_of(f) and script in flag_of(f).scripts]
        group = parser.add_argument_group(section_name, (section.__doc__ or "").strip()) if offered else None
        for f in offered:
            spec = flag_of(f)
            names, help_text, default = spec.for_script(script, f.default)
            kwargs = dict(dest=f.name, help=help_text, default=default)
            value_type = declared_type(section, f.name)
            if value_type is bool:
                kwargs["action"] = "store_true"
            else:
                parse = spec.type or value_type
                if parse not in (int, float, str) and spec.type is None:  # e.g. a tuple: the flag says how
                    raise TypeError(f"config field {f.name}: give its flag(...) a type= that parses {value_type}")
                kwargs.update(type=parse, choices=_choices(f.name, script), required=spec.required)
            group.add_argument(*names, **kwargs)
    return parser


def parse_args(script: str, argv: list[str] | None = None) -> TrainConfig:
    """The run's config from `script`'s command line (argv: sys.argv[1:] when None)."""
    values = vars(build_parser(script).parse_args(argv))
    if values.get("tensorboard_dir") == "":
        values["tensorboard_dir"] = None
    if script == "finetune":
        values["document_attention"] = values["pack_examples"]  # packed examples must not see each other
    if script == "eval" and values["dataset"] is None:  # (an absolute path: not in the flag tables)
        values["dataset"] = str(SHIPPED_HELD_OUT)
    return TrainConfig.for_script(script, **values)


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
    problems += _data_problems(cfg, model_config, script)
    problems += _path_problems(cfg, script)
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
    checks = [(ckpt.save_dir, "-o/--save_dir", False), (log.tensorboard_dir, "-t/--tensorboard_dir", False),
              (log.results, "--results", True)]  # fmt: skip
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
    prepared = dataset_kind(cfg.data.dataset) == "prepared"
    layout = run_layout(cfg, world_size)
    problems += layout_problems(states, layout, current, prepared)
    if problems:
        return [f"{cfg.checkpoint.load} was trained with other flags or layout: " + "; ".join(problems)]
    return _state_file_problems(cfg, states.get("layout", {}) == layout, prepared)


def _state_file_problems(cfg: TrainConfig, same_layout: bool, prepared: bool) -> list[str]:
    """The JSON states this rank will resume from, in range (and a prepared dataset's position
    within its rows), checked now rather than when they are loaded."""
    problems, load = [], cfg.checkpoint.load
    if same_layout:
        _collect(problems, read_state_file, load, "rng", rank())
    if not cfg.checkpoint.reset_data:
        data_state = _collect(problems, read_state_file, load, "data", data_rank(same_layout))
        if data_state and prepared:
            file = str(Path(load) / "data" / f"rank-{data_rank(same_layout)}.json")
            _collect(problems, check_data_position, cfg.data.dataset, data_state, file)
    return problems


def quiet_libraries() -> None:
    """Silence import-time chatter that says nothing about the user's run."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we tokenize in one thread per rank
    warnings.filterwarnings("ignore", message=".*(apex|tensornvme|TORCH_CUDA_ARCH_LIST).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # bitsandbytes (imported by ColossalAI through galore_torch) warns on CPUs with AVX512-BF16 that an
    # optional 4-bit kernel package is missing; we never use 4-bit kernels.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def fail(message: str, code: int, error: BaseException | None = None) -> None:
    """One line on rank 0's stderr, then exit with `code`. LLAMA_RECIPE_DEBUG=1 shows the traceback
    behind it first (with what the error was raised from)."""
    if int(os.environ.get("RANK", "0")) == 0:
        if error is not None and os.environ.get("LLAMA_RECIPE_DEBUG") == "1":
            error.__suppress_context__ = False  # `raise ... from None` hid the original
            traceback.print_exception(error)
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
    sys.exit(code)


def run_script(script: str, main: Callable[[TrainConfig], dict], argv: list[str] | None = None) -> dict:
    """Parse `script`'s flags, validate, run `main`; our errors end the process as one line."""
    quiet_libraries()
    cfg = parse_args(script, argv)
    try:
        ckpt = cfg.checkpoint
        ckpt.load = resolve_load_path(ckpt.load, ckpt.save_dir, ckpt.auto_resume)
        validate(cfg, world_size(), script)
        if (finished := finished_message(ckpt.load, cfg.training.max_steps)) is not None:
            print_main(finished)  # e.g. a second `make demo`: exit 0, nothing loaded or written
            return {"steps_this_run": 0, "checkpoint": ckpt.load}
        with SaveDirLock(cfg.checkpoint.save_dir):
            result = main(cfg)
    except RECIPE_ERRORS as e:
        fail(str(e), e.exit_code, e)
    except RuntimeError as e:  # torch.distributed's errors are RuntimeErrors (DistBackendError, DistNetworkError)
        if not any(words in str(e) for words in PEER_FAILURES):
            raise
        again = "resume with -f latest" if script in TRAINING else "run it again"  # (eval.py, benchmark.py: no -f)
        fail(
            f"a collective operation failed ({str(e).strip().splitlines()[0][:160]}): a rank is dead, stuck or "
            f"unreachable (--dist_timeout {cfg.parallel.dist_timeout:g} s); {again} once all ranks run",
            EXIT_FAILURE,
        )
    shutdown()  # only after a clean finish (see distributed.shutdown)
    return result


# ---------------------------------------------------------------------------------------------
# The README's flag tables, generated from the parsers (tests/test_cli.py keeps the README in step)


def _advanced() -> set[str]:
    return {f.name for section in SECTIONS.values() for f in fields(section) if flag_of(f) and flag_of(f).advanced}


def _rows(script: str, everything: bool = True) -> dict[str, tuple[str, str, str]]:
    """dest -> (spellings, default, help) of every flag `script` offers (less the advanced ones)."""
    rows, advanced = {}, _advanced()
    for action in build_parser(script)._actions:
        if action.dest == "help" or (not everything and action.dest in advanced):
            continue
        default = action.default
        shown = "off" if default is False else "–" if default is None else f"`{default}`"
        rows[action.dest] = ("/".join(f"`{n}`" for n in action.option_strings), shown, action.help.replace("%%", "%"))
    return rows


def flag_table(script: str, everything: bool = True) -> str:
    """Markdown: all of pretrain.py's (and eval.py's) flags; for another script, only what differs
    from pretrain.py. `everything=False` leaves out the advanced ones (the README's tables;
    docs/flags.md has all)."""
    rows, base = _rows(script, everything), _rows("pretrain", everything)
    compared = script not in ("pretrain", "eval")
    if compared:
        missing = [next(n for n in base[d][0].split("/") if n.startswith("`--")) for d in base if d not in rows]
        rows = {d: r for d, r in rows.items() if base.get(d) != r}
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    lines += [f"| {spellings} | {default} | {help_text} |" for spellings, default, help_text in rows.values()]
    if compared and missing:
        lines.append(f"\nAll other flags are pretrain.py's; it has no {', '.join(missing)}.")
    if not everything:
        count = len(set(_rows(script)) - set(_rows(script, everything=False)))
        lines.append(
            f"\n{count} more flags (resume overrides, fault handling, hub data, Gemini placement): [docs/flags.md](docs/flags.md)."
        )
    return "\n".join(lines)
