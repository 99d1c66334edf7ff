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


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


@dataclass
class TrainConfig:
    # model
    config: str = "tiny"
    grad_checkpoint: bool = False
    flash_attention: bool = False
    # parallelism
    plugin: str = "zero2"
    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    microbatch_size: int = 1
    mixed_precision: str | None = None  # None: bf16 on GPU, fp32 on CPU (bf16 matmuls crawl there)
    # data
    dataset: str = DEFAULT_HUB_DATASET
    tokenizer: str = str(SHIPPED_TOKENIZER)
    max_length: int | None = None  # None: the model's max_position_embeddings
    # optimisation
    optimizer: str | None = None  # None: hybrid_adam for gemini, adamw otherwise
    lr: float = 3e-4
    weight_decay: float = 0.1
    warmup_steps: int = 2000
    grad_clip: float = 1.0
    batch_size: int = 2
    accumulation_steps: int = 1
    num_epochs: int = 1
    max_steps: int | None = None
    seed: int = 42
    # checkpoints and logs
    save_interval: int = 1000
    save_dir: str = "checkpoint"
    load: str | None = None
    tensorboard_dir: str | None = "tb_logs"
    log_interval: int = 1

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage block on a bad flag; we print one line and exit 2."""

    def error(self, message: str):
        sys.stderr.write(f"error: {message} (run {self.prog} --help for the flags)\n")
        sys.exit(2)


def build_pretrain_parser() -> argparse.ArgumentParser:
    from .model import model_config_names
    from .optim import OPTIMIZER_NAMES
    from .plugins import PLUGIN_NAMES

    d = TrainConfig()
    p = OneLineErrorParser(prog="pretrain.py", description="Pretrain a LLaMA model with a ColossalAI booster plugin.")
    add = p.add_argument
    add(
        "-c",
        "--config",
        default=d.config,
        help=f"model preset ({', '.join(model_config_names())}) or a path to a HF config.json",
    )
    add("-p", "--plugin", default=d.plugin, choices=PLUGIN_NAMES, help="ColossalAI booster plugin")
    add(
        "-d",
        "--dataset",
        default=d.dataset,
        help="Hugging Face dataset name, or a local JSONL/Parquet file, directory or glob",
    )
    add(
        "--tokenizer",
        default=d.tokenizer,
        help="tokenizer directory or Hugging Face name (default: the shipped LLaMA tokenizer)",
    )
    add(
        "-e",
        "--num_epochs",
        type=int,
        default=d.num_epochs,
        help="passes over the data (ignored when --max_steps is set)",
    )
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
        help="AdamW weight decay (not applied to norms and biases)",
    )
    add("-s", "--warmup_steps", type=int, default=d.warmup_steps, help="linear warmup steps before the cosine decay")
    add(
        "-g",
        "--grad_checkpoint",
        "--gradient_checkpoint",
        action="store_true",
        help="recompute activations in backward to save memory",
    )
    add(
        "-l",
        "--max_length",
        type=int,
        default=d.max_length,
        help="tokens per training row (default: the model's max positions)",
    )
    add(
        "-x",
        "--mixed_precision",
        choices=["fp16", "bf16", "fp32"],
        default=d.mixed_precision,
        help="default: bf16 on GPU, fp32 on CPU",
    )
    add(
        "-i",
        "--save_interval",
        type=int,
        default=d.save_interval,
        help="save a checkpoint every N steps (<=0: only at the end)",
    )
    add("-o", "--save_dir", default=d.save_dir, help="checkpoint root directory")
    add("-f", "--load", default=d.load, help="checkpoint directory to resume from")
    add(
        "--grad_clip",
        "--gradient_clipping",
        type=float,
        default=d.grad_clip,
        help="clip the global gradient norm (0: off)",
    )
    add("-t", "--tensorboard_dir", default=d.tensorboard_dir, help="TensorBoard log directory ('' to disable)")
    add("-a", "--flash_attention", action="store_true", help="use flash-attn 2 where installed on a CUDA device")
    add("--seed", type=int, default=d.seed, help="random seed (model init and data order)")
    add("--log_interval", type=int, default=d.log_interval, help="log metrics every N steps")
    add(
        "--optimizer",
        choices=OPTIMIZER_NAMES,
        default=d.optimizer,
        help="adamw (torch) or hybrid_adam (ColossalAI's fused kernel); default: hybrid_adam for gemini, adamw otherwise",
    )
    add("--tp", type=int, default=d.tp, help="tensor-parallel size (hybrid_parallel)")
    add("--pp", type=int, default=d.pp, help="pipeline-parallel size (hybrid_parallel)")
    add("--zero_stage", type=int, choices=[0, 1, 2], default=d.zero_stage, help="ZeRO stage inside hybrid_parallel")
    add(
        "--microbatch_size",
        type=int,
        default=d.microbatch_size,
        help="pipeline micro-batch size (hybrid_parallel with --pp > 1)",
    )
    return p


def parse_pretrain_args(argv: list[str] | None = None) -> TrainConfig:
    args = build_pretrain_parser().parse_args(argv)
    if args.tensorboard_dir == "":
        args.tensorboard_dir = None
    return TrainConfig(**vars(args))


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate(cfg: TrainConfig, world_size: int) -> None:
    """Check everything that can be checked before training starts; raise one UsageError listing all problems."""
    from .data import check_dataset_source
    from .model import get_model_config
    from .plugins import check_plugin_layout

    problems: list[str] = []

    def check(fn, *args):
        try:
            return fn(*args)
        except (UsageError, ValueError) as e:
            problems.append(str(e))

    model_config = check(get_model_config, cfg.config)
    check(check_plugin_layout, cfg, world_size)
    check(check_dataset_source, cfg.dataset)
    if not Path(cfg.tokenizer).exists() and os.path.isabs(cfg.tokenizer):
        problems.append(
            f"tokenizer directory {cfg.tokenizer} does not exist; pass --tokenizer with a tokenizer directory"
        )
    if (
        model_config is not None
        and cfg.max_length is not None
        and cfg.max_length > model_config.max_position_embeddings
    ):
        problems.append(
            f"-l/--max_length {cfg.max_length} exceeds the model's {model_config.max_position_embeddings} positions; "
            f"pass -l {model_config.max_position_embeddings} or less"
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
    if cfg.lr <= 0:
        problems.append(f"--lr must be positive, got {cfg.lr}")
    if cfg.load is not None:
        from .checkpoint import check_checkpoint_dir

        check(check_checkpoint_dir, cfg.load)
    if problems:
        raise UsageError("; ".join(problems))
