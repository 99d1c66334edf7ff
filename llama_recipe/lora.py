"""LoRA finetuning (`finetune.py --lora_rank R`): rank-R adapters beside frozen pretrained weights.

The adapters come from ColossalAI's `Booster.enable_lora`, which wraps the model in peft's
`PeftModel` before it is boosted (and under zero2 hands ZeRO the adapters' parameters); ColossalAI
0.5.0 offers it under TorchDDP and LowLevelZero, which is why only -p ddp, zero2 and zero2_cpu take
--lora_rank (`PluginSpec.lora`). Only the adapters train: the optimizer holds nothing else, and a
checkpoint holds only them (and their optimizer state), in peft's own format, with the directory
of the base model they were trained on:

    step-<N>/adapter/   adapter_model.safetensors (lora_A/lora_B only) and adapter_config.json
                        (its base_model_name_or_path: the base model's directory)
    step-<N>/model/     config.json and the tokenizer: no weights

A resume rebuilds the base from --model_path (which must be that directory) and loads the
adapters; `merged_model` rebuilds base + adapters and folds them in (peft's merge_and_unload), which
is what scripts/export_hf.py writes and what the end-of-run answers come from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint_paths import resolve_checkpoint
from .config import TrainConfig
from .distributed import is_main_process, print_main
from .errors import UsageError
from .files import safetensors_header
from .model import check_weights, get_model_config
from .plugins import PLUGINS

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ("q_proj", "v_proj")  # the LoRA paper's, peft's and LitGPT's default for LLaMA
DEFAULT_ALPHA = 16.0
LORA_OPTIMIZERS = ("adamw", "hybrid_adam")  # the ones LoRA runs are tested with (the plain Adam of the paper)
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's names
ADAPTER_CONFIG = "adapter_config.json"
LORA_FLAGS = ("lora_rank", "lora_alpha", "lora_targets")


def lora_targets(text: str | None) -> list[str]:
    """--lora_targets as a list (its default when unset)."""
    return [t.strip() for t in text.split(",") if t.strip()] if text else list(DEFAULT_TARGETS)


def lora_problems(cfg: TrainConfig) -> list[str]:
    """What is wrong with this run's LoRA flags (before anything is built or written)."""
    model = cfg.model
    if model.lora_rank is None:
        given = [f"--{name}" for name in LORA_FLAGS[1:] if getattr(model, name) is not None]
        verb = "shape" if len(given) > 1 else "shapes"
        return [f"{' and '.join(given)} {verb} LoRA adapters; add --lora_rank R"] if given else []
    problems = []
    unknown = [t for t in lora_targets(model.lora_targets) if t not in LORA_TARGETS]
    if unknown or not lora_targets(model.lora_targets):
        problems.append(
            f"--lora_targets {model.lora_targets!r}: {', '.join(unknown) or 'nothing'} is not a projection of the "
            f"model; choose among {','.join(LORA_TARGETS)}"
        )
    spec = PLUGINS.get(cfg.parallel.plugin)  # (an unknown -p is refused on its own)
    if spec and not spec.lora:
        problems.append(
            f"--lora_rank needs -p ddp, zero2 or zero2_cpu (Booster.enable_lora through TorchDDP or LowLevelZero; "
            f"Gemini does not offer it, and hybrid_parallel's shardformer LoRA is not wired in here); got -p "
            f"{cfg.parallel.plugin}"
        )
    if cfg.optim.optimizer not in (None, *LORA_OPTIMIZERS):
        problems.append(
            f"--lora_rank trains its adapters with --optimizer adamw or hybrid_adam; got {cfg.optim.optimizer}"
        )
    return problems


def lora_resume_problems(cfg: TrainConfig, checkpoint: str, saved: dict) -> list[str]:
    """A resume must rebuild what the checkpoint was trained as: full weights or adapters of the same
    shape, on the same base model (`saved`: the checkpoint's recorded config)."""
    has_adapters = (Path(checkpoint) / ADAPTER_DIR).is_dir()
    if has_adapters != (cfg.model.lora_rank is not None):
        held = "LoRA adapters (pass the --lora_* flags it was trained with)" if has_adapters else "full weights"
        return [f"{checkpoint} holds {held}; resume it {'with' if has_adapters else 'without'} --lora_rank"]
    if not has_adapters:
        return []
    changed = [
        f"--{k} {saved.get(k)!r} -> {getattr(cfg.model, k)!r}"
        for k in LORA_FLAGS
        if saved.get(k) != getattr(cfg.model, k)
    ]
    base = _recorded_base(Path(checkpoint) / ADAPTER_DIR)
    here = str(resolve_checkpoint(cfg.model.model_path, "--model_path").resolve())
    if base != here:
        changed.append(f"--model_path {base} -> {here}")
    return [f"{checkpoint}'s adapters were trained with other flags ({', '.join(changed)})"] if changed else []


def _recorded_base(adapter_dir: Path) -> str:
    """The base model directory an adapter's config records."""
    try:
        return str(json.loads((adapter_dir / ADAPTER_CONFIG).read_text())["base_model_name_or_path"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise UsageError(f"{adapter_dir / ADAPTER_CONFIG} is missing or corrupt; pass another checkpoint") from None


def lora_config(cfg: TrainConfig):
    """peft's LoraConfig for this run. No dropout: a resumed run then repeats the uninterrupted one bit for bit."""
    from peft import LoraConfig

    model = cfg.model
    alpha = model.lora_alpha if model.lora_alpha is not None else DEFAULT_ALPHA
    return LoraConfig(
        r=model.lora_rank,
        lora_alpha=alpha,
        target_modules=lora_targets(model.lora_targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_adapters(booster, model: torch.nn.Module, cfg: TrainConfig, base_weights: str) -> torch.nn.Module:
    """Load the pretrained weights into `model`, then wrap it with LoRA adapters (before boosting):
    the PeftModel, its base frozen. The weights are loaded here, not after boosting as full
    finetuning does, because the boosted PeftModel names them differently (`...q_proj.base_layer.weight`)."""
    from colossalai.checkpoint_io import GeneralCheckpointIO

    GeneralCheckpointIO().load_model(model, base_weights, strict=True)
    peft_model = booster.enable_lora(model, lora_config=lora_config(cfg))
    base_dir = Path(base_weights) if Path(base_weights).is_dir() else Path(base_weights).parent
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir.resolve())  # what checkpoints record
    trainable, total = peft_model.get_nb_trainable_parameters()
    config = peft_model.peft_config["default"]
    print_main(
        f"loaded weights from {base_weights}, frozen; LoRA rank {config.r}, alpha {config.lora_alpha:g} on "
        f"{','.join(sorted(config.target_modules))}: {trainable:,} trainable parameters ({trainable / total:.2%} of "
        f"{total:,})"
    )
    return peft_model


def _peft_model(boosted):
    """The PeftModel inside the booster's wrapper."""
    return boosted.unwrap(unwrap_peft=False)


def save_adapters(booster, model, checkpoint_dir: Path) -> None:
    """The adapters (peft's format, through the booster) into `checkpoint_dir`/adapter, and the model's
    config.json into model/ (rank 0). Every rank calls it."""
    peft_model = _peft_model(model)
    adapters = {k: v.detach().cpu() for k, v in peft_model.state_dict().items() if "lora_" in k}
    # (the plugin's checkpoint IO: Booster.save_lora_as_pretrained would copy the whole model's state to the CPU first)
    booster.checkpoint_io.save_lora_as_pretrained(model, str(checkpoint_dir / ADAPTER_DIR), True, state_dict=adapters)
    if is_main_process():
        peft_model.get_base_model().config.save_pretrained(checkpoint_dir / "model")


def load_adapters(model, adapter_dir: Path) -> None:
    """Load saved adapters into the (boosted) LoRA model, each tensor checked against the ones the
    model holds: the same names and shapes, none missing, none extra."""
    from peft import set_peft_model_state_dict

    saved = _checked_adapters(_peft_model(model), adapter_dir)
    set_peft_model_state_dict(_peft_model(model), saved)
    if hasattr(model, "update_master_params"):  # ZeRO: its fp32 master shards must follow the loaded weights
        model.update_master_params()


def _checked_adapters(peft_model, adapter_dir: Path) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    file, fix = adapter_dir / ADAPTER_WEIGHTS, "pass another checkpoint"
    header = safetensors_header(file, fix)  # whole, before reading
    expected = {k: list(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    missing, extra = sorted(expected.keys() - header.keys()), sorted(header.keys() - expected.keys())
    wrong = [f"{k} {header[k]} (needs {shape})" for k, shape in expected.items() if k in header and header[k] != shape]
    if missing or extra or wrong:
        what = [f"missing {missing[0]}"] * bool(missing) + [f"unexpected {extra[0]}"] * bool(extra) + wrong[:1]
        raise UsageError(f"{file} does not fit this model's adapters ({'; '.join(what)}); {fix}")
    return load_file(str(file))


def is_lora_checkpoint(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / ADAPTER_DIR).is_dir()


def merged_model(checkpoint: str | Path):
    """A LoRA checkpoint as a plain LlamaForCausalLM: its base model (the directory its adapter
    config records) with the adapters folded into the weights (W + alpha/r * B A; peft's merge_and_unload)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import LlamaForCausalLM

    adapter_dir = Path(checkpoint) / ADAPTER_DIR
    base = Path(_recorded_base(adapter_dir))
    if not (base / "config.json").is_file():
        raise UsageError(
            f"{adapter_dir}'s base model {base} is gone (the adapters hold only the difference to it); put it back"
        )
    check_weights(base, get_model_config(str(base)), "the adapters' base model is damaged")
    peft_model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base, torch_dtype="auto"), LoraConfig.from_pretrained(str(adapter_dir))
    )
    set_peft_model_state_dict(peft_model, _checked_adapters(peft_model, adapter_dir))
    return peft_model.merge_and_unload()
