"""--config_file: a run's flags read from a YAML or TOML file, and the run.yaml every checkpoint carries.

A file's keys are flags' long spellings without the dashes (`max_steps: 100`, `plugin: zero2`,
`gradient_checkpoint: true`). The file is turned into command-line text placed *before* the real
command line, so argparse reads it exactly as it reads typed flags (each flag's type, its choices, a
required flag given by the file) and a flag typed on the command line wins (argparse keeps the last
value). Setting the parser's defaults from the file instead would skip all of that: argparse converts
only string defaults, never checks a default against the choices, and still asks for a required flag.
The ranges (`--lr` above 0, ...) are checked on the parsed config either way (validation.py).

The values: a boolean switches a store_true flag on (false: left off, as not typing it); a list is a
comma-separated flag's parts (`num_layers_per_stage: [2, 2]`); null leaves the flag at its default, or,
for a flag whose default is a value, gives it the empty text (`tensorboard_dir: null` is `-t ''`: off).

This module imports only config.py and errors.py (checkpoint_io.py writes run.yaml with it).
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from .config import SECTIONS, TENSORBOARD_IN_SAVE_DIR, TENSORBOARD_SUBDIR, TrainConfig, flag_of
from .errors import UsageError

try:
    import tomllib  # Python 3.11 on
except ModuleNotFoundError:  # Python 3.10: run files in YAML only
    tomllib = None

RUN_FILE = "run.yaml"  # in every step-<N> directory, beside running_states.json
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


# ---------------------------------------------------------------------------------------------
# Reading


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


# ---------------------------------------------------------------------------------------------
# Writing (checkpoint_io.complete_checkpoint puts it into every checkpoint)


def run_file_text(cfg: TrainConfig, script: str) -> str:
    """The run as a file `script`.py reads back with --config_file: every flag it offers, as resolved,
    less NOT_RECORDED. A -t that is the default's `<-o>/tensorboard` stays that, so a resume into
    another -o logs there."""
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
    header = (
        f"# {script}.py's flags of the run that saved this checkpoint. To resume it:\n"
        f"#   {script}.py --config_file <this file> -f <this file's directory>\n"
        f"# (-f and the --reset_* flags act once as a run starts: not recorded)\n"
    )
    return header + yaml.safe_dump({name: values[name] for name in offered}, sort_keys=False)
