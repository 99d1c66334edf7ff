"""Export a checkpoint's model as a standard Hugging Face directory (config, safetensors, tokenizer)."""

from __future__ import annotations

import shutil
from pathlib import Path

from .checkpoint import read_running_states


def export_hf(checkpoint: str, out_dir: str, tokenizer_dir: str | None = None) -> Path:
    """Load the checkpoint's (possibly sharded) weights with transformers and save them as one clean
    directory, in the dtype they were trained in. Written to a temporary name, then renamed."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    read_running_states(checkpoint)  # a complete checkpoint, or a one-line error
    model_dir = Path(checkpoint) / "model"
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
