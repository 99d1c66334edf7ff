"""What every script does around its main function: validate first, report bad input as one line
with exit code 2, and leave the process group cleanly."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable

from .config import TrainConfig, UsageError, validate, world_size_from_env

EXIT_USAGE = 2


EXIT_FAILURE = 1


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
    sys.exit(code)


def quiet_libraries() -> None:
    """Silence import-time chatter that says nothing about the user's run."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we tokenize in one thread per rank
    warnings.filterwarnings("ignore", message=".*(apex|tensornvme|TORCH_CUDA_ARCH_LIST).*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def run_script(main: Callable[[TrainConfig], dict], cfg: TrainConfig) -> dict:
    quiet_libraries()
    from .checkpoint import CheckpointError, resolve_load_path

    try:
        cfg.load = resolve_load_path(cfg.load, cfg.save_dir, cfg.auto_resume)
        validate(cfg, world_size_from_env())
        result = main(cfg)
    except UsageError as e:
        _fail(str(e))
    except CheckpointError as e:  # e.g. a full disk during a save: not the user's input, but still one line
        _fail(str(e), EXIT_FAILURE)
    # Tear down only after a clean finish, once every rank is done: destroying gloo groups while a
    # peer still communicates (or after a failure) can abort or hang (cf. torchtitan PR #1342).
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result
