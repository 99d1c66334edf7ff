"""What every script does around its main function: validate first, report bad input as one line
with exit code 2, and leave the process group cleanly."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable

from .config import TrainConfig, UsageError, validate, world_size_from_env

EXIT_USAGE = 2


def _fail(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
    sys.exit(EXIT_USAGE)


def quiet_libraries() -> None:
    """Silence import-time chatter that says nothing about the user's run."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we tokenize in one thread per rank
    warnings.filterwarnings("ignore", message=".*(apex|tensornvme|TORCH_CUDA_ARCH_LIST).*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def run_script(main: Callable[[TrainConfig], dict], cfg: TrainConfig) -> dict:
    quiet_libraries()
    try:
        validate(cfg, world_size_from_env())
        return main(cfg)
    except UsageError as e:
        _fail(str(e))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
