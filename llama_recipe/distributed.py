"""Distributed basics, the same under every plugin: join the process group, ranks, the device,
barriers and world-wide collectives. Layout-aware collectives (data-parallel means, pipeline
stages) live beside the layout, in parallel.py."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from .colossalai_patches import apply_patches, set_dist_timeout


def has_cuda() -> bool:
    return torch.cuda.is_available()


def free_port() -> int:
    """A TCP port nobody listens on now, on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(seed: int, dist_timeout: float = 600.0) -> None:
    """Join the process group that torchrun / `colossalai run` set up, or make a 1-process one so
    that `python pretrain.py` works without a launcher (through a file: no port is opened). Applies
    our ColossalAI patches first; every group gets `dist_timeout` seconds. A process that already
    joined (a probe training several layouts in one job) stays in its group, and its generators
    start again from `seed`, as a fresh process's would."""
    if dist.is_initialized():
        from colossalai.utils import set_seed

        set_seed(seed)
        return
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    apply_patches(cpu_only=not has_cuda())
    store = Path(tempfile.gettempdir()) / f"llama_recipe-rendezvous-{os.getpid()}-{time.time_ns()}"
    set_dist_timeout(dist_timeout, str(store))
    import colossalai
    from colossalai.logging import get_dist_logger

    colossalai.launch_from_torch(seed=seed, verbose=False)
    get_dist_logger().set_level("WARNING")  # it logs every checkpoint shard at INFO; our lines say what matters


def shutdown() -> None:
    """Leave the process group after a clean finish, once every rank is done: destroying gloo
    groups while a peer still communicates (or after a failure) can abort or hang (torchtitan #1342)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def print_main(message: str) -> None:
    """Print on rank 0 only, above the progress bar if one is showing."""
    if is_main_process():
        tqdm.write(message)
        sys.stdout.flush()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def synchronize() -> None:
    """Wait for queued GPU work before reading a clock (CPU work is already done when it returns)."""
    if has_cuda():
        torch.cuda.synchronize()


def device() -> torch.device:
    if not has_cuda():
        return torch.device("cpu")
    from colossalai.accelerator import get_accelerator

    return get_accelerator().get_current_device()


def device_memory_gb() -> float:
    """GB of memory one process has: its CUDA device's total, or on CPU the machine's RAM shared by this
    node's processes (what the run-start fit check compares the planner's prediction with)."""
    if has_cuda():
        return torch.cuda.get_device_properties(device()).total_memory / 1e9
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram / int(os.environ.get("LOCAL_WORLD_SIZE", "1")) / 1e9


def fewest_across_ranks(count: int) -> int:
    """The smallest of every rank's count: e.g. how many steps all replicas can take together."""
    t = torch.tensor([count], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on any rank."""
    t = torch.tensor([1.0 if flag else 0.0], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` on the device, summed over all ranks (of none: a plain process)."""
    total = tensor.detach().clone().to(device())
    if dist.is_initialized():
        dist.all_reduce(total)
    return total
