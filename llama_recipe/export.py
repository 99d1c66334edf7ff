"""Export a checkpoint's model as a standard Hugging Face directory (config, safetensors, tokenizer).

Nothing already saved is ever lost: the export is written to a new temporary directory and takes
the target's place only when the target is absent, empty, or an earlier export of ours (it holds
EXPORT_MARKER); a checkpoint directory, a directory holding checkpoints, or anything else is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import SafetensorError

from .checkpoint_io import read_running_states
from .checkpoint_paths import LATEST, RUNNING_STATES, resolve_checkpoint
from .errors import CheckpointError, UsageError
from .files import WRITE_ERRORS, move_into_place, write_failure
from .lora import is_lora_checkpoint, merged_model
from .model import check_weights, get_model_config

EXPORT_MARKER = "llama_recipe_export.json"  # what marks a directory as an export of ours (safe to replace)


def check_export_target(out_dir: str, save_dir: str | None = None) -> None:
    """Refuse, in one line, a target whose contents an export would destroy or hide."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--export_hf {out_dir} is a file; pass a directory (new, or an earlier export)")
    if save_dir:
        root = Path(save_dir).expanduser().resolve()
        if out == root or root in out.parents or out in root.parents:
            raise UsageError(
                f"--export_hf {out_dir} would be (in) the checkpoint directory -o {save_dir}; pass a directory outside it"
            )
    for parent in [out, *out.parents]:
        if (parent / RUNNING_STATES).is_file():
            raise UsageError(f"{out_dir} is inside the checkpoint {parent}; export to a directory outside it")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        held = "checkpoints" if (out / LATEST).exists() or any(out.glob("step-*")) else "other files"
        raise UsageError(f"{out_dir} holds {held} and is not an earlier export; pass a new or empty directory")
    for parent in out.parents:  # the nearest existing ancestor must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{out_dir} cannot be created: {parent} is a file; pass another directory")
            break


def export_hf(
    checkpoint: str,
    out_dir: str,
    tokenizer_dir: str | None = None,
    save_dir: str | None = None,
    flag: str = "export_hf.py",
) -> Path:
    """Load the checkpoint's (possibly sharded) weights with transformers and save them as one clean
    directory, in the dtype they were trained in. `checkpoint`: any name resolve_checkpoint takes
    (a step-<N>, a run's directory or its `latest` file); `flag`: what its messages say to pass
    another one to."""
    from transformers import AutoTokenizer

    checkpoint = str(resolve_checkpoint(checkpoint, flag, model_dir=False))
    read_running_states(checkpoint, flag)  # a complete checkpoint, or a one-line error
    check_export_target(out_dir, save_dir)
    model_dir = Path(checkpoint) / "model"
    check_weights(model_dir, get_model_config(str(model_dir)), "pass another checkpoint")  # headers only
    try:
        model = checkpoint_model(checkpoint)  # a LoRA checkpoint's: its base model, the adapters merged in
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
    # A file missing, cut short or not what it claims to be (ValueError: bad JSON, a tokenizer that
    # cannot be converted); the weights' headers and shapes were checked above.
    except (OSError, SafetensorError, ValueError) as e:
        raise _unreadable(model_dir, e) from None
    except Exception as e:  # the tokenizers library reports a malformed tokenizer.json as a bare Exception
        if type(e) is not Exception:
            raise  # anything else is a bug: its traceback shows
        raise _unreadable(model_dir, e) from None
    out = Path(out_dir).expanduser()
    tmp = out.with_name(f".{out.name}.export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # only ever our own temporary directory
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_MARKER).write_text(json.dumps({"checkpoint": str(Path(checkpoint).resolve())}) + "\n")
    except WRITE_ERRORS as e:  # a full disk: no partial export is left behind
        reason = write_failure(e, out)
        shutil.rmtree(tmp, ignore_errors=True)
        if reason is None:
            raise
        raise CheckpointError(f"exporting to {out_dir} failed ({reason}); nothing was written there") from None
    move_into_place(tmp, out)  # over nothing, an empty directory or an earlier export (check_export_target)
    return out


def checkpoint_model(checkpoint: str | Path):
    """The model a checkpoint holds, as transformers loads it (a LoRA checkpoint: base + adapters, merged)."""
    from transformers import LlamaForCausalLM

    if is_lora_checkpoint(checkpoint):
        return merged_model(checkpoint)
    return LlamaForCausalLM.from_pretrained(Path(checkpoint) / "model", torch_dtype="auto")


def _unreadable(model_dir: Path, error: Exception) -> UsageError:
    detail = str(error).splitlines()[0][:200] if str(error) else "no detail"
    return UsageError(f"could not read {model_dir} ({type(error).__name__}: {detail}); pass another checkpoint")
