"""Every change we make to ColossalAI, in one place. Each patch says what it fixes; all were
written against colossalai==0.5.0 and replace internals by name, so they apply to that exact
version only (`apply_patches` refuses another, in one line).

0. Where bitsandbytes is not installed (`_import_optimizers_without_bitsandbytes`): ColossalAI's
   optimizer package imports without it (it wants one base class, for GaLore's 8-bit optimizers).
1. For every run: `LowLevelZeroOptimizer`'s checkpoint copies (`_CopyWithoutStateTensors`),
   safetensors shards written without an extra copy of every tensor (`_patch_safetensors_writes`), and
   every `torch.load` ColossalAI's checkpoint code makes (optimizer shards and param groups, the lr
   scheduler, .bin weights) with `weights_only=True`, so a crafted checkpoint file cannot run code on
   any torch (2.5.1, the GPU stack's, still defaults to unpickling anything); and the process groups
   ColossalAI creates (the world in `launch`, its meshes' subgroups) get --dist_timeout, so a dead or
   stuck rank ends the run within that bound instead of gloo's/NCCL's 30 or 10 minutes. A run of one
   process rendezvous through a file instead of a TCP store (which would listen on every interface).
2. On a CPU-only machine (gloo): ColossalAI picks its `CpuAccelerator` when CUDA is absent, but
   several of its methods raise "not supported" and a few code paths assume CUDA or NPU. With these
   patches ddp, zero2, zero2_cpu and hybrid_parallel (tp and pp) train, save and load on CPU.
   Gemini cannot: its chunk manager uses the device strings "cpu"/"cuda" as placement states,
   which no small patch can untangle (the plugin registry refuses it with a clear message).
   On a GPU machine none of these apply and ColossalAI runs unmodified.
3. Per model, with --grad_compression and --pp > 1 (`route_pipeline_dp_grad_sync`): the pipeline's
   data-parallel gradient sync goes through our compressor instead of one all-reduce per parameter.
4. Only while a checkpoint is saved with --async_save (`deferred_state_dict_writes`): every
   state-dict file ColossalAI's checkpoint code writes is handed to our background writer
   (background_save.BackgroundSave) instead, device tensors copied to host memory first. Its own
   asynchronous path (`use_async`) needs the tensornvme package and pinned memory, which CPU-only
   machines and most clusters lack.
5. Per plugin, with --compress_backprop (`compress_pipeline_backward`): the activation gradients
   1F1B sends to the previous stage go through our codec (only its factors travel).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import importlib
import importlib.util
import pickle
import sys
import types

import torch
import torch.distributed as dist

from .errors import UsageError
from .files import write_safetensors

PATCHED_FOR_VERSION = "0.5.0"
_applied: list[str] = []


class _CopyWithoutStateTensors:
    """Stands in for the `copy` module inside colossalai.zero.low_level.low_level_optim (0.5.0).

    `LowLevelZeroOptimizer.state_dict_shard()` and `.state_dict()` deep-copy each parameter's
    optimizer state and then overwrite every tensor in the copy (except "step") with a freshly
    gathered full tensor, so the first copy of the tensors is pure waste: with AdamW, twice the
    model's size in extra memory and about 40% of the optimizer save time. This copies everything
    but those tensors. (The module's third use, load_state_dict's copy of a whole state dict,
    holds no tensors at its top level and is copied exactly as before.)
    """

    @staticmethod
    def deepcopy(value, memo=None):
        if not isinstance(value, dict):
            return copy.deepcopy(value, memo)
        return {
            k: v if isinstance(v, torch.Tensor) and k != "step" else copy.deepcopy(v, memo) for k, v in value.items()
        }


class _TorchLoadingWeightsOnly(types.ModuleType):
    """Stands in for `torch` inside ColossalAI's checkpoint modules: everything is torch's own, except
    `load`, which never unpickles code (tensors, numbers, strings and containers only), and names the
    file it could not read in one line (a truncated zip, a refused pickle), not as a traceback from
    deep inside ColossalAI's loader."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return torch.load(f, *args, **kwargs)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as e:  # what torch.load raises on a damaged file
            detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else "no detail"
            raise UsageError(
                f"could not load {f} ({type(e).__name__}: {detail}); it is damaged or not a checkpoint file"
            ) from e


# the colossalai 0.5.0 modules whose checkpoint loads call torch.load (grep "torch.load(" in its source)
_MODULES_THAT_LOAD = [
    "colossalai.checkpoint_io.utils",
    "colossalai.checkpoint_io.checkpoint_io_base",
    "colossalai.checkpoint_io.hybrid_parallel_checkpoint_io",
    "colossalai.checkpoint_io.moe_checkpoint",
    "colossalai.booster.plugin.gemini_plugin",
    "colossalai.booster.plugin.torch_fsdp_plugin",
]


def _patch_checkpoint_loads_weights_only() -> None:
    safe = _TorchLoadingWeightsOnly("torch")
    for name in _MODULES_THAT_LOAD:
        importlib.import_module(name).torch = safe
    _applied.append("ColossalAI's checkpoint loads unpickle no code (torch.load weights_only=True)")


class _DistWithTimeout(types.ModuleType):
    """Stands in for `torch.distributed` in colossalai.initialize and its process-group mesh: every
    group is made with our timeout; a 1-process world rendezvous through a file."""

    def __init__(self, timeout: datetime.timedelta, store_file: str):
        super().__init__("torch.distributed")
        self._timeout, self._store_file = timeout, store_file

    def __getattr__(self, name: str):
        return getattr(dist, name)

    def init_process_group(self, *args, **kwargs):
        kwargs.setdefault("timeout", self._timeout)
        if kwargs.get("world_size") == 1 and kwargs.get("init_method", "").startswith("tcp://127.0.0.1"):
            kwargs["init_method"] = f"file://{self._store_file}"  # nothing listens on a port at all
        return dist.init_process_group(*args, **kwargs)

    def new_group(self, *args, **kwargs):
        kwargs.setdefault("timeout", self._timeout)
        return dist.new_group(*args, **kwargs)


def set_dist_timeout(seconds: float, store_file: str) -> None:
    """Apply --dist_timeout to the process groups ColossalAI makes (call before launching)."""
    import colossalai.cluster.process_group_mesh as mesh
    import colossalai.initialize as initialize

    proxy = _DistWithTimeout(datetime.timedelta(seconds=seconds), store_file)
    initialize.dist = mesh.dist = proxy


def _patch_zero_optimizer_checkpoint_copies() -> None:
    from colossalai.zero.low_level import low_level_optim

    low_level_optim.copy = _CopyWithoutStateTensors
    _applied.append("ZeRO optimizer state is not deep-copied before it is gathered for a checkpoint")


class _NoOpEvent:
    """Stands in for a CUDA event; CPU work is synchronous, so there is nothing to wait on."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


def _patch_accelerator_sync_and_memory(accel) -> None:
    # checkpoint_io/utils.py calls get_accelerator().synchronize() when loading an optimizer, and
    # the plugins query memory statistics; CpuAccelerator raises "not supported" for all of them.
    accel.synchronize = lambda self, device=None: None
    accel.empty_cache = lambda self: None
    accel.current_device = lambda self: 0
    accel.device_count = lambda self: 1
    accel.memory_allocated = lambda self, device=None: 0
    accel.max_memory_allocated = lambda self, device=None: 0
    accel.reset_peak_memory_stats = lambda self, device=None: None
    accel.reset_max_memory_allocated = lambda self, device=None: None
    _applied.append("accelerator sync/memory stats are no-ops")


def _patch_accelerator_streams(accel) -> None:
    # zero/low_level/bookkeeping/bucket_store.py always creates a side stream, and
    # overlap_communication uses current_stream()/stream(); CPU work runs in order anyway.
    accel.Stream = lambda self, device=None, priority=0, **kw: torch.cpu.Stream()
    accel.current_stream = lambda self, device=None: torch.cpu.current_stream()
    accel.default_stream = lambda self, device=None: torch.cpu.current_stream()
    accel.stream = lambda self, stream_: contextlib.nullcontext()
    accel.set_stream = lambda self, stream_: None
    accel.Event = lambda self, *a, **k: _NoOpEvent()
    _applied.append("accelerator streams/events are CPU stubs")


def _patch_accelerator_rng(accel) -> None:
    # shardformer's Randomizer (tensor parallel) calls get_rng_state(), which passes a device to
    # torch.get_rng_state() (TypeError, a colossalai bug); manual_seed and friends raise.
    accel.get_rng_state = lambda self, device=None: torch.get_rng_state()
    accel.set_rng_state = lambda self, state, device=None: torch.set_rng_state(state)
    accel.get_rng_state_all = lambda self: [torch.get_rng_state()]
    accel.set_rng_state_all = lambda self, states: torch.set_rng_state(states[0])
    accel.manual_seed = lambda self, seed: torch.manual_seed(seed)
    accel.manual_seed_all = lambda self, seed: torch.manual_seed(seed)
    accel.seed = lambda self: torch.seed()
    accel.seed_all = lambda self: torch.seed()
    accel.initial_seed = lambda self: torch.initial_seed()
    _applied.append("accelerator RNG uses torch's CPU generator")


def _patch_pipeline_hccl() -> None:
    # pipeline/p2p.py asks torch.distributed.is_hccl_available() (a torch_npu API) when torch was
    # built without NCCL, and reads c10d.Backend.HCCL on NCCL builds with a gloo group.
    if not hasattr(dist, "is_hccl_available"):
        dist.is_hccl_available = lambda: False
        _applied.append("torch.distributed.is_hccl_available stub")
    if not hasattr(dist.Backend, "HCCL"):
        dist.Backend.HCCL = "hccl"
        _applied.append("torch.distributed.Backend.HCCL constant")


def _patch_record_stream() -> None:
    # ZeRO's overlap_communication calls tensor.record_stream(stream), which rejects CPU tensors.
    original = torch.Tensor.record_stream

    def record_stream(self, stream):
        if self.device.type == "cpu":
            return None
        return original(self, stream)

    torch.Tensor.record_stream = record_stream
    _applied.append("Tensor.record_stream is a no-op on CPU tensors")


def _patch_zero_sanity_check() -> None:
    # zero/low_level/low_level_optim.py asserts the accelerator is "cuda" or "npu"; keep the dtype check.
    from colossalai.zero.low_level import low_level_optim

    def _sanity_checks(self):
        for group in self.optim.param_groups:
            for p in group["params"]:
                if not getattr(p, "skip_zero_check", False):
                    assert p.dtype == self._dtype, f"ZeRO expected parameters of {self._dtype}, got {p.dtype}"

    low_level_optim.LowLevelZeroOptimizer._sanity_checks = _sanity_checks
    _applied.append("LowLevelZeroOptimizer device assert removed")


def _patch_cpu_adam_build() -> None:
    # HybridAdam/CPUAdam need a compiled CPU Adam. The x86 variant is declared a CUDA extension
    # (cuda_fp16.h, cuBLAS); the ARM variant is plain C++ with a scalar fallback, so allow it on x86.
    from colossalai.kernel.extensions.pybind.cpu_adam.cpu_adam_arm import CpuAdamArmExtension

    CpuAdamArmExtension.is_available = lambda self: True
    CpuAdamArmExtension.assert_compatible = lambda self: None
    _applied.append("CPU Adam extension builds from its portable C++ source")


def route_pipeline_dp_grad_sync(model, sync) -> None:
    """With --pp > 1 and no ZeRO, HybridParallelPlugin.execute_pipeline (0.5.0) syncs data-parallel
    gradients by calling `model.sync_dp_grads()`, which all-reduces each parameter's gradient and
    divides it by the data-parallel size: there is no DDP and no hook. Gradient compression
    replaces that method on this boosted model object only (not the class) with `sync`, which must
    leave each gradient the mean over the data-parallel group."""
    import colossalai
    from colossalai.booster.plugin.hybrid_parallel_plugin import HybridParallelModule

    if colossalai.__version__ != PATCHED_FOR_VERSION or not callable(getattr(model, "sync_dp_grads", None)):
        raise UsageError(
            f"--grad_compression with --pp > 1 patches ColossalAI {PATCHED_FOR_VERSION}'s pipeline gradient sync, which "
            f"this ColossalAI ({colossalai.__version__}) does not have; use --pp 1 or drop --grad_compression"
        )
    assert isinstance(model, HybridParallelModule), type(model)
    model.sync_dp_grads = sync


# the colossalai 0.5.0 modules that write state-dict files through checkpoint_io.utils.save_state_dict
_MODULES_THAT_WRITE = [
    "colossalai.checkpoint_io.utils",
    "colossalai.checkpoint_io.general_checkpoint_io",
    "colossalai.checkpoint_io.hybrid_parallel_checkpoint_io",
    "colossalai.booster.plugin.low_level_zero_plugin",
]


def _patch_safetensors_writes() -> None:
    """ColossalAI's `save_state_dict` writes a safetensors shard with `safetensors.torch.save_file`,
    which first copies every tensor into a bytes object (512 MB: 1.26 s); files.write_safetensors
    writes the same file from the tensors' memory (0.41 s). Other files are written as before."""
    from colossalai.checkpoint_io import utils

    original = utils.save_state_dict

    def save_state_dict(state_dict: dict, checkpoint_file_path: str, use_safetensors: bool) -> None:
        if not use_safetensors:
            return original(state_dict, checkpoint_file_path, use_safetensors)
        write_safetensors({k: v.detach().cpu() for k, v in state_dict.items()}, checkpoint_file_path)

    for name in _MODULES_THAT_WRITE:
        importlib.import_module(name).save_state_dict = save_state_dict
    _applied.append("ColossalAI's safetensors shards are written straight from the tensors' memory")


@contextlib.contextmanager
def deferred_state_dict_writes(deferred: list, to_host):
    """While active, each state-dict file (a model or optimizer shard) that ColossalAI would write
    is appended to `deferred` as a call that writes it later (the background writer calls it), with
    every tensor passed through `to_host` now; the call is the `save_state_dict` in place before
    (safetensors shards: `_patch_safetensors_writes`'). Everything collective (ZeRO's gathers,
    pipeline barriers) and the small files (indexes, config, param groups) still happen at once."""
    from colossalai.checkpoint_io import utils

    write = utils.save_state_dict

    def defer(state_dict: dict, checkpoint_file_path: str, use_safetensors: bool) -> None:
        on_host = utils.tree_map(lambda x: to_host(x) if torch.is_tensor(x) else x, state_dict)
        deferred.append(functools.partial(write, on_host, checkpoint_file_path, use_safetensors))

    modules = [importlib.import_module(name) for name in _MODULES_THAT_WRITE]
    for module in modules:
        module.save_state_dict = defer
    try:
        yield deferred
    finally:
        for module in modules:
            module.save_state_dict = write


def compress_pipeline_backward(scheduler, codec, epilogue_only: bool) -> None:
    """--compress_backprop: wrap the four 1F1B methods of this scheduler object (not the class) that
    move activation gradients, OneForwardOneBackwardSchedule of colossalai 0.5.0: the sends
    (`send_backward`, `send_backward_recv_forward`) hand ColossalAI's p2p `codec.encode(grad)` (a
    dict of the factors) instead of the gradient; the receives (`recv_backward`,
    `send_forward_recv_backward`) return `codec.decode(received)`. Forward activations pass as before.

    `epilogue_only`: only `send_backward` compresses. 1F1B calls it for the last steady-state send and
    every cooldown send, the sends after which a stage runs no more forwards (Optimus-CC's `flush=True`
    sends): pp - s of stage s's sends per step. Messages then change shape within a step, so the
    schedule's cache of gradient metadata (shapes sent once, then assumed) is turned off for them:
    every gradient message carries its metadata, as the schedule's first one does."""
    import colossalai
    from colossalai.pipeline.schedule import OneForwardOneBackwardSchedule

    if colossalai.__version__ != PATCHED_FOR_VERSION or type(scheduler) is not OneForwardOneBackwardSchedule:
        raise UsageError(
            f"--compress_backprop wraps ColossalAI {PATCHED_FOR_VERSION}'s 1F1B pipeline schedule, not this one "
            f"(ColossalAI {colossalai.__version__}, {type(scheduler).__name__}); drop --compress_backprop"
        )
    send_backward, send_backward_recv_forward = scheduler.send_backward, scheduler.send_backward_recv_forward
    recv_backward, send_forward_recv_backward = scheduler.recv_backward, scheduler.send_forward_recv_backward

    def uncache_gradient_metadata() -> None:
        if epilogue_only:
            scheduler.send_grad_metadata, scheduler.grad_metadata_recv = True, None

    def send_backward_compressed(input_tensor_grad, prev_rank=None):
        uncache_gradient_metadata()
        return send_backward(codec.encode(input_tensor_grad), prev_rank)

    def send_backward_recv_forward_compressed(input_tensor_grad, send_first=None):
        uncache_gradient_metadata()
        return send_backward_recv_forward(codec.encode(input_tensor_grad, compress=not epilogue_only), send_first)

    def recv_backward_decompressed(next_rank=None):
        uncache_gradient_metadata()
        return codec.decode(recv_backward(next_rank))

    def send_forward_recv_backward_decompressed(output_tensor, send_first=None):
        uncache_gradient_metadata()
        return codec.decode(send_forward_recv_backward(output_tensor, send_first))

    scheduler.send_backward = send_backward_compressed
    scheduler.send_backward_recv_forward = send_backward_recv_forward_compressed
    scheduler.recv_backward = recv_backward_decompressed
    scheduler.send_forward_recv_backward = send_forward_recv_backward_decompressed


class _Needs8BitOptimizers(torch.optim.Optimizer):
    """Stands in for bitsandbytes' `Optimizer2State`, the base class of GaLore's 8-bit optimizers."""

    def __init__(self, *args, **kwargs):
        self.param_groups = []  # what GaLoreAdamW8bit.__del__ reads of a half-built optimizer
        raise UsageError(
            "GaLore's 8-bit optimizers need bitsandbytes, which is not installed: pip install bitsandbytes"
        )


def _bitsandbytes_stand_in() -> dict[str, types.ModuleType]:
    """The three modules `from bitsandbytes.optim.optimizer import Optimizer2State` needs."""
    modules = {
        name: types.ModuleType(name) for name in ("bitsandbytes", "bitsandbytes.optim", "bitsandbytes.optim.optimizer")
    }
    modules["bitsandbytes"].optim = modules["bitsandbytes.optim"]
    modules["bitsandbytes.optim"].optimizer = modules["bitsandbytes.optim.optimizer"]
    modules["bitsandbytes.optim.optimizer"].Optimizer2State = _Needs8BitOptimizers
    return modules


def _import_optimizers_without_bitsandbytes() -> None:
    """`colossalai.nn.optimizer` (where HybridAdam lives; every booster plugin imports it) imports
    GaLore's 8-bit optimizers, and with them bitsandbytes (a 43 MB CUDA library), for one base class.
    The recipe offers no GaLore or 8-bit optimizer, so the GPU wheelhouse leaves bitsandbytes out.
    Where it is not installed, stand-ins serve that one import and are removed again at once, so
    transformers and peft still see no bitsandbytes; an 8-bit GaLore optimizer refuses in one line."""
    if importlib.util.find_spec("bitsandbytes") is not None or "colossalai.nn.optimizer" in sys.modules:
        return
    importlib.import_module("transformers")  # it records at import whether bitsandbytes is there: not the stand-in
    stand_in = _bitsandbytes_stand_in()
    sys.modules.update(stand_in)
    try:
        importlib.import_module("colossalai.nn.optimizer")
    finally:
        for name in stand_in:
            del sys.modules[name]
    _applied.append("bitsandbytes is not installed: ColossalAI's optimizers imported without it (no 8-bit GaLore)")


def apply_patches(cpu_only: bool) -> list[str]:
    """Apply our ColossalAI patches (the CPU ones only on a CPU-only machine). Idempotent; returns
    what was applied."""
    if _applied:
        return list(_applied)
    import colossalai

    if colossalai.__version__ != PATCHED_FOR_VERSION:
        raise UsageError(
            f"llama_recipe's ColossalAI patches were written for colossalai=={PATCHED_FOR_VERSION}, "
            f"but {colossalai.__version__} is installed; install the pinned version "
            "(pip install --no-deps -r requirements-colossalai.txt)"
        )
    _import_optimizers_without_bitsandbytes()
    _patch_zero_optimizer_checkpoint_copies()
    _patch_checkpoint_loads_weights_only()
    _patch_safetensors_writes()
    if cpu_only:
        from colossalai.accelerator.cpu_accelerator import CpuAccelerator

        _patch_accelerator_sync_and_memory(CpuAccelerator)
        _patch_accelerator_streams(CpuAccelerator)
        _patch_accelerator_rng(CpuAccelerator)
        _patch_pipeline_hccl()
        _patch_record_stream()
        _patch_zero_sanity_check()
        _patch_cpu_adam_build()
    return list(_applied)
