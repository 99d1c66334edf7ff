"""The command-line layer: every script's parser, generated from the config fields (config.py), and
--config_file's run files read into it; and what every script does around its main function (validation.py's checks first, bad input as
one line with its exit code, a clean exit from the process group)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from .checkpoint_paths import resolve_load_path
from .compression import GRAD_COMPRESSIONS
from .config import PRECISIONS, SECTIONS, SHIPPED_HELD_OUT, TRAINING, TrainConfig, declared_type, flag_of
from .distributed import print_main, shutdown, world_size
from .errors import EXIT_FAILURE, RECIPE_ERRORS, OneLineErrorParser, UsageError
from .metrics import WANDB_MODES
from .optim import DECAY_SHAPES, LR_SCHEDULES, OPTIMIZER_NAMES
from .plugins import PLUGIN_NAMES, PLUGINS, PP_STYLES, SP_MODES
from .recompute import RECOMPUTE_MODES
from .save_lock import SaveDirLock
from .validation import finished_message, validate

try:
    import tomllib  # Python 3.11 on
except ModuleNotFoundError:  # Python 3.10: run files in YAML only
    tomllib = None

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
    "lr_schedule": LR_SCHEDULES,
    "decay_shape": list(DECAY_SHAPES),
    "mixed_precision": PRECISIONS,
    "zero_stage": [0, 1, 2],
    "sp_mode": SP_MODES,
    "pp_style": PP_STYLES,
    "recompute": RECOMPUTE_MODES,
    "on_spike": ["log", "skip", "stop", "rollback"],
    "task": ["perplexity", "cloze"],
    "grad_compression": GRAD_COMPRESSIONS,
    "wandb_mode": WANDB_MODES,
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
            add_flag(group, section, f, script)
    return parser


def add_flag(parser, section, f, script: str, **override: Any) -> None:
    """The argument of config field `f` as `script` spells it (`override`: e.g. another default)."""
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
    parser.add_argument(*names, **{**kwargs, **override})


def add_config_flags(parser, names: dict[str, dict], script: str = "pretrain") -> None:
    """Other tools (scripts/plan.py) take some of `script`'s flags: {field name: overrides}, each flag defined once."""
    for section in SECTIONS.values():
        for f in fields(section):
            if f.name in names:
                add_flag(parser, section, f, script, **names[f.name])


def parse_args(script: str, argv: list[str] | None = None) -> TrainConfig:
    """The run's config from `script`'s command line (argv: sys.argv[1:] when None), with
    --config_file's flags read first (below); UsageError for a file that cannot be read."""
    parser, argv = build_parser(script), sys.argv[1:] if argv is None else argv
    # --config_file's name alone, so that its flags can go first: the command line's then win
    find = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # (--config is another flag)
    find.add_argument("--config_file")
    config_file = find.parse_known_args(argv)[0].config_file
    if config_file:
        argv = [*run_file_arguments(config_file, parser), *argv]
    values = vars(parser.parse_args(argv))
    if values["config_file"] != config_file:  # abbreviated (--config_f), which the search above does not expand
        parser.error(f"spell out --config_file {values['config_file']}")
    if values.get("tensorboard_dir") == "":
        values["tensorboard_dir"] = None
    if script == "finetune":
        values["document_attention"] = values["pack_examples"]  # packed examples must not see each other
    if script == "eval" and values["dataset"] is None:  # (an absolute path: not in the flag tables)
        values["dataset"] = str(SHIPPED_HELD_OUT)
    return TrainConfig.for_script(script, **values)


# ---------------------------------------------------------------------------------------------
# --config_file: a run's flags from a YAML or TOML file (each checkpoint's run.yaml is one:
# checkpoint_io.run_file_text).
#
# A file's keys are flags' long spellings without the dashes (`max_steps: 100`, `plugin: zero2`,
# `gradient_checkpoint: true`). The file becomes command-line text placed *before* the real command
# line, so argparse reads it exactly as typed flags (each flag's type, its choices, a required flag
# given by the file) and a flag typed on the command line wins (argparse keeps the last value).
# Setting the parser's defaults from the file instead would skip all of that: argparse converts only
# string defaults, never checks a default against the choices, and still asks for a required flag.
# Ranges (`--lr` above 0) are checked on the parsed config either way (validation.py).
#
# Values: a boolean turns a switch on (false: left off, as when not typed); a list is a
# comma-separated flag's parts (`num_layers_per_stage: [2, 2]`); null leaves a flag at its default,
# or, for a flag whose default is a value, gives it the empty text (`tensorboard_dir: null` is -t '').


def read_run_file(path: str) -> dict[str, Any]:
    """The file's {key: value}: TOML for a .toml file, else YAML; UsageError (one line) if it cannot be."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config_file {path} does not exist; pass a YAML or TOML file of flags")
    kind = "TOML" if p.suffix == ".toml" else "YAML"
    if kind == "TOML" and tomllib is None:
        raise UsageError(f"--config_file {path}: reading TOML needs Python 3.11 (tomllib); write it as YAML")
    try:
        text = p.read_text()
        values = tomllib.loads(text) if kind == "TOML" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:  # (ValueError: TOML's and UTF-8's errors)
        mark = getattr(e, "problem_mark", None)  # YAML's: where, and what (its str() spans lines)
        reason = f"line {mark.line + 1}: {e.problem}" if mark else " ".join(str(e).split())
        raise UsageError(f"--config_file {path} is not valid {kind} ({reason})") from None
    if values is None:  # an empty file: no flags
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"--config_file {path} must map flag names to values (e.g. max_steps: 100)")
    return values


def run_file_arguments(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """The flags `path` gives, as `parser`'s command-line text; UsageError naming the key and the file
    for a key that is no flag of the script, or a value the flag would refuse."""
    actions = {
        name[2:]: action
        for action in parser._actions
        for name in action.option_strings
        if name.startswith("--") and action.dest not in ("help", "config_file")
    }
    argv = []
    for key, value in read_run_file(path).items():
        action = actions.get(str(key))
        if action is None:
            raise UsageError(f"--config_file {path}: unknown key '{key}' ({parser.prog} has no --{key})")
        argv += _flag_text(action, f"--{key}", value, f"--config_file {path}: {key}")
    return argv


def _flag_text(action: argparse.Action, name: str, value: Any, where: str) -> list[str]:
    """`value` as command-line text for `action`, checked as argparse checks typed text."""
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise UsageError(f"{where} is a switch: true or false, got {value!r}")
        return [name] if value else []
    if value is None:
        return [] if action.default is None else [name, ""]
    if isinstance(value, bool) or isinstance(value, dict):
        raise UsageError(f"{where} takes a value, got {value!r}")
    text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
    try:  # what argparse does with typed text (its messages: "invalid int value: 'two'")
        parsed = action.type(text) if action.type else text
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"{where}: {e}") from None
    except (TypeError, ValueError):
        raise UsageError(f"{where}: invalid {action.type.__name__} value: {text!r}") from None
    if action.choices is not None and parsed not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise UsageError(f"{where}: invalid choice: {parsed!r} (choose from {choices})")
    return [name, text]


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
    try:
        cfg = parse_args(script, argv)
    except UsageError as e:  # --config_file's (the parser's own errors exit at once)
        fail(str(e), e.exit_code, e)
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
            f"\n{count} more flags (resume overrides, fault handling, hub data, Gemini placement, W&B, LoRA): [docs/flags.md](docs/flags.md)."
        )
    return "\n".join(lines)
