"""The run configuration: one dataclass per concern, each field also the definition of its flag.

A field's metadata holds everything about its command-line flag: the spellings (the ColossalAI
example's, short forms included), the help text, which scripts offer it, per-script defaults, the
range a value must lie in, and its own parser (`type=`) where the field's type cannot read the text.
`cli.build_parser` generates every script's parser from these fields, so a flag is defined exactly
once. Flags stay flat (`--tp`, not `--parallel.tp`) because that is how the reference recipe spells
them; field names are therefore unique across sections. A spelling means one flag in every script:
benchmark.py keeps the ColossalAI benchmark's `--num_steps`, `--mbs` and `--zero`, but not its `-s`,
`-i`, `-w` and `--warmup_ratio`, which pretrain.py and finetune.py spell other flags with.

This module imports nothing of ours.
"""

from __future__ import annotations

import argparse
import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_args, get_type_hints

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_TOKENIZER = REPO_ROOT / "data" / "llama-tokenizer"
SHIPPED_PRETRAIN_DATA = REPO_ROOT / "data" / "redpajama-sample"
DEFAULT_HUB_DATASET = "togethercomputer/RedPajama-Data-1T-Sample"
DEFAULT_FINETUNE_DATASET = "yizhongw/self_instruct"
SYNTHETIC = "synthetic"  # `-d synthetic`: random tokens (benchmarks)

SCRIPTS = ("pretrain", "finetune", "benchmark")  # the scripts that train (a flag's default `scripts`)
TRAINING = ("pretrain", "finetune")
ALL_SCRIPTS = (*SCRIPTS, "eval")  # eval.py offers only the flags that name it
# eval.py's default text: never trained on (tests/test_heldout.py)
SHIPPED_HELD_OUT = REPO_ROOT / "data" / "heldout" / "sherlock_holmes_1661.jsonl"
# -t's default, which TrainConfig resolves to `tensorboard` inside the run's -o: each run its own
# directory (two runs never mix event files or overwrite each other's loss.png), and a resume in the
# same -o continues it. No -o, no default TensorBoard directory.
TENSORBOARD_SUBDIR = "tensorboard"
TENSORBOARD_IN_SAVE_DIR = f"<-o>/{TENSORBOARD_SUBDIR}"
PRECISIONS = ["fp16", "bf16", "fp32", "pure_bf16"]


@dataclass(frozen=True)
class Flag:
    """How a config field appears on a script's command line."""

    names: tuple[str, ...]
    help: str
    scripts: tuple[str, ...] = SCRIPTS  # the scripts that offer it (the others use its default silently)
    per_script: dict[str, dict] = field(default_factory=dict)  # script -> {"names"|"help"|"default": ...}
    required: bool = False
    type: Callable[[str], Any] | None = None  # parses the flag's text, where the field's type cannot (a tuple)
    advanced: bool = False  # listed in docs/flags.md only, not in the README's tables
    minimum: float | None = None  # value >= minimum
    maximum: float | None = None  # value <= maximum
    above: float | None = None  # value > above
    below: float | None = None  # value < below

    def for_script(self, script: str, default: Any) -> tuple[tuple[str, ...], str, Any]:
        """(spellings, help, default) in `script`."""
        over = self.per_script.get(script, {})
        return over.get("names", self.names), over.get("help", self.help), over.get("default", default)

    def label(self, script: str = "pretrain") -> str:
        """How messages name the flag: its short form and first long form, e.g. `-b/--batch_size`."""
        names = self.for_script(script, None)[0]
        short = [n for n in names if not n.startswith("--")]
        return "/".join(short[:1] + [next(n for n in names if n.startswith("--"))])

    def problem(self, value: Any, script: str = "pretrain") -> str | None:
        """What is wrong with `value` for this flag, or None. NaN fails every bound; infinity any float flag."""
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if self.minimum is not None and not value >= self.minimum:
            return f"{self.label(script)} must be at least {self.minimum:g}, got {value:g}"
        low_ok = self.above is None or value > self.above
        high_ok = self.below is None or value < self.below
        if not (low_ok and high_ok) or (isinstance(value, float) and math.isnan(value)):
            low = "" if self.above is None else f"above {self.above:g}"
            high = "" if self.below is None else f"below {self.below:g}"
            return f"{self.label(script)} must be {' and '.join(p for p in (low, high) if p)}, got {value:g}"
        if self.maximum is not None and not value <= self.maximum:
            return f"{self.label(script)} must be at most {self.maximum:g}, got {value:g}"
        if isinstance(value, float) and not math.isfinite(value):  # `--lr inf` would stop the run at step 1
            return f"{self.label(script)} must be a finite number, got {value:g}"
        return None


def flag(default: Any, *names: str, help: str, **spec: Any) -> Any:
    """A dataclass field whose metadata defines its command-line flag (see `Flag`)."""
    return field(default=default, metadata={"flag": Flag(names=names, help=help, **spec)})


def layer_counts(text: str) -> tuple[int, ...]:
    """A *_layers_per_stage flag's value: '19,20,20,21' -> (19, 20, 20, 21), checked as it is parsed."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        counts = ()
    if not counts or any(count < 0 for count in counts):
        raise argparse.ArgumentTypeError(f"takes comma-separated layer counts such as 2,2; got {text!r}")
    return counts


def setting(default: Any, **per_script_default: Any) -> Any:
    """A dataclass field that is no flag, with per-script defaults (e.g. benchmark.py's)."""
    return field(default=default, metadata={"per_script_default": per_script_default})


def flag_of(f) -> Flag | None:
    return f.metadata.get("flag")


def declared_type(section: type, name: str) -> Any:
    """The type `section` declares for its field `name`; `X` for `X | None` (None: unset)."""
    hint = get_type_hints(section)[name]
    if isinstance(hint, types.UnionType):
        (hint,) = (arg for arg in get_args(hint) if arg is not type(None))
    return hint


def default_for(f, script: str) -> Any:
    """The field's default in `script`."""
    spec = flag_of(f)
    if spec is None:
        return f.metadata.get("per_script_default", {}).get(script, f.default)
    return spec.for_script(script, f.default)[2]


@dataclass
class ModelConfig:
    """Which model, and how it computes attention and activations."""

    config: str = flag(
        "tiny",
        "-c",
        "--config",
        help="model: a preset (tiny, small, 1b, llama-7b ... llama3.2-3b, 7b/13b/30b/65b/70b) or a HF config.json",
        scripts=("pretrain", "benchmark"),
        per_script={"benchmark": {"default": "small"}},
    )
    model_path: str | None = flag(
        None,
        "--model_path",
        help="pretrained weights: a HF model directory, a step-<N> checkpoint, a run's directory or its latest file, or a hub name",
        scripts=("finetune", "eval"),
        required=True,
    )
    init_from: str | None = flag(
        None,
        "--init_from",
        help="continued pretraining: start from these weights (a HF model directory, a step-<N> checkpoint, a run's "
        "directory or its latest file, or a hub name); the model shape comes with them, -c is not used",
        scripts=("pretrain",),
    )
    grad_checkpoint: bool = flag(
        False,
        "-g",
        "--grad_checkpoint",
        "--gradient_checkpoint",
        help="recompute activations in backward (= --recompute full)",
    )
    recompute: str | None = flag(
        None,
        "--recompute",
        help="activation recompute: full (each decoder layer), selective (keep matmul and attention outputs, "
        "recompute the cheap ops between them), none. Default: full with -g, else none",
    )
    recompute_layers_per_stage: tuple[int, ...] | None = flag(
        None,
        "--recompute_layers_per_stage",
        help="with --pp > 1: how many decoder layers of each pipeline stage (and model chunk) recompute, "
        "comma-separated, e.g. 19,19,19,13",
        type=layer_counts,
        advanced=True,
    )
    flash_attention: bool = flag(
        False, "-a", "--flash_attention", "--xformers", help="flash-attn 2 where installed on a CUDA device"
    )
    compile: bool = flag(
        False,
        "--compile",
        help="torch.compile each decoder layer (the first step compiles; its time is reported apart)",
        advanced=True,
    )
    unfused_loss: bool = flag(
        False,
        "--unfused_loss",
        help="compute the full logits, then the loss (default: output layer and loss chunked, where the plugin allows)",
        advanced=True,
    )
    lora_rank: int | None = flag(
        None,
        "--lora_rank",
        help="LoRA: train rank-R adapters beside frozen weights (ColossalAI's Booster.enable_lora, peft; -p ddp, "
        "zero2 or zero2_cpu); checkpoints hold only the adapters (docs/finetuning.md)",
        scripts=("finetune",),
        minimum=1,
        advanced=True,
    )
    lora_alpha: float | None = flag(
        None,
        "--lora_alpha",
        help="LoRA: the adapters' output is scaled by alpha / rank (default 16)",
        scripts=("finetune",),
        above=0.0,
        advanced=True,
    )
    lora_targets: str | None = flag(
        None,
        "--lora_targets",
        help="LoRA: comma-separated projections given adapters, of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
        "down_proj (default q_proj,v_proj)",
        scripts=("finetune",),
        advanced=True,
    )
    document_attention: bool = flag(
        False,
        "--document_attention",
        help="packed rows attend only within each document (finetune: implied by --pack_examples)",
        scripts=("pretrain",),
    )


@dataclass
class ParallelConfig:
    """The booster plugin and the parallel layout (read by plugins.py and parallel.py)."""

    plugin: str = flag(
        "zero2", "-p", "--plugin", help="ColossalAI booster plugin (benchmark.py: 'none' = plain PyTorch)"
    )
    tp: int = flag(1, "--tp", help="tensor-parallel size (hybrid_parallel)", minimum=1)
    pp: int = flag(1, "--pp", help="pipeline-parallel size (hybrid_parallel)", minimum=1)
    zero_stage: int = flag(0, "--zero_stage", "--zero", help="ZeRO stage inside hybrid_parallel (0, 1 or 2)")
    microbatch_size: int = flag(
        1, "--microbatch_size", "--mbs", help="pipeline micro-batch size (with --pp > 1)", minimum=1
    )
    num_microbatches: int | None = flag(
        None,
        "--num_microbatches",
        help="pipeline micro-batches per step, instead of --microbatch_size (-b must divide by it)",
        minimum=1,
        advanced=True,
    )
    pp_style: str = flag(
        "1f1b",
        "--pp_style",
        help="pipeline schedule: 1f1b, interleaved (several model chunks per stage), zbv",
        advanced=True,
    )
    num_model_chunks: int | None = flag(
        None,
        "--num_model_chunks",
        help="model chunks per pipeline stage (default: 1 for 1f1b, 2 for interleaved and zbv)",
        minimum=1,
        advanced=True,
    )
    num_layers_per_stage: tuple[int, ...] | None = flag(
        None,
        "--num_layers_per_stage",
        help="decoder layers of each pipeline stage (each chunk, stage-major, with several), comma-separated, "
        "e.g. 19,20,20,21; default: as even as possible",
        type=layer_counts,
        advanced=True,
    )
    sp_mode: str | None = flag(
        None,
        "--sp_mode",
        help="sequence parallelism (hybrid_parallel): split_gather or ring (over the --tp group), all_to_all "
        "(--sp ranks split the heads), ring_attn (CUDA + flash attention)",
    )
    sp: int = flag(
        1, "--sp", help="sequence-parallel size for --sp_mode all_to_all or ring_attn", minimum=1, advanced=True
    )
    mixed_precision: str | None = flag(
        None,
        "-x",
        "--mixed_precision",
        help="bf16/fp16: fp32 master weights, 16-bit compute; pure_bf16: everything bf16, no fp32 copy "
        "(what --optimizer collage_* needs). Default: bf16 on GPU, fp32 on CPU, pure_bf16 for collage_*",
    )
    dist_timeout: float = flag(
        600.0,
        "--dist_timeout",
        help="seconds a collective may wait for a peer before the run stops (a dead or stuck rank)",
        above=0.0,
        advanced=True,
        scripts=ALL_SCRIPTS,
    )
    device_memory: float | None = flag(
        None,
        "--device_memory",
        help="GB per device the run-start check plans for (a warning when the planner's predicted peak exceeds "
        "it); default: the device's (CUDA's total memory; on CPU the RAM over this node's processes)",
        above=0.0,
        advanced=True,
        scripts=TRAINING,
    )
    shard_param_frac: float = flag(
        1.0, "--shard_param_frac", help="gemini: fraction of the parameters sharded", minimum=0.0, advanced=True
    )
    offload_optim_frac: float = flag(
        0.0,
        "--offload_optim_frac",
        help="gemini: fraction of the optimizer states kept on CPU",
        minimum=0.0,
        advanced=True,
    )
    offload_param_frac: float = flag(
        0.0, "--offload_param_frac", help="gemini: fraction of the parameters kept on CPU", minimum=0.0, advanced=True
    )
    gemini_warmup_ratio: float = flag(
        0.8,
        "--gemini_warmup_ratio",
        help="gemini_auto: the non-model-data warm-up ratio",
        minimum=0.0,
        advanced=True,
    )


@dataclass
class CompressionConfig:
    """Gradient compression on the data-parallel sync (read by compression.py through parallel.py)."""

    grad_compression: str = flag(
        "none",
        "--grad_compression",
        help="compress data-parallel gradients: powersgd (low-rank, with error feedback; -p ddp, or hybrid_parallel "
        "with --zero_stage 0); none: exact all-reduce",
    )
    powersgd_rank: int = flag(
        4,
        "--powersgd_rank",
        help="PowerSGD: rank of each gradient's factors",
        minimum=1,
        advanced=True,
    )
    powersgd_warmup: float = flag(
        0.1,
        "--powersgd_warmup",
        help="PowerSGD: fraction of the steps all-reduced exactly first (at least 2 steps)",
        minimum=0.0,
        below=1.0,
        advanced=True,
    )
    compress_stages: int = flag(
        0,
        "--compress_stages",
        help="with --pp > 1: compress only the first K pipeline stages' data-parallel gradients (in 1F1B theirs "
        "is the all-reduce left exposed at the end of a step); 0: every stage",
        minimum=0,
        advanced=True,
    )
    powersgd_log_cosine: bool = flag(
        False,
        "--powersgd_log_cosine",
        help="PowerSGD: also all-reduce the exact gradients and log the cosine similarity of the applied (compressed) "
        "mean to the exact mean, as comm/cosine (a diagnostic: it costs the exact all-reduce again)",
        advanced=True,
    )
    powersgd_no_error_feedback: bool = flag(
        False,
        "--powersgd_no_error_feedback",
        help="PowerSGD: drop what compression leaves out instead of adding it to the next step (for comparison)",
        advanced=True,
    )
    compress_backprop: int | None = flag(
        None,
        "--compress_backprop",
        help="with --pp > 1: compress the activation gradients each pipeline stage sends to the previous one to "
        "rank-R factors (one power iteration; each message's error is added to the next one: lazy error propagation)",
        minimum=1,
        advanced=True,
    )
    compress_backprop_epilogue_only: bool = flag(
        False,
        "--compress_backprop_epilogue_only",
        help="--compress_backprop: compress only the sends of 1F1B's flush (its last steady-state send and the "
        "cooldown), the ones on the critical path at the end of a step",
        advanced=True,
    )


@dataclass
class DataConfig:
    """Where the tokens come from and how they are cut (read by data.py, prepared.py, instruct.py)."""

    dataset: str = flag(
        DEFAULT_HUB_DATASET,
        "-d",
        "--dataset",
        help="HF dataset name, or local JSONL/Parquet file, directory or glob, or a prepare_data.py output",
        scripts=(*TRAINING, "eval"),
        per_script={
            "eval": {
                "default": None,
                "help": "the text to evaluate on: as pretrain.py's -d "
                "(default: the shipped held-out text, data/heldout)",
            },
            "finetune": {
                "default": DEFAULT_FINETUNE_DATASET,
                "help": "HF dataset name, a directory with one folder per task, or a JSONL file",
            },
            "benchmark": {"default": SYNTHETIC},
        },
    )
    data_mix: str | None = flag(
        None,
        "--data_mix",
        help="token weights of the corpus slices: arxiv=0.1,book=0.2,... or llama",
        scripts=("pretrain",),
    )
    data_dir: str | None = flag(
        None,
        "--data_dir",
        help="only the data files under this folder of -d (a hub repository or a local directory)",
        scripts=("pretrain", "eval"),
        advanced=True,
    )
    data_config: str | None = flag(
        None,
        "--data_config",
        help="a hub dataset's configuration (e.g. sample-10BT for HuggingFaceFW/fineweb-edu)",
        scripts=("pretrain", "eval"),
        advanced=True,
    )
    text_field: str = flag(
        "text",
        "--text_field",
        help="the field holding each document's text",
        scripts=("pretrain", "eval"),
        advanced=True,
    )
    slice_field: str | None = flag(
        None,
        "--slice_field",
        help="the row field naming each document's slice, for --data_mix within one stream "
        "(default: meta.redpajama_set_name for SlimPajama, else the file names)",
        scripts=("pretrain",),
        advanced=True,
    )
    shuffle_buffer: int = flag(
        1000,
        "--shuffle_buffer",
        help="pretraining: documents drawn at random from a buffer of this many, from 16 files read at once (files "
        "reordered every epoch; a prepared dataset's rows permuted); 0: read the files one after another in order",
        scripts=("pretrain",),
        minimum=0,
        advanced=True,
    )
    shuffle_rows: int = flag(
        1000,
        "--shuffle_rows",
        help="pretraining: the packed rows drawn at random from a buffer of this many rows, so that a long document "
        "(a book is hundreds of rows) does not fill batches in a row; 0: in packing order",
        scripts=("pretrain",),
        minimum=0,
        advanced=True,
    )
    task_name: str = flag(
        "super_natural_instructions",
        "--task_name",
        help="dataset configuration / task folder (e.g. self_instruct)",
        scripts=("finetune",),
    )
    pack_examples: bool = flag(
        False,
        "--pack_examples",
        help="fill each row with several whole examples (less padding); each attends only to itself",
        scripts=("finetune",),
    )
    eval_split: float = flag(
        0.05,
        "--eval_split",
        help="fraction of the examples held out for evaluation (0: none)",
        scripts=("finetune",),
        minimum=0.0,
        below=1.0,
    )
    tokenizer: str | None = flag(
        None,
        "--tokenizer",
        help="tokenizer directory or HF name (default: the model's own, else the shipped LLaMA one)",
        scripts=(*TRAINING, "eval"),
    )
    max_length: int | None = flag(
        None,
        "-l",
        "--max_length",
        help="tokens per row (default: the model's max positions)",
        minimum=2,
        scripts=ALL_SCRIPTS,
        per_script={"eval": {"help": "tokens per window (default: the model's max positions)"}},
    )


@dataclass
class OptimConfig:
    """The optimizer, its schedule and clipping (read by optim.py and the plugins)."""

    optimizer: str | None = flag(
        None,
        "--optimizer",
        help="default: hybrid_adam for gemini, else adamw. collage_light/collage_plus: bf16 AdamW with error terms "
        "instead of fp32 master weights; inplace_sgd: SGD fused into the backward pass (LOMO), for low-memory finetuning; "
        "muon: Muon for the hidden matrices, AdamW for the rest, at AdamW's --lr and -w (docs/muon.md)",
    )
    lr: float = flag(3e-4, "--lr", help="peak learning rate", above=0.0, per_script={"finetune": {"default": 2e-5}})
    weight_decay: float = flag(
        0.1,
        "-w",
        "--weight_decay",
        "--weigth_decay",
        help="AdamW weight decay (matrices only)",
        scripts=TRAINING,
        minimum=0.0,
        per_script={"finetune": {"default": 0.0}},
    )
    beta2: float = flag(0.95, "--beta2", help="Adam second-moment decay (LLaMA used 0.95)", above=0.0, below=1.0)
    adam_eps: float = flag(
        1e-5,
        "--adam_eps",
        help="Adam epsilon (adamw, hybrid_adam, collage_*): Llama 2's 1e-5 for pretraining, torch's 1e-8 for finetuning",
        above=0.0,  # 0 would divide 0 by 0 where a weight's gradients have all been zero (unseen tokens' embeddings)
        per_script={"finetune": {"default": 1e-8}},
    )
    warmup_steps: int = flag(
        2000,
        "-s",
        "--warmup_steps",
        help="linear warmup steps, then --lr_schedule (cosine decay to 10%% of --lr)",
        scripts=("pretrain",),
        minimum=0,
        per_script={"benchmark": {"default": 0}},
    )
    warmup_ratio: float = flag(
        0.03,
        "--warmup_ratio",
        help="warmup steps as a fraction of all steps",
        scripts=("finetune",),
        minimum=0.0,
        below=1.0,
    )
    lr_schedule: str = flag(
        "cosine",
        "--lr_schedule",
        help="after warmup: cosine (decay to 10%% of --lr), wsd (the peak held, then --decay_shape to 10%% over "
        "the last --decay_fraction of the steps), constant",
        scripts=TRAINING,
        advanced=True,
    )
    decay_fraction: float = flag(
        0.2,
        "--decay_fraction",
        help="wsd: the share of all steps spent decaying",
        above=0.0,
        maximum=1.0,
        scripts=TRAINING,
        advanced=True,
    )
    decay_shape: str = flag(
        "1-sqrt",
        "--decay_shape",
        help="wsd: the decay's shape (1-sqrt, linear, cosine)",
        scripts=TRAINING,
        advanced=True,
    )
    grad_clip: float = flag(
        1.0,
        "--grad_clip",
        "--gradient_clipping",
        help="clip the global gradient norm (0: off)",
        scripts=TRAINING,
        minimum=0.0,
    )
    collage_reference_multiply: bool = flag(
        False,
        "--collage_reference_multiply",
        help="Collage: use the published code's multiply (under-estimates the second moment); for comparisons only",
        advanced=True,
    )


@dataclass
class TrainingConfig:
    """How long and on what batches: read by the training loop and the batch builders."""

    batch_size: int = flag(
        2,
        "-b",
        "--batch_size",
        help="sequences per data-parallel rank per micro-step",
        minimum=1,
        scripts=ALL_SCRIPTS,
        per_script={"eval": {"default": 4, "help": "windows per forward pass"}},
    )
    accumulation_steps: int = flag(
        1, "--accumulation_steps", help="micro-steps per optimizer step", scripts=TRAINING, minimum=1
    )
    num_epochs: int = flag(
        1, "-e", "--num_epochs", help="passes over the data (unless --max_steps)", scripts=TRAINING, minimum=1
    )
    max_steps: int | None = flag(
        None,
        "--max_steps",
        help="stop after this many optimizer steps",
        minimum=1,
        per_script={"benchmark": {"names": ("--max_steps", "--num_steps"), "default": 8}},
    )
    seed: int = flag(42, "--seed", help="random seed (model init and data order)", minimum=0)
    max_bad_steps: int = flag(
        5,
        "--max_bad_steps",
        help="a step with a non-finite loss or gradient norm is skipped (no update); this many in a row stop the run",
        scripts=TRAINING,
        minimum=1,
        advanced=True,
    )
    on_spike: str = flag(
        "log",
        "--on_spike",
        help="a loss far above the recent ones (see --spike_z): log it, skip its update, stop, or roll back to the "
        "last checkpoint and go on with the next batches",
        scripts=TRAINING,
        advanced=True,
    )
    spike_z: float = flag(
        6.0,
        "--spike_z",
        help="a loss this many standard deviations above the last 100 is a spike",
        above=0.0,
        scripts=TRAINING,
        advanced=True,
    )
    eval_interval: int = flag(
        0,
        "--eval_interval",
        help="held-out loss every N steps (0: only at the start and the end)",
        scripts=TRAINING,
        minimum=0,
    )


@dataclass
class CheckpointConfig:
    """Where and how often to save, what to resume from (read by checkpointer.Checkpointer)."""

    save_interval: int = flag(
        1000, "-i", "--save_interval", help="checkpoint every N steps (<=0: only at the end)", scripts=TRAINING
    )
    save_dir: str = flag(
        "checkpoint",
        "-o",
        "--save_dir",
        help="checkpoint root directory",
        scripts=TRAINING,
        per_script={
            "finetune": {"default": "checkpoint-finetune"},
            "benchmark": {"default": ""},
            "eval": {"default": ""},
        },
    )
    load: str | None = flag(
        None,
        "-f",
        "--load",
        help="checkpoint to resume from: a step-<N> directory, a run's directory or its latest file, or 'latest' in -o",
        scripts=TRAINING,
    )
    config_file: str | None = flag(
        None,
        "--config_file",
        help="read flags from a YAML or TOML file (keys: long flag names without dashes, e.g. max_steps: 100; "
        "the command line wins). Each checkpoint holds its run's run.yaml: --config_file CKPT/step-N/run.yaml "
        "-f CKPT/step-N resumes it",
        scripts=ALL_SCRIPTS,
        advanced=True,
    )
    auto_resume: bool = flag(
        False, "--auto_resume", help="resume from the newest checkpoint in -o if there is one", scripts=TRAINING
    )
    replace_checkpoints: bool = flag(
        False,
        "--replace_checkpoints",
        help="start afresh in an -o that holds another run's checkpoints: they are moved to -o/.replaced-<time>/ "
        "and deleted once this run has saved its first checkpoint",
        scripts=TRAINING,
    )
    keep_last: int = flag(
        0, "--keep_last", help="keep only the newest K checkpoints (0: all)", scripts=TRAINING, minimum=0
    )
    export_hf: str | None = flag(
        None, "--export_hf", help="at the end, export a Hugging Face model directory here", scripts=TRAINING
    )
    reset_optimizer: bool = flag(
        False,
        "--reset_optimizer",
        help="resume with a fresh optimizer (and new optimizer flags)",
        scripts=TRAINING,
        advanced=True,
    )
    reset_data: bool = flag(
        False,
        "--reset_data",
        help="resume with the data stream from its start (and new data or batch flags)",
        scripts=TRAINING,
        advanced=True,
    )
    reset_schedule: bool = flag(
        False,
        "--reset_schedule",
        help="resume with the new lr/warmup/length/--lr_schedule flags' schedule, continued from the checkpoint's step",
        scripts=TRAINING,
        advanced=True,
    )
    reset_compression: bool = flag(
        False,
        "--reset_compression",
        help="resume with new --grad_compression/--powersgd_*/--compress_* flags; the compression state starts fresh",
        scripts=TRAINING,
        advanced=True,
    )
    async_save: bool = flag(
        False,
        "--async_save",
        help="write checkpoints in a background thread, beside the next step; training waits only before the update (GPU tensors: a copy to host)",
        scripts=TRAINING,
        advanced=True,
    )
    continue_on_save_error: bool = flag(
        False,
        "--continue_on_save_error",
        help="when a save fails (a full disk), keep training and try again at the next interval instead of stopping",
        scripts=TRAINING,
        advanced=True,
    )


@dataclass
class LoggingConfig:
    """What is measured and where it is written (read by metrics.RunMetrics and benchmark.py)."""

    tensorboard_dir: str | None = flag(
        TENSORBOARD_IN_SAVE_DIR,
        "-t",
        "--tensorboard_dir",
        help="TensorBoard log directory and loss.png (default: this run's own, tensorboard/ in -o; '' to disable)",
        scripts=TRAINING,
        per_script={"benchmark": {"default": None}, "eval": {"default": None}},
    )
    log_interval: int = flag(1, "--log_interval", help="log metrics every N steps", scripts=TRAINING, minimum=1)
    # Weights & Biases: the same scalars as TensorBoard (metrics.start_wandb); wandb is an optional package
    wandb_project: str | None = flag(
        None,
        "--wandb_project",
        help="also log the scalars to this Weights & Biases project, with the run's flags as its config (rank 0; "
        "needs `pip install wandb`)",
        scripts=TRAINING,
        advanced=True,
    )
    wandb_run: str | None = flag(
        None, "--wandb_run", help="the W&B run's name (default: W&B's)", scripts=TRAINING, advanced=True
    )
    wandb_mode: str | None = flag(
        None,
        "--wandb_mode",
        help="online, offline (files in <-o>/wandb; upload with `wandb sync`) or disabled (default: $WANDB_MODE, "
        "else online)",
        scripts=TRAINING,
        advanced=True,
    )
    log_edq: bool = flag(
        False,
        "--log_edq",
        help="Collage: log effective descent quality and the %% of updates lost",
        scripts=TRAINING,
        advanced=True,
    )
    peak_tflops: float | None = flag(
        None,
        "--peak_tflops",
        help="peak TFLOP/s per device for MFU (default: data sheet or a probe)",
        above=0.0,
        advanced=True,
    )
    ignore_steps: int = flag(
        2, "--ignore_steps", help="warm-up steps left out of the timing", scripts=("benchmark",), minimum=0
    )
    results: str | None = flag(
        None, "--results", help="append one JSON line per run to this file", scripts=("benchmark", "eval")
    )
    memory_accounting: bool = flag(
        False,
        "--memory_accounting",
        help="after the timed run, count the bytes per parameter of weights, gradients and optimizer state on "
        "each rank (builds the model a second time) next to Megatron's table",
        scripts=("benchmark",),
        advanced=True,
    )
    time_breakdown: bool = setting(False, benchmark=True)  # synchronize the device to time each part of a step


@dataclass
class EvalConfig:
    """Held-out evaluation: during pretraining (--eval_data) and by eval.py (read by evaluate.py)."""

    eval_data: str | None = flag(
        None,
        "--eval_data",
        help="held-out text to evaluate on before training, every --eval_interval steps and at the end "
        "(as -d: a JSONL/Parquet file, directory or glob, or a hub dataset; e.g. data/heldout)",
        scripts=("pretrain",),
    )
    eval_tokens: int = flag(
        65536,
        "--eval_tokens",
        help="tokens of --eval_data to evaluate on (a fixed set)",
        scripts=("pretrain",),
        minimum=1,
        advanced=True,
    )
    task: str = flag(
        "perplexity",
        "--task",
        help="perplexity (token and word perplexity, bits per byte) or cloze (the last word, greedily, as LAMBADA)",
        scripts=("eval",),
    )
    stride: int | None = flag(
        None,
        "--stride",
        help="perplexity: tokens each window after the first newly scores (default: -l, disjoint windows as "
        "lm-eval's loglikelihood_rolling; smaller: more context per token, more compute)",
        scripts=("eval",),
        minimum=1,
    )
    limit: int | None = flag(None, "--limit", help="evaluate only the first N documents", scripts=("eval",), minimum=1)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "compression": CompressionConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "training": TrainingConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "evaluation": EvalConfig,
}


@dataclass
class TrainConfig:
    """Everything a run was asked to do, one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.logging.tensorboard_dir == TENSORBOARD_IN_SAVE_DIR:
            save_dir = self.checkpoint.save_dir
            self.logging.tensorboard_dir = str(Path(save_dir) / TENSORBOARD_SUBDIR) if save_dir else None

    @classmethod
    def for_script(cls, script: str = "pretrain", **values: Any) -> TrainConfig:
        """A config with `script`'s defaults, overridden by flat `values` (field names, as the flags' dests)."""
        unknown = set(values) - {f.name for section in SECTIONS.values() for f in fields(section)}
        if unknown:
            raise TypeError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        sections = {}
        for name, section in SECTIONS.items():
            sections[name] = section(**{f.name: values.get(f.name, default_for(f, script)) for f in fields(section)})
        return cls(**sections)

    def held_out_data(self) -> DataConfig:
        """--eval_data as a data section: read as -d is, with the run's tokenizer and fields."""
        return replace(self.data, dataset=self.evaluation.eval_data, data_dir=None, data_config=None)

    def to_dict(self) -> dict[str, Any]:
        """Flat {field: value}, as recorded in every checkpoint's running_states.json: a tuple as the
        list it reads back as, so a resume compares its flags with the checkpoint's like for like."""
        values = {f.name: getattr(getattr(self, name), f.name) for name in SECTIONS for f in fields(SECTIONS[name])}
        return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}


def label_of(name: str) -> str:
    """How messages name a field's flag (`-b/--batch_size`), or the field name for settings."""
    for section in SECTIONS.values():
        for f in fields(section):
            if f.name == name:
                spec = flag_of(f)
                return spec.label() if spec else name
    raise KeyError(name)


def range_problems(cfg: TrainConfig, script: str = "pretrain") -> list[str]:
    """Every value outside its flag's range (see `Flag.problem`)."""
    problems = []
    for name, section in SECTIONS.items():
        for f in fields(section):
            spec = flag_of(f)
            problem = spec and spec.problem(getattr(getattr(cfg, name), f.name), script)
            if problem:
                problems.append(problem)
    return problems
