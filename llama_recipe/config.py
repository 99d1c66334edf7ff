"""Command-line flags, the run configuration, and input validation.

Flags keep the spellings of ColossalAI's LLaMA example (short forms included) so its commands
still work. Every input problem is found before anything is written or any process group starts,
and is reported as one line naming the problem and the fix, with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_TOKENIZER = REPO_ROOT / "data" / "llama-tokenizer"
SHIPPED_PRETRAIN_DATA = REPO_ROOT / "data" / "redpajama-sample"
DEFAULT_HUB_DATASET = "togethercomputer/RedPajama-Data-1T-Sample"


PRECISIONS = ["fp16", "bf16", "fp32", "pure_bf16"]


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


@dataclass
class TrainConfig:
    # model
    config: str = "tiny"  # pretraining: a preset or a HF config.json
    model_path: str | None = None  # finetuning: pretrained weights (local directory or hub name)
    grad_checkpoint: bool = False
    flash_attention: bool = False
    document_attention: bool = False  # packed rows: attend only within each document
    # parallelism
    plugin: str = "zero2"
    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    microbatch_size: int = 1
    mixed_precision: str | None = None  # None: bf16 on GPU, fp32 on CPU; pure_bf16 with the Collage optimizers
    # Gemini placement (gemini: static fractions; gemini_auto: the non-model-data warm-up ratio)
    shard_param_frac: float = 1.0
    offload_optim_frac: float = 0.0
    offload_param_frac: float = 0.0
    gemini_warmup_ratio: float = 0.8
    # data
    dataset: str = DEFAULT_HUB_DATASET
    data_mix: str | None = None  # pretraining: slice=weight,... or "llama"
    task_name: str = "super_natural_instructions"  # finetuning: the dataset configuration
    pack_examples: bool = False  # finetuning: several examples per row, each attending only to itself
    tokenizer: str | None = None  # None: the model's own (finetuning) or the shipped LLaMA tokenizer
    max_length: int | None = None  # None: the model's max_position_embeddings
    # optimisation
    optimizer: str | None = None  # None: hybrid_adam for gemini, adamw otherwise
    collage_reference_multiply: bool = False  # reproduce the Collage paper's code (biased second moment)
    log_edq: bool = False  # Collage: log effective descent quality and lost updates
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta2: float = 0.95  # Adam's second-moment decay (LLaMA: 0.95; BERT-style: 0.999)
    warmup_steps: int = 2000
    warmup_ratio: float = 0.03  # finetuning: warmup as a fraction of all steps
    eval_interval: int = 0  # finetuning: held-out loss every N steps (0: only at the end)
    eval_split: float = 0.05  # finetuning: fraction of the examples held out for evaluation
    grad_clip: float = 1.0
    batch_size: int = 2
    accumulation_steps: int = 1
    num_epochs: int = 1
    max_steps: int | None = None
    seed: int = 42
    # checkpoints and logs
    save_interval: int = 1000
    save_dir: str = "checkpoint"
    load: str | None = None  # a step-<N> directory, or "latest"
    auto_resume: bool = False  # resume from save_dir/latest when it exists
    keep_last: int = 0  # keep only the newest K checkpoints (0: keep all)
    export_hf: str | None = None  # write a Hugging Face model directory here at the end
    tensorboard_dir: str | None = "tb_logs"
    log_interval: int = 1
    time_breakdown: bool = False  # benchmark.py: synchronize the device to time each part of a step

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage block on a bad flag; we print one line and exit 2."""

    def error(self, message: str):
        sys.stderr.write(f"error: {message} (run {self.prog} --help for the flags)\n")
        sys.exit(2)


def _add_training_flags(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The flags pretrain.py and finetune.py share, with the ColossalAI example's spellings."""
    from .optim import OPTIMIZER_NAMES
    from .plugins import PLUGIN_NAMES

    add = p.add_argument
    add("-p", "--plugin", default=d.plugin, choices=PLUGIN_NAMES, help="ColossalAI booster plugin")
    add("--tokenizer", default=d.tokenizer, help="tokenizer directory or HF name (default: the shipped LLaMA one)")
    add("-e", "--num_epochs", type=int, default=d.num_epochs, help="passes over the data (unless --max_steps)")
    add("--max_steps", type=int, default=d.max_steps, help="stop after this many optimizer steps")
    add("-b", "--batch_size", type=int, default=d.batch_size, help="sequences per data-parallel rank per micro-step")
    add("--accumulation_steps", type=int, default=d.accumulation_steps, help="micro-steps per optimizer step")
    add("--lr", type=float, default=d.lr, help="peak learning rate")
    add(
        "-w",
        "--weight_decay",
        "--weigth_decay",
        type=float,
        default=d.weight_decay,
        help="AdamW weight decay (matrices only)",
    )
    add(
        "-g",
        "--grad_checkpoint",
        "--gradient_checkpoint",
        action="store_true",
        help="recompute activations in backward",
    )
    add(
        "-l", "--max_length", type=int, default=d.max_length, help="tokens per row (default: the model's max positions)"
    )
    add(
        "-x",
        "--mixed_precision",
        choices=PRECISIONS,
        default=d.mixed_precision,
        help="bf16/fp16: fp32 master weights, 16-bit compute; pure_bf16: everything bf16, no fp32 copy "
        "(what --optimizer collage_* needs). Default: bf16 on GPU, fp32 on CPU, pure_bf16 for collage_*",
    )
    add(
        "-i",
        "--save_interval",
        type=int,
        default=d.save_interval,
        help="checkpoint every N steps (<=0: only at the end)",
    )
    add("-o", "--save_dir", default=d.save_dir, help="checkpoint root directory")
    add("-f", "--load", default=d.load, help="checkpoint to resume from: a step-<N> directory, or 'latest' in -o")
    add("--auto_resume", action="store_true", help="resume from the newest checkpoint in -o if there is one")
    add("--keep_last", type=int, default=d.keep_last, help="keep only the newest K checkpoints (0: all)")
    add("--export_hf", default=d.export_hf, help="at the end, export a Hugging Face model directory here")
    add(
        "--grad_clip",
        "--gradient_clipping",
        type=float,
        default=d.grad_clip,
        help="clip the global gradient norm (0: off)",
    )
    add("-t", "--tensorboard_dir", default=d.tensorboard_dir, help="TensorBoard log directory ('' to disable)")
    add("-a", "--flash_attention", action="store_true", help="flash-attn 2 where installed on a CUDA device")
    add("--seed", type=int, default=d.seed, help="random seed (model init and data order)")
    add("--log_interval", type=int, default=d.log_interval, help="log metrics every N steps")
    add(
        "--optimizer",
        choices=OPTIMIZER_NAMES,
        default=d.optimizer,
        help="default: hybrid_adam for gemini, else adamw. collage_light/collage_plus: bf16 AdamW with error terms "
        "instead of fp32 master weights; inplace_sgd: SGD fused into the backward pass (LOMO), for low-memory finetuning",
    )
    add("--beta2", type=float, default=d.beta2, help="Adam second-moment decay (LLaMA used 0.95)")
    add(
        "--collage_reference_multiply",
        action="store_true",
        help="Collage: use the published code's multiply (under-estimates the second moment); for comparisons only",
    )
    add("--log_edq", action="store_true", help="Collage: log effective descent quality and the %% of updates lost")
    add("--tp", type=int, default=d.tp, help="tensor-parallel size (hybrid_parallel)")
    add("--pp", type=int, default=d.pp, help="pipeline-parallel size (hybrid_parallel)")
    add("--zero_stage", type=int, choices=[0, 1, 2], default=d.zero_stage, help="ZeRO stage inside hybrid_parallel")
    add("--microbatch_size", type=int, default=d.microbatch_size, help="pipeline micro-batch size (with --pp > 1)")


def build_pretrain_parser() -> argparse.ArgumentParser:
    from .model import model_config_names

    d = TrainConfig()
    p = OneLineErrorParser(prog="pretrain.py", description="Pretrain a LLaMA model with a ColossalAI booster plugin.")
    p.add_argument(
        "-c", "--config", default=d.config, help=f"model: {', '.join(model_config_names())}, or a HF config.json"
    )
    p.add_argument(
        "-d", "--dataset", default=d.dataset, help="HF dataset name, or local JSONL/Parquet file, directory or glob"
    )
    p.add_argument("-s", "--warmup_steps", type=int, default=d.warmup_steps, help="linear warmup steps, then cosine")
    p.add_argument("--document_attention", action="store_true", help="packed rows attend only within each document")
    p.add_argument(
        "--data_mix", default=d.data_mix, help="token weights of the corpus slices: arxiv=0.1,book=0.2,... or llama"
    )
    _add_training_flags(p, d)
    return p


def build_finetune_parser() -> argparse.ArgumentParser:
    d = TrainConfig(dataset="yizhongw/self_instruct", lr=2e-5, weight_decay=0.0, save_dir="checkpoint-finetune")
    p = OneLineErrorParser(prog="finetune.py", description="Finetune a LLaMA model on prompt/completion pairs.")
    p.add_argument(
        "--model_path", required=True, help="HF model directory, one of our step-<N> checkpoints, or a hub name"
    )
    p.add_argument(
        "-d",
        "--dataset",
        default=d.dataset,
        help="HF dataset name, a directory with one folder per task, or a JSONL file",
    )
    p.add_argument("--task_name", default=d.task_name, help="dataset configuration / task folder (e.g. self_instruct)")
    p.add_argument("--warmup_ratio", type=float, default=d.warmup_ratio, help="warmup steps as a fraction of all steps")
    p.add_argument(
        "--eval_interval", type=int, default=d.eval_interval, help="held-out loss every N steps (0: at the end)"
    )
    p.add_argument("--eval_split", type=float, default=d.eval_split, help="fraction of examples held out (0: none)")
    p.add_argument(
        "--pack_examples",
        action="store_true",
        help="fill each row with several whole examples (less padding); each attends only to itself",
    )
    _add_training_flags(p, d)
    return p


def _to_config(args: argparse.Namespace) -> TrainConfig:
    if args.tensorboard_dir == "":
        args.tensorboard_dir = None
    return TrainConfig(**vars(args))


def parse_pretrain_args(argv: list[str] | None = None) -> TrainConfig:
    return _to_config(build_pretrain_parser().parse_args(argv))


def parse_finetune_args(argv: list[str] | None = None) -> TrainConfig:
    args = build_finetune_parser().parse_args(argv)
    args.document_attention = args.pack_examples  # packed examples must not see each other
    return _to_config(args)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _has_known_length(dataset: str) -> bool:
    """Local files and prepared datasets can be counted cheaply; a hub stream cannot."""
    from .data import SYNTHETIC, _looks_local
    from .prepared import is_prepared_dataset

    return dataset == SYNTHETIC or is_prepared_dataset(dataset) or _looks_local(dataset)


def validate(cfg: TrainConfig, world_size: int) -> None:
    """Check everything that can be checked before training starts; raise one UsageError listing all problems."""
    from .data import check_dataset_source
    from .model import get_model_config, resolve_pretrained
    from .plugins import check_plugin_layout

    problems: list[str] = []

    def check(fn, *args):
        try:
            return fn(*args)
        except (UsageError, ValueError) as e:
            problems.append(str(e))

    if cfg.model_path is not None:  # finetuning: the shape comes with the weights
        model_dir = check(resolve_pretrained, cfg.model_path)
        model_config = check(get_model_config, str(model_dir)) if model_dir else None
    else:
        model_config = check(get_model_config, cfg.config)
    check(check_plugin_layout, cfg, world_size)
    check(check_dataset_source, cfg.dataset)
    if cfg.model_path is None and not cfg.max_steps and not _has_known_length(cfg.dataset):
        problems.append(
            f"-d {cfg.dataset} is streamed from the Hugging Face hub, so sizing -e epochs would first read all of it; "
            "pass --max_steps, or prepare it locally (scripts/prepare_data.py) to train by epochs"
        )
    if cfg.data_mix:
        from .data import files_by_slice, parse_data_mix
        from .prepared import is_prepared_dataset

        weights = check(parse_data_mix, cfg.data_mix)
        if is_prepared_dataset(cfg.dataset):
            problems.append(
                "--data_mix weights the slices of JSONL/Parquet files, not a prepared dataset; mix before preparing"
            )
        elif weights:
            check(files_by_slice, cfg.dataset, weights)
        if not cfg.max_steps:
            problems.append("--data_mix draws from the slices without end; pass --max_steps to set the run's length")
    if cfg.tokenizer and not Path(cfg.tokenizer).exists() and cfg.tokenizer.startswith((".", "/", "~")):
        problems.append(
            f"tokenizer directory {cfg.tokenizer} does not exist; pass --tokenizer with a tokenizer directory"
        )
    if model_config is not None and (cfg.max_length or 0) > model_config.max_position_embeddings:
        limit = model_config.max_position_embeddings
        problems.append(
            f"-l/--max_length {cfg.max_length} exceeds the model's {limit} positions; pass -l {limit} or less"
        )
    for flag, value, minimum in [
        ("-b/--batch_size", cfg.batch_size, 1),
        ("--accumulation_steps", cfg.accumulation_steps, 1),
        ("-e/--num_epochs", cfg.num_epochs, 1),
        ("-l/--max_length", cfg.max_length or 2, 2),
        ("--log_interval", cfg.log_interval, 1),
        ("-s/--warmup_steps", cfg.warmup_steps, 0),
        ("--max_steps", cfg.max_steps or 1, 1),
    ]:
        if value < minimum:
            problems.append(f"{flag} must be at least {minimum}, got {value}")
    if not 0 < cfg.beta2 < 1:
        problems.append(f"--beta2 must be between 0 and 1, got {cfg.beta2}")
    if cfg.lr <= 0:
        problems.append(f"--lr must be positive, got {cfg.lr}")
    if not 0 <= cfg.eval_split < 1:
        problems.append(f"--eval_split must be in [0, 1), got {cfg.eval_split}")
    if cfg.eval_interval < 0:
        problems.append(f"--eval_interval must be 0 (only at the end) or more, got {cfg.eval_interval}")
    if not 0 <= cfg.warmup_ratio < 1:
        problems.append(f"--warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.keep_last < 0:
        problems.append(f"--keep_last must be 0 (keep all) or more, got {cfg.keep_last}")
    if cfg.load is not None:
        from .checkpoint import check_checkpoint_dir

        check(check_checkpoint_dir, cfg.load, model_config)
    if problems:
        raise UsageError("; ".join(problems))
