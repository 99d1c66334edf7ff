"""The command-line layer: every script's parser, generated from the config fields (config.py);
the checks that need several modules at once; and what every script does around its main
function (bad input as one line with its exit code, a clean exit from the process group)."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from .checkpoint import check_checkpoint_dir, resolve_load_path
from .config import PRECISIONS, SECTIONS, TrainConfig, flag_of, range_problems
from .data import check_dataset_source, dataset_kind, files_by_slice, parse_data_mix
from .distributed import shutdown, world_size
from .errors import RECIPE_ERRORS, OneLineErrorParser, UsageError
from .model import get_model_config, resolve_pretrained
from .optim import OPTIMIZER_NAMES
from .plugins import PLUGIN_NAMES, PLUGINS, check_layout

DESCRIPTIONS = {
    "pretrain": "Pretrain a LLaMA model with a ColossalAI booster plugin.",
    "finetune": "Finetune a LLaMA model on prompt/completion pairs.",
    "benchmark": "Measure training throughput, MFU and memory of a booster plugin on synthetic tokens.",
}
# The value lists some flags choose from, kept where the values are defined.
CHOICES = {
    "plugin": {"benchmark": list(PLUGINS)},  # benchmark.py also takes 'none', the plain-PyTorch baseline
    "optimizer": OPTIMIZER_NAMES,
    "mixed_precision": PRECISIONS,
    "zero_stage": [0, 1, 2],
}
_TYPES = {"int": int, "float": float, "str": str}


def _choices(name: str, script: str) -> list | None:
    choices = CHOICES.get(name)
    if name == "plugin":
        return choices.get(script, PLUGIN_NAMES)
    return choices


def build_parser(script: str) -> OneLineErrorParser:
    """`script`'s parser: one argument per config field that the script offers, grouped by section."""
    parser = OneLineErrorParser(prog=f"{script}.py", description=DESCRIPTIONS[script])
    for section_name, section in SECTIONS.items():
        group = parser.add_argument_group(section_name, (section.__doc__ or "").strip())
        for f in fields(section):
            spec = flag_of(f)
            if spec is None or script not in spec.scripts:
                continue
            names, help_text, default = spec.for_script(script, f.default)
            kind = str(f.type).split(" |")[0]
            kwargs = dict(dest=f.name, help=help_text, default=default)
            if kind == "bool":
                kwargs["action"] = "store_true"
            else:
                kwargs.update(type=_TYPES[kind], choices=_choices(f.name, script), required=spec.required)
            group.add_argument(*names, **kwargs)
    return parser


def parse_args(script: str, argv: list[str] | None = None) -> TrainConfig:
    """The run's config from `script`'s command line (argv: sys.argv[1:] when None)."""
    values = vars(build_parser(script).parse_args(argv))
    if values.get("tensorboard_dir") == "":
        values["tensorboard_dir"] = None
    if script == "finetune":
        values["document_attention"] = values["pack_examples"]  # packed examples must not see each other
    return TrainConfig.for_script(script, **values)


def validate(cfg: TrainConfig, world_size: int, script: str = "pretrain") -> None:
    """Check everything that can be checked before training starts; one UsageError listing all problems."""
    problems = range_problems(cfg, script)
    if problems:  # the checks below assume sane numbers (no division by --tp 0)
        raise UsageError("; ".join(problems))

    def check(fn, *args):
        try:
            return fn(*args)
        except UsageError as e:
            problems.append(str(e))

    data = cfg.data
    if cfg.model.model_path is not None:  # finetuning: the shape comes with the weights
        model_dir = check(resolve_pretrained, cfg.model.model_path)
        model_config = check(get_model_config, str(model_dir)) if model_dir else None
    else:
        model_config = check(get_model_config, cfg.model.config)
    check(check_layout, cfg, world_size)
    check(check_dataset_source, data.dataset)
    kind = dataset_kind(data.dataset)
    if cfg.model.model_path is None and not cfg.training.max_steps and kind == "hub":
        problems.append(
            f"-d {data.dataset} is streamed from the Hugging Face hub, so sizing -e epochs would first read all of it; "
            "pass --max_steps, or prepare it locally (scripts/prepare_data.py) to train by epochs"
        )
    if data.data_mix:
        weights = check(parse_data_mix, data.data_mix)
        if kind == "prepared":
            problems.append(
                "--data_mix weights the slices of JSONL/Parquet files, not a prepared dataset; mix before preparing"
            )
        elif weights:
            check(files_by_slice, data.dataset, weights)
        if not cfg.training.max_steps:
            problems.append("--data_mix draws from the slices without end; pass --max_steps to set the run's length")
    if data.tokenizer and not Path(data.tokenizer).exists() and data.tokenizer.startswith((".", "/", "~")):
        problems.append(
            f"tokenizer directory {data.tokenizer} does not exist; pass --tokenizer with a tokenizer directory"
        )
    if model_config is not None and (data.max_length or 0) > model_config.max_position_embeddings:
        limit = model_config.max_position_embeddings
        problems.append(
            f"-l/--max_length {data.max_length} exceeds the model's {limit} positions; pass -l {limit} or less"
        )
    if cfg.checkpoint.load is not None:
        check(check_checkpoint_dir, cfg.checkpoint.load, model_config)
    if problems:
        raise UsageError("; ".join(problems))


def quiet_libraries() -> None:
    """Silence import-time chatter that says nothing about the user's run."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we tokenize in one thread per rank
    warnings.filterwarnings("ignore", message=".*(apex|tensornvme|TORCH_CUDA_ARCH_LIST).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # bitsandbytes (imported by ColossalAI through galore_torch) warns on CPUs with AVX512-BF16 that an
    # optional 4-bit kernel package is missing; we never use 4-bit kernels.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def fail(message: str, code: int) -> None:
    """One line on rank 0's stderr, then exit with `code`."""
    if int(os.environ.get("RANK", "0")) == 0:
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
        result = main(cfg)
    except RECIPE_ERRORS as e:
        fail(str(e), e.exit_code)
    shutdown()  # only after a clean finish (see distributed.shutdown)
    return result


# ---------------------------------------------------------------------------------------------
# The README's flag tables, generated from the parsers (tests/test_cli.py keeps the README in step)


def _rows(script: str) -> dict[str, tuple[str, str, str]]:
    """dest -> (spellings, default, help) of every flag `script` offers."""
    rows = {}
    for action in build_parser(script)._actions:
        if action.dest == "help":
            continue
        default = action.default
        shown = "off" if default is False else "–" if default is None else f"`{default}`"
        rows[action.dest] = ("/".join(f"`{n}`" for n in action.option_strings), shown, action.help.replace("%%", "%"))
    return rows


def flag_table(script: str) -> str:
    """Markdown: all of pretrain.py's flags; for another script, only what differs from pretrain.py."""
    rows, base = _rows(script), _rows("pretrain")
    if script != "pretrain":
        missing = [next(n for n in base[d][0].split("/") if n.startswith("`--")) for d in base if d not in rows]
        rows = {d: r for d, r in rows.items() if base.get(d) != r}
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    lines += [f"| {spellings} | {default} | {help_text} |" for spellings, default, help_text in rows.values()]
    if script != "pretrain":
        lines.append(f"\nAll other flags are pretrain.py's; it has no {', '.join(missing)}.")
    return "\n".join(lines)
