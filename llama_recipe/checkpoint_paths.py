"""Where checkpoints live and what names a script may give them: the step-<N> layout, the `latest`
pointer, resolving any name to a checkpoint or model directory, pruning old checkpoints, and the
save-directory policy (a fresh run never writes over another run's checkpoints).

    save_dir/step-<N>/
        model/              booster.save_model (sharded safetensors + index + config.json) and the tokenizer:
                            a Hugging Face model directory that from_pretrained loads
        optimizer/          booster.save_optimizer (sharded; includes the fp16 loss scaler where there is one),
                            or under zero2/zero2_cpu each rank's own ZeRO slices (zero_slices.py)
        lr_scheduler.pt     booster.save_lr_scheduler
        data/rank-<R>.json  each rank's position in the data stream
        rng/rank-<R>.json   each rank's random number generator states (torch, CUDA, Python, NumPy)
        run.yaml            the run's flags, which --config_file reads back (cli.py)
        adapter/            --lora_rank: the LoRA adapters alone, in peft's format; model/ then holds no weights (lora.py)
        running_states.json step, epoch, consumed samples/tokens, layout and the run's config (written last)
    save_dir/latest         the name of the newest complete checkpoint

How the files are written and read: checkpoint_io.py.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .config import TENSORBOARD_SUBDIR, CheckpointConfig
from .distributed import print_main
from .errors import UsageError
from .sources import looks_like_a_path

RUNNING_STATES = "running_states.json"
RUN_FILE = "run.yaml"
LATEST = "latest"
REPLACED = ".replaced-"  # save_dir/.replaced-<time>-<pid>/: checkpoints --replace_checkpoints moved aside


def checkpoint_path(save_dir: str, step: int) -> Path:
    return Path(save_dir) / f"step-{step}"


def _step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def complete_checkpoints(save_dir: str) -> list[Path]:
    """The complete step-<N> checkpoints in save_dir, oldest first."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.name[5:].isdigit() and (p / RUNNING_STATES).is_file()]
    return sorted(found, key=_step_of)


def follow_latest(pointer: Path) -> Path:
    """The checkpoint a `latest` file names: only a `step-<N>` next to it, never a path elsewhere."""
    name = pointer.read_text().strip()
    if not (name.startswith("step-") and name[5:].isdigit()):
        raise UsageError(f"{pointer} names {name[:80]!r}, not a step-<N> checkpoint beside it; fix or delete it")
    return pointer.parent / name


def resolve_checkpoint(name: str, flag: str, model_dir: bool = True) -> Path:
    """Saved weights as any script's command line names them, resolved the same way everywhere: a
    step-<N> checkpoint, a run's `latest` file, a run's root directory (meaning its `latest`), and
    with `model_dir` also an exported Hugging Face directory or a hub name (downloaded once).
    `flag`: what the messages tell the user to pass it to (`-f`, `--model_path`, `export_hf.py`).
    Returns the step-<N> directory (`model_dir` False: resuming, exporting; read_running_states
    checks that it is complete) or a directory with config.json that from_pretrained loads (for a
    checkpoint, its model/)."""
    path = Path(name).expanduser()
    pointer = path if path.name == LATEST and path.is_file() else path / LATEST
    if pointer.is_file() and not (path / RUNNING_STATES).is_file():
        path = follow_latest(pointer)
        if not path.is_dir():
            raise UsageError(f"{pointer} names {path.name}, which does not exist; pass {flag} another checkpoint")
    elif path.is_dir() and not (path / "config.json").is_file() and complete_checkpoints(str(path)):
        newest = complete_checkpoints(str(path))[-1]
        raise UsageError(f"{name} holds checkpoints but no `{LATEST}` file; pass {flag} {newest}")
    if (path / RUNNING_STATES).is_file():
        if not model_dir:
            return path
        path = path / "model"
    elif not model_dir:
        if (path / "config.json").is_file():
            raise UsageError(
                f"{name} is a model directory, not a step-<N> checkpoint (no {RUNNING_STATES}); "
                f"pass {flag} a step-<N> directory, a run's directory or its `{LATEST}` file"
            )
        return path  # missing or incomplete: read_running_states says which part
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} has no config.json; pass {flag} a model directory or a complete checkpoint")
        return path
    if path.exists() or looks_like_a_path(name):  # a mistyped local path is said so at once, not looked up
        raise UsageError(
            f"{name} does not exist; pass {flag} a step-<N> checkpoint, a run's directory or its `{LATEST}` file, "
            "an exported model directory or a hub name"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model"]))
    # The hub's answers (not found, gated, offline and not cached), a name it refuses as a repo id, and
    # no network or no room in the cache (requests' errors are OSErrors); anything else is a bug.
    except (HfHubHTTPError, HFValidationError, OSError) as e:
        raise UsageError(
            f"could not download {name!r} from the Hugging Face hub ({type(e).__name__}); "
            f"pass {flag} a local directory (a checkpoint's step-<N>, a run's directory or an exported model)"
        ) from None


def resolve_load_path(load: str | None, save_dir: str, auto_resume: bool) -> str | None:
    """`-f latest` (or --auto_resume) means the checkpoint save_dir/latest names; any other -f is
    resolved as every script resolves a checkpoint (resolve_checkpoint)."""
    if load not in (None, LATEST):
        return str(resolve_checkpoint(load, "-f", model_dir=False))
    if not (load == LATEST or auto_resume):
        return load
    pointer = Path(save_dir) / LATEST
    if pointer.is_file():
        return str(follow_latest(pointer))
    if load == LATEST:
        raise UsageError(
            f"-f latest: {pointer} does not exist (no complete checkpoint in -o {save_dir}); drop -f to start fresh"
        )
    return None  # --auto_resume with nothing to resume: start fresh


def write_latest(save_dir: str, name: str) -> None:
    tmp = Path(save_dir) / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, Path(save_dir) / LATEST)  # atomic: readers see the old or the new name, never half


def prune(save_dir: str, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints; returns what was deleted."""
    doomed = complete_checkpoints(save_dir)[:-keep_last] if keep_last > 0 else []
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def _newest_saved(save_dir: str) -> str | None:
    """The checkpoint a run left in save_dir: what its `latest` names, else its newest complete
    step-<N>; None where no run has saved."""
    pointer = Path(save_dir) / LATEST
    if pointer.is_file():
        return str(pointer.parent / pointer.read_text().strip()[:80])
    found = complete_checkpoints(save_dir)
    return str(found[-1]) if found else None


def save_dir_problems(ckpt: CheckpointConfig, weights: tuple[str, str] | None = None) -> list[str]:
    """A run that starts afresh (no -f, nothing for --auto_resume to resume) never writes over another
    run's checkpoints: an -o that holds any (a complete step-<N>, or a `latest`) is refused, unless
    --replace_checkpoints moves them aside (set_aside). `weights`: (--init_from or --model_path, its
    flag), which --replace_checkpoints must not move away."""
    resuming = "--auto_resume" if ckpt.auto_resume else "-f"
    if ckpt.replace_checkpoints and ckpt.load is not None:
        return [f"--replace_checkpoints starts -o afresh but {resuming} resumes {ckpt.load}; pass one of them"]
    newest = _newest_saved(ckpt.save_dir) if ckpt.save_dir and ckpt.load is None else None
    if newest is None:
        return []
    if not ckpt.replace_checkpoints:
        return [
            f"-o {ckpt.save_dir} holds another run's checkpoints (the newest: {newest}); to go on with that run pass "
            "-f latest or --auto_resume, to start another pass a new -o, or pass --replace_checkpoints to move them "
            "aside (they are deleted once this run has saved its first checkpoint)"
        ]
    root = Path(ckpt.save_dir).expanduser().resolve()
    if weights and root in Path(weights[0]).expanduser().resolve().parents:
        return [
            f"{weights[1]} {weights[0]} lies in -o {ckpt.save_dir}, whose checkpoints --replace_checkpoints moves "
            f"aside; pass a new -o, or export or copy those weights elsewhere first"
        ]
    return []


def set_aside(save_dir: str) -> Path | None:
    """--replace_checkpoints (rank 0, under the save-directory lock): move save_dir's checkpoints, its
    `latest` and its default TensorBoard directory into save_dir/.replaced-<time>/, out of the view of
    `latest`, --auto_resume, --keep_last and the new run's loss curve; the Checkpointer deletes them
    once this run has saved. Returns that directory."""
    root = Path(save_dir)
    checkpoints = complete_checkpoints(save_dir)
    pointer = [root / LATEST] if (root / LATEST).exists() else []
    if not checkpoints and not pointer:
        return None
    aside = root / f"{REPLACED}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    aside.mkdir()
    events = [root / TENSORBOARD_SUBDIR] if (root / TENSORBOARD_SUBDIR).is_dir() else []  # else mixed with ours
    for path in [*pointer, *checkpoints, *events]:  # `latest` first: it never names a checkpoint already moved
        os.rename(path, aside / path.name)
    print_main(
        f"--replace_checkpoints: moved the earlier run's {len(checkpoints)} checkpoints and its "
        f"`{LATEST}` to {aside}; they are deleted once this run has saved its first checkpoint (to keep them, stop "
        f"this run before then and move them back: mv {aside}/* {root}/ && rmdir {aside})"
    )
    return aside
