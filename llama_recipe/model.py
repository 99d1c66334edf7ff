"""LLaMA model configurations and construction.

The model is Hugging Face `transformers.LlamaForCausalLM`: ColossalAI's shardformer knows how to
split it for tensor and pipeline parallelism, and its checkpoints load with `from_pretrained`.
Nothing here knows about parallelism; `plugins.py` and `parallel.py` do that.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import LlamaConfig, LlamaForCausalLM

from .errors import UsageError
from .files import safetensors_header
from .loss import use_chunked_loss

LLAMA_VOCAB_SIZE = 32000


LLAMA3_VOCAB_SIZE = 128256  # tiktoken's 128,000 tokens and 256 special ones


def _llama(hidden, layers, heads, intermediate, max_positions, rms_norm_eps, kv_heads=None, **llama3) -> dict:
    return dict(
        vocab_size=LLAMA_VOCAB_SIZE,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        rms_norm_eps=rms_norm_eps,
        **llama3,
    )


def _llama3(hidden, layers, heads, intermediate, version: str, tied: bool = False) -> dict:
    """Meta's Llama 3 family: the 128,256-token vocabulary, GQA with 8 kv heads, rope_theta 500,000, eps 1e-5.
    3.1 and 3.2 stretch 8192 trained positions to 131,072 with the "llama3" RoPE scaling (factor 8, and 32
    for 3.2's small models, which also tie the output layer to the embeddings)."""
    long_context = {
        "max_position_embeddings": 131072,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0 if version == "3.2" else 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    return {
        **_llama(hidden, layers, heads, intermediate, 8192, 1e-5, kv_heads=8, rope_theta=500000.0),
        "vocab_size": LLAMA3_VOCAB_SIZE,
        "tie_word_embeddings": tied,
        "bos_token_id": 128000,  # <|begin_of_text|>
        "eos_token_id": 128001,  # <|end_of_text|>
        **(long_context if version != "3" else {}),
    }


# Meta's published shapes. LLaMA-1 uses rms_norm_eps 1e-6 and 2048 positions; LLaMA-2 uses 1e-5 and
# 4096. (The ColossalAI example had 13760/17888 as the 13b/30b FFN sizes and 1e-6 for LLaMA-2: wrong.)
MODEL_PRESETS: dict[str, dict] = {
    "llama-7b": _llama(4096, 32, 32, 11008, 2048, 1e-6),
    "llama-13b": _llama(5120, 40, 40, 13824, 2048, 1e-6),
    "llama-30b": _llama(6656, 60, 52, 17920, 2048, 1e-6),
    "llama-65b": _llama(8192, 80, 64, 22016, 2048, 1e-6),
    "llama2-7b": _llama(4096, 32, 32, 11008, 4096, 1e-5),
    "llama2-13b": _llama(5120, 40, 40, 13824, 4096, 1e-5),
    "llama2-70b": _llama(8192, 80, 64, 28672, 4096, 1e-5, kv_heads=8),
    # Llama 3: the shapes of Meta's params.json (the FFN size is transformers' convert_llama_weights_to_hf.py rule
    # applied to their ffn_dim_multiplier and multiple_of; its positions: 8192 for 3, 131072 for 3.1), the RoPE
    # scaling of Meta's config.json (transformers' _compute_llama3_parameters names 8, 1, 4 and 8192 as the original).
    "llama3-8b": _llama3(4096, 32, 32, 14336, "3"),
    "llama3-70b": _llama3(8192, 80, 64, 28672, "3"),
    "llama3.1-8b": _llama3(4096, 32, 32, 14336, "3.1"),
    "llama3.1-70b": _llama3(8192, 80, 64, 28672, "3.1"),
    "llama3.1-405b": _llama3(16384, 126, 128, 53248, "3.1"),
    "llama3.2-1b": _llama3(2048, 16, 32, 8192, "3.2", tied=True),  # head_dim 64
    "llama3.2-3b": _llama3(3072, 28, 24, 8192, "3.2", tied=True),  # head_dim 128
    # Small presets for laptops, CI and quick GPU checks.
    "tiny": _llama(64, 2, 4, 176, 1024, 1e-5),  # ~4.2M params, mostly the 32000-token embeddings
    "tiny4": _llama(64, 4, 4, 176, 1024, 1e-5),  # tiny with 4 layers: enough to split over pipeline stages and chunks
    "small": _llama(512, 8, 8, 1408, 2048, 1e-5),  # ~58M params
    "1b": _llama(2048, 22, 32, 5632, 2048, 1e-5, kv_heads=4),  # TinyLlama-1.1B shape
}
# The reference recipe's spellings: `-c 7b` meant LLaMA-2 7B; 30b and 65b only exist for LLaMA-1.
MODEL_ALIASES = {
    "7b": "llama2-7b",
    "13b": "llama2-13b",
    "70b": "llama2-70b",
    "30b": "llama-30b",
    "65b": "llama-65b",
}


def model_config_names() -> list[str]:
    return sorted(MODEL_PRESETS) + sorted(MODEL_ALIASES)


def get_model_config(name_or_path: str) -> LlamaConfig:
    """A preset name (see `model_config_names()`), or a path to a Hugging Face `config.json`
    (or to a directory that holds one). Raises UsageError naming the choices otherwise."""
    name = MODEL_ALIASES.get(name_or_path, name_or_path)
    if name in MODEL_PRESETS:
        return LlamaConfig(**MODEL_PRESETS[name])
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            fields = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"model config {path} is not valid JSON ({e}); pass a Hugging Face config.json") from None
        check_model_fields(fields, str(path))
        try:
            return LlamaConfig(**{k: v for k, v in fields.items() if k != "model_type"})
        # transformers' own checks of the fields (rope_scaling, ...) raise these on a value of the wrong
        # kind or out of range; check_model_fields covered the fields we rely on.
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"model config {path}: {str(e).splitlines()[0][:200]}; fix the config.json") from None
    raise UsageError(
        f"unknown model config {name_or_path!r}; pass one of {', '.join(model_config_names())} "
        "or a path to a Hugging Face config.json"
    )


POSITIVE_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
)


def check_model_fields(fields, path: str) -> None:
    """A config.json's fields make a LLaMA this recipe can build, or a one-line UsageError naming the first problem."""
    if not isinstance(fields, dict):
        raise UsageError(f"model config {path} is not a JSON object; pass a Hugging Face config.json")
    if fields.get("model_type", "llama") != "llama":
        raise UsageError(
            f"model config {path} has model_type {fields['model_type']!r}; this recipe trains LLaMA models"
        )
    for key in [*POSITIVE_INT_FIELDS, "num_key_value_heads", "head_dim"]:
        value = fields.get(key)
        if (key in POSITIVE_INT_FIELDS or value is not None) and not (type(value) is int and value > 0):
            raise UsageError(f"model config {path}: {key} must be a positive integer, got {value!r}")
    heads, kv_heads = fields["num_attention_heads"], fields.get("num_key_value_heads") or fields["num_attention_heads"]
    if not fields.get("head_dim") and fields["hidden_size"] % heads:
        raise UsageError(
            f"model config {path}: hidden_size {fields['hidden_size']} is not divisible by num_attention_heads {heads}"
        )
    if heads % kv_heads:
        raise UsageError(
            f"model config {path}: num_attention_heads {heads} is not divisible by num_key_value_heads {kv_heads}"
        )
    eps = fields.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 1:
        raise UsageError(f"model config {path}: rms_norm_eps must be a small positive number, got {eps!r}")


def build_model(
    config: LlamaConfig,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype | None = None,
    chunked_loss: bool = False,
    init: WeightInit | None = None,
) -> LlamaForCausalLM:
    """A randomly initialised LLaMA: with `init`, each weight drawn from (its seed, the weight's name)
    (`init_weights`); without, transformers' draw from torch's global generator (call under a fixed seed).

    `chunked_loss`: given labels, it computes the loss chunk by chunk without the full logits (loss.py).

    `dtype` builds the weights directly in that dtype, so no fp32 copy ever exists (and lazy
    initialisation, which ignores a later `.to()`, gets it too). With `init` the values equal building
    in fp32 and casting. The rotary frequencies stay fp32, as transformers computes them explicitly.
    """
    config._attn_implementation = attn_implementation
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if init is not None:
        init_weights(model, init)
    return use_chunked_loss(model) if chunked_loss else model


@dataclass(frozen=True)
class WeightInit:
    """How `init_weights` draws: from `seed`, on `device`'s generator (the run's accelerator: CPU and CUDA
    generators give different numbers). `lazy`: the model was built under ColossalAI's LazyInitContext
    with `device` as its default device, so each draw is recorded and runs where the weight materialises."""

    seed: int
    device: torch.device = torch.device("cpu")
    lazy: bool = False


def weight_seed(seed: int, name: str) -> int:
    """The seed of one weight's draw: a stable hash (not Python's salted `hash`) of the run's seed and the
    weight's full name, 63 bits (torch.Generator takes a signed 64-bit seed)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def init_weights(model: LlamaForCausalLM, init: WeightInit) -> None:
    """Draw every random weight of `model` again, each from its own generator seeded by `weight_seed(seed,
    name)`, with transformers' distribution (LlamaPreTrainedModel._init_weights: linear and embedding
    weights normal(0, initializer_range), biases and the embedding's padding row zero; the RMSNorm gains
    keep their constructor's ones).

    Why not one generator for the whole model: its numbers go to the weights in the order they are drawn,
    and that order changes with the layout. ColossalAI's lazy initialisation draws each weight when it
    materialises it, shard by shard, stage by stage; a pipeline stage never draws the layers it does not
    hold. Per-name draws give every weight the same values under every plugin, layout and process count,
    one process included, and under lazy initialisation still no process ever holds the whole model.
    """
    std = model.config.initializer_range
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights once
            owner = model.get_submodule(name.rpartition(".")[0])
            if not isinstance(owner, torch.nn.Linear | torch.nn.Embedding):
                continue  # RMSNorm gains: ones, no draw
            if name.endswith(".bias"):
                param.zero_()
                continue
            generator = torch.Generator(init.device).manual_seed(weight_seed(init.seed, name))
            if init.lazy:
                # recorded on the lazy tensor and replayed where it materialises (on init.device); a copy_ from
                # a second lazy tensor would recurse in ColossalAI 0.5.0's replay
                param.normal_(0.0, std, generator=generator)
            else:  # drawn in fp32 on init.device whatever the weight's dtype and device: the same numbers as lazily
                param.copy_(torch.empty(param.shape, device=init.device).normal_(0.0, std, generator=generator))
            if isinstance(owner, torch.nn.Embedding) and owner.padding_idx is not None:
                param[owner.padding_idx].zero_()


def compile_decoder_layers(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """torch.compile each decoder layer in place, as torchtitan does: the layers share one compiled
    graph (compiled once, on the first step), the rest of the model stays eager, and the weights keep
    their names (no `_orig_mod.` prefix), so checkpoints are unchanged."""
    for layer in model.model.layers:
        layer.compile()
    return model


def count_parameters(config: LlamaConfig) -> int:
    """Exact parameter count of `LlamaForCausalLM(config)`, without building it."""
    h, layers, v, ffn = config.hidden_size, config.num_hidden_layers, config.vocab_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    attention = 2 * h * q + 2 * h * kv  # q, o and k, v projections
    if getattr(config, "attention_bias", False):
        attention += q + 2 * kv + h
    mlp = 3 * h * ffn  # gate, up, down (SwiGLU)
    if getattr(config, "mlp_bias", False):
        mlp += 2 * ffn + h
    per_layer = attention + mlp + 2 * h  # two RMSNorm weights
    embeddings = v * h * (1 if config.tie_word_embeddings else 2)
    return layers * per_layer + embeddings + h  # final norm


def weights_location(model_dir: Path) -> str:
    """What `booster.load_model` takes: the directory of a sharded checkpoint (it has an index), or the one file."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (model_dir / index).is_file():
            return str(model_dir)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / single).is_file():
            return str(model_dir / single)
    raise UsageError(f"{model_dir} holds no model weights (*.safetensors or pytorch_model.bin)")


def weight_shapes(config: LlamaConfig) -> dict[str, list[int]]:
    """The name and shape of every weight `LlamaForCausalLM(config)` loads (tied ones once, as saved),
    from a model built on the meta device: no memory, whatever its size."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: list(p.shape) for name, p in model.named_parameters()}


def check_weights(model_dir: Path | str, config: LlamaConfig, fix: str) -> None:
    """The safetensors weights in `model_dir` (one file, or the shards its index names) hold every
    weight the model needs, with its shape, in files that are whole: read from the headers and file
    sizes only. A one-line UsageError naming the file and the tensor otherwise. (Loaders would
    zero-fill, skip or randomly initialise what is missing, or fail deep inside.) A directory of
    pickled weights (pytorch_model.bin) has no header to read: its load checks it."""
    model_dir = Path(model_dir)
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            assert isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
            raise UsageError(f"{index_path} has no valid 'weight_map'; {fix}") from None
    elif (model_dir / "model.safetensors").is_file():
        weight_map = dict.fromkeys(safetensors_header(model_dir / "model.safetensors", fix), "model.safetensors")
    else:
        return
    headers = {name: safetensors_header(model_dir / name, fix) for name in sorted(set(weight_map.values()))}
    for tensor, file in weight_map.items():
        if tensor not in headers[file]:
            raise UsageError(
                f"{index_path}: 'weight_map' puts {tensor} in {model_dir / file}, which does not hold it; {fix}"
            )
    for tensor, shape in weight_shapes(config).items():
        if tensor not in weight_map:
            raise UsageError(f"{model_dir} holds no tensor {tensor} (the model needs it, {shape}); {fix}")
        if headers[weight_map[tensor]][tensor] != shape:
            raise UsageError(
                f"{model_dir / weight_map[tensor]}: {tensor} has shape {headers[weight_map[tensor]][tensor]}, the "
                f"model (config.json) needs {shape}; {fix}"
            )


def load_pretrained_model(
    model_dir: Path | str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
):
    """A saved model (config.json + safetensors) for inference, in eval mode; damaged or missing
    weights are one line."""
    check_weights(model_dir, get_model_config(str(model_dir)), "save or export the model again")
    try:
        model = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=dtype, use_safetensors=True)
    except (OSError, SafetensorError) as e:  # no weights file, or one that cannot be read
        detail = str(e).splitlines()[0][:200] if str(e) else "no detail"
        raise UsageError(f"could not load the model in {model_dir} ({type(e).__name__}: {detail})") from None
    return model.to(device).eval()


def inference_placement() -> tuple[torch.dtype, torch.device]:
    """Where a model is loaded to generate or score: bf16 on this process's GPU if there is one, else
    fp32 on the CPU (where bf16 is slow, and fp32 exact)."""
    if torch.cuda.is_available():
        return torch.bfloat16, torch.device("cuda", torch.cuda.current_device())
    return torch.float32, torch.device("cpu")


def check_tokenizer_fits(tokenizer, model_config, where: str) -> None:
    """A tokenizer with more tokens than the model's embedding rows would index past them."""
    if len(tokenizer) > model_config.vocab_size:
        raise UsageError(
            f"the tokenizer {tokenizer.name_or_path!r} has {len(tokenizer)} tokens but the model in {where} has "
            f"{model_config.vocab_size}; pass --tokenizer with the one the model was trained with"
        )
