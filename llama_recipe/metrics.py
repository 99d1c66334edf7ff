"""What a run reports: the progress bar and the scalars, to TensorBoard and to Weights & Biases
(rank 0 only, one logging path for both), memory, FLOPs and MFU, and `RunMetrics`, which owns the
per-step records, the logging cadence, evaluations, the summary and the final line."""

from __future__ import annotations

import importlib.util
import math
import os
import resource
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint_io import read_running_states, recorded_flags
from .collage import edq_metrics
from .compression import Communication
from .config import LoggingConfig, TrainConfig
from .distributed import is_main_process, print_main, sum_across_ranks, world_size
from .errors import UsageError
from .parallel import Parallelism, unwrap_optimizer


def reset_peak_memory() -> None:
    """Measure the peak from here on, so that it is training's own, not loading's (loading a
    checkpoint briefly holds the weights twice)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets this process's peak RSS (VmHWM)
    except OSError:
        pass  # not Linux: the peak then covers the whole process


def peak_memory_mb() -> float:
    """Peak device memory of this process (since `reset_peak_memory`): CUDA allocations on GPU,
    resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# Where gradients live outside a parameter's .grad: ColossalAI 0.5.0's low-level ZeRO optimizer
# (zero2, zero2_cpu, hybrid_parallel's --zero_stage) keeps them in its bookkeeping stores
# (colossalai/zero/low_level/bookkeeping). Neither torch nor ColossalAI says what a tensor holds
# (torch.cuda.memory's snapshots do, on CUDA only), so the walker names these stores and attributes.
# Gemini, as plugins.py builds it (master weights, no gradient accumulation), writes gradients into
# the 16-bit chunks that hold the weights: no store of their own to find.
GRADIENT_ATTRIBUTES = {  # qualified type name -> its attributes that hold only gradients
    "colossalai.zero.low_level.bookkeeping.gradient_store.GradientStore": {"_grads_of_params"},
    "colossalai.zero.low_level.bookkeeping.bucket_store.BucketStore": {"_grad_in_bucket"},  # waiting to be reduced
}
WALKED_MODULES = ("colossalai", "torch.optim", "llama_recipe")  # whose objects' attributes the walker follows


def reachable_tensors(*roots: tuple[object, str]) -> Iterator[tuple[torch.Tensor, str]]:
    """Every tensor reachable from the (object, role) roots (models, optimizers and the plugins'
    optimizer wrappers with their gradient stores), each storage once, with its role: the root's,
    or "gradients" for a .grad and for what ZeRO's stores hold (GRADIENT_ATTRIBUTES)."""
    seen_objects, seen_storages = set(), set()

    def visit(obj, role: str) -> Iterator[tuple[torch.Tensor, str]]:
        if id(obj) in seen_objects:
            return
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            for t, r in ((obj, role), (obj.grad, "gradients")):
                if t is not None and t.untyped_storage().data_ptr() not in seen_storages:
                    seen_storages.add(t.untyped_storage().data_ptr())
                    yield t, r
        elif isinstance(obj, torch.nn.Module):
            for t in [*obj.parameters(), *obj.buffers()]:
                yield from visit(t, role)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from visit(k, role)
                yield from visit(v, role)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                yield from visit(v, role)
        elif type(obj).__module__.startswith(WALKED_MODULES) and hasattr(obj, "__dict__"):
            gradients = GRADIENT_ATTRIBUTES.get(f"{type(obj).__module__}.{type(obj).__qualname__}", set())
            for name, v in vars(obj).items():
                yield from visit(v, "gradients" if name in gradients else role)

    for root, role in roots:
        yield from visit(root, role)


def tensor_bytes_by_dtype(*roots) -> dict[str, int]:
    """Bytes of every tensor reachable from `roots`, each storage counted once, by dtype. This is
    what the weights, gradients and optimizer states really occupy, whatever the plugin keeps where."""
    totals = {}
    for t, _ in reachable_tensors(*((root, "") for root in roots)):
        key = str(t.dtype).removeprefix("torch.")
        totals[key] = totals.get(key, 0) + t.untyped_storage().nbytes()
    return totals


# ---------------------------------------------------------------------------------------------
# Weights & Biases (--wandb_project): an optional package, started on rank 0 only

WANDB_MODES = ["online", "offline", "disabled"]
WANDB_MISSING = "W&B logging needs the wandb package: pip install wandb"
# Where each checkpoint's running_states.json keeps the W&B run's id: a run resumed from it (-f,
# --auto_resume) continues that W&B run, so its curves go on instead of starting a new run.
WANDB_RUN_ID = "wandb_run_id"


def wandb_problems(log: LoggingConfig) -> list[str]:
    """What W&B would refuse, found before the run starts: a --wandb_* flag without a project, the
    package missing, a project name W&B does not take (its own check), an unknown $WANDB_MODE."""
    if not log.wandb_project:
        given = [label for label, value in (("--wandb_run", log.wandb_run), ("--wandb_mode", log.wandb_mode)) if value]
        return [f"{given[0]} applies to W&B logging: pass --wandb_project too"] if given else []
    if importlib.util.find_spec("wandb") is None:  # (None also where sys.modules["wandb"] is None)
        return [WANDB_MISSING]
    import wandb

    try:
        wandb.Settings(project=log.wandb_project)
    except wandb.errors.UsageError as e:
        return [f"--wandb_project: {e}"]
    env_mode = os.environ.get("WANDB_MODE")
    if log.wandb_mode is None and env_mode is not None:
        try:
            wandb.Settings(mode=env_mode)
        except ValueError:  # pydantic's ValidationError
            return [
                f"WANDB_MODE={env_mode} is not a W&B mode: set it to one of {', '.join(WANDB_MODES)}, or pass --wandb_mode"
            ]
    return []


def wandb_location(run) -> str | None:
    """Where a W&B run can be seen: its page online, else its directory (offline: `wandb sync` it)."""
    if run is None:
        return None
    return run.url or f"{run.dir.removesuffix('/files')} (offline: upload with `wandb sync` on it)"


def start_wandb(cfg: TrainConfig, script: str):
    """Rank 0's W&B run (None without --wandb_project): the run's flags (recorded_flags, as run.yaml)
    as its config, its files in <-o>/wandb (else beside -t, else ./wandb), and on a resume the W&B run
    the checkpoint recorded (WANDB_RUN_ID). --wandb_mode unset: $WANDB_MODE, else online. Each scalar is logged with its training step as `step`, W&B's x axis for
    every chart: a step logged again (a resume from an earlier checkpoint, an --on_spike rollback)
    is kept, where W&B's own step counter would drop it for not increasing."""
    log = cfg.logging
    mode = log.wandb_mode or os.environ.get("WANDB_MODE")  # (read now: W&B reads it once per process)
    if not log.wandb_project or mode == "disabled":  # no W&B run at all: no id for the checkpoints either
        return None
    import wandb

    load = cfg.checkpoint.load
    resumed_id = read_running_states(load).get(WANDB_RUN_ID) if load else None
    directory = Path(cfg.checkpoint.save_dir or log.tensorboard_dir or ".")
    directory.mkdir(parents=True, exist_ok=True)
    try:
        run = wandb.init(
            project=log.wandb_project,
            name=log.wandb_run,
            mode=mode,
            dir=str(directory),
            config=recorded_flags(cfg, script),
            id=resumed_id,
            resume="allow" if resumed_id else None,
            # the output stays where the user reads it; capturing it would also record every redraw of the bar
            settings=wandb.Settings(console="off"),
        )
    except wandb.errors.Error as e:  # e.g. online without an API key where no one can be asked for it
        raise UsageError(f"W&B could not start: {e} (or pass --wandb_mode offline, and `wandb sync` later)") from e
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


class MetricsLogger:
    """Rank 0's outputs: the progress bar, and every scalar through `log_scalars` to both TensorBoard
    (-t) and W&B (`wandb_run`, from start_wandb), so that the two always hold the same scalars."""

    def __init__(
        self, enabled: bool, tensorboard_dir: str | None, total_steps: int, start_step: int, desc: str, wandb_run=None
    ):
        self.enabled = enabled
        self.wandb_run = wandb_run  # made before the bar: W&B's start-up lines come before it
        self.bar = tqdm(
            total=total_steps, initial=start_step, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True
        )
        self.tensorboard_dir = tensorboard_dir
        self.history: list[tuple[int, float]] = []
        self._writer = None  # made at the first write, so a run refused before it leaves no event file

    @property
    def writer(self):
        """The TensorBoard writer (None without -t), created when first used."""
        if self._writer is None and self.enabled and self.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.tensorboard_dir)
        return self._writer

    def log_step(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float | None,
        tokens_per_s: float,
        mfu: dict[str, float] | None,
        write: bool,
    ) -> None:
        """`mfu`: {"mfu": ..., "mfu_full_attention": ...} (MFU_FORMULA), None where the peak is unknown."""
        if not self.enabled:
            return
        self.history.append((step, loss))
        self.bar.update(1)
        if not write:
            return
        memory = peak_memory_mb()
        postfix = dict(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", mem_mb=f"{memory:,.0f}")
        for name, value in (mfu or {}).items():
            postfix[name] = f"{100 * value:.1f}%"
        self.bar.set_postfix(postfix)
        scalars = {"loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "peak_memory_mb": memory}
        if grad_norm is not None:
            scalars["grad_norm"] = grad_norm
        scalars |= mfu or {}
        self.log_scalars(step, {f"train/{name}": value for name, value in scalars.items()})

    def log_eval(self, step: int, loss: float, perplexity: float) -> None:
        self.log_scalars(step, {"eval/loss": loss, "eval/perplexity": perplexity})

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """The one path every scalar takes (rank 0): TensorBoard's event file and the W&B run."""
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log({**scalars, "step": step})  # `step`: the x axis (start_wandb)

    def print(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message)

    def close(self, failed: bool = False) -> str | None:
        """Close the bar, the W&B run (waiting for its files) and the writer; draw this run's loss curve
        next to the TensorBoard logs."""
        self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None
        if failed or self.writer is None:
            return None
        self.writer.close()
        return plot_loss_curve(self.history, f"{self.tensorboard_dir}/loss.png") if len(self.history) > 1 else None


def read_scalars(tensorboard_dir: str | Path, tag: str = "train/loss") -> dict[int, float]:
    """{step: value} of one scalar, read back from a run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard_dir))
    acc.Reload()
    return {event.step: event.value for event in acc.Scalars(tag)}


def earlier_losses(tensorboard_dir: str | None, up_to_step: int) -> list[tuple[int, float]]:
    """The logged losses of steps 1..up_to_step in a run's TensorBoard directory, so that a resumed
    run's loss.png shows the whole run. Later steps there are left out: the resumed run trains them
    again. (Of a step logged twice, by a run resumed from an earlier step, the later event counts.)"""
    if not tensorboard_dir or up_to_step <= 0 or not Path(tensorboard_dir).is_dir():
        return []
    try:
        losses = read_scalars(tensorboard_dir)
    except KeyError:  # no loss logged there (the run stopped before its first step)
        return []
    return sorted((step, loss) for step, loss in losses.items() if step <= up_to_step)


def resumed_tensorboard_dir(cfg: TrainConfig) -> str | None:
    """Where the run that saved -f's checkpoint logged (its recorded -t), else this run's directory."""
    recorded = read_running_states(cfg.checkpoint.load).get("config", {})
    return recorded.get("tensorboard_dir", cfg.logging.tensorboard_dir)


def plot_loss_curve(history: list[tuple[int, float]], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    series = sorted(dict(history).items())  # a step trained again (a rollback) once, as last trained
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s for s, _ in series], [loss for _, loss in series], marker="." if len(series) < 60 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    # what is drawn, readable without looking at pixels (PIL: Image.open(path).text["Description"])
    description = f"training loss at {len(series)} steps, {series[0][0]} to {series[-1][0]}"
    fig.savefig(path, dpi=100, metadata={"Description": description})
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# FLOPs and MFU

# Dense bf16 TFLOP/s (no sparsity) from the vendors' data sheets, keyed by the exact name that
# torch.cuda.get_device_name() gives, with the part it names. Exact names, not substrings: "H100" in
# a name would give an H100 PCIe (756) or NVL (835) the SXM part's 989.4, and a MIG slice ("NVIDIA
# H100 80GB HBM3 MIG 3g.40gb") its whole GPU's peak. A device not listed reports no MFU.
GPU_PEAK_TFLOPS: dict[str, tuple[str, float]] = {
    "NVIDIA H100 80GB HBM3": ("H100 SXM", 989.4),
    "NVIDIA H100 PCIe": ("H100 PCIe", 756.0),
    "NVIDIA H100 NVL": ("H100 NVL", 835.0),
    "NVIDIA H800": ("H800 SXM", 989.4),  # the H100 SXM with less NVLink bandwidth: the same compute
    "NVIDIA H200": ("H200 SXM", 989.4),
    "NVIDIA A100-SXM4-40GB": ("A100 40GB SXM", 312.0),
    "NVIDIA A100-SXM4-80GB": ("A100 80GB SXM", 312.0),
    "NVIDIA A100-PCIE-40GB": ("A100 40GB PCIe", 312.0),
    "NVIDIA A100 80GB PCIe": ("A100 80GB PCIe", 312.0),
    "NVIDIA A800-SXM4-80GB": ("A800 80GB SXM", 312.0),  # the A100 with less NVLink bandwidth
    "NVIDIA A800 80GB PCIe": ("A800 80GB PCIe", 312.0),
    "NVIDIA L40S": ("L40S", 362.05),
    "NVIDIA B200": ("B200", 2250.0),
    "AMD Instinct MI300X": ("MI300X", 1307.4),
    "AMD Instinct MI300X VF": ("MI300X (virtual function)", 1307.4),
}
# Two conventions for attention's FLOPs. Ours halves them for the causal mask (each token attends to
# the S/2 before it on average); PaLM (appendix B), nanoGPT and torchtitan count the whole S x S
# product, 12*L*S*H per token, so for the same run ours reads lower than theirs: 7% for llama2-7b at
# 4,096 tokens, 14% for `small` at 2,048. Both are reported, so a figure can be compared with theirs.
MFU_FORMULA = (
    "mfu: 6*N_matmul + 6*L*S*H FLOPs per token (attention's 12*L*S*H halved for the causal mask); "
    "mfu_full_attention: 6*N_matmul + 12*L*S*H, as PaLM, nanoGPT and torchtitan count; recompute not counted"
)
# A bf16 GEMM reaches about 80% of the data sheet at best (ml-engineering's Maximum Achievable Matmul
# FLOPS table: H100 SXM 80.1%, A100 SXM 85.9%, A100 PCIe 82.2%, GH200 83.0%), so the start-up probe is
# held against that share of the table's figure; a gap over PROBE_TOLERANCE says the table does not
# describe this device (another part, a power cap, throttling, a shared GPU).
GEMM_REACHABLE_FRACTION = 0.80
PROBE_TOLERANCE = 0.15


def training_flops_per_token(config, seq_len: int, causal: bool = True) -> float:
    """Model FLOPs per trained token: forward + backward = 3x the forward's 2 FLOPs per multiply-add.

    N_matmul counts every weight that takes part in a matrix product (attention and SwiGLU projections,
    which covers GQA through the k/v sizes, and the LM head), not the input embedding lookup or norms.
    Attention scores and values add 2*2*S*H per token per layer forward, 12*L*S*H per trained token
    (`causal=False`, the convention of PaLM, nanoGPT and torchtitan); causal masking halves that (each
    token attends to the S/2 before it on average): 6*L*S*H, the default.
    """
    h, layers, v = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size
    n_matmul = layers * per_layer + h * v
    attention = 12 * layers * seq_len * h
    return 6 * n_matmul + (attention // 2 if causal else attention)


def model_flops_utilization(
    tokens_per_s: float, flops_per_token: float, devices: int, peak_flops: float | None
) -> float | None:
    """The fraction of the devices' peak that the model's own FLOPs use (recompute not counted); None
    where the peak is unknown."""
    if peak_flops is None:
        return None
    return tokens_per_s * flops_per_token / devices / peak_flops


def gemm_flops_per_s(n: int, dtype: torch.dtype, device: torch.device, repeats: int = 4) -> float:
    """FLOP/s of the fastest of `repeats` n x n matrix products (after one warm-up)."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)

    def product_seconds() -> float:
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the product runs asynchronously: wait for it
        return time.perf_counter() - started

    product_seconds()  # warm-up: the library picks its kernel
    return 2 * n**3 / min(product_seconds() for _ in range(repeats))


def data_sheet_peak(device_name: str) -> tuple[float | None, str]:
    """(dense bf16 FLOP/s, where it came from) of the device torch.cuda.get_device_name() names; None,
    with what to pass instead, for a device GPU_PEAK_TFLOPS does not list."""
    if device_name not in GPU_PEAK_TFLOPS:
        return None, f"no data-sheet peak for {device_name!r}: pass --peak_tflops (its dense bf16 TFLOP/s) for an MFU"
    part, tflops = GPU_PEAK_TFLOPS[device_name]
    return tflops * 1e12, f"{part} dense bf16 data sheet, for {device_name!r}"


def peak_flops_per_device(peak_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s, where the number came from): --peak_tflops, the GPU's data sheet (None for a
    device not in GPU_PEAK_TFLOPS), or on CPU a measured fp32 GEMM."""
    if peak_tflops:
        return peak_tflops * 1e12, "--peak_tflops"
    if torch.cuda.is_available():
        return data_sheet_peak(torch.cuda.get_device_name())
    # n=1024: within a few % of 2048's rate on these CPUs, at an eighth of the cost (it runs at every start)
    flops = gemm_flops_per_s(1024, torch.float32, torch.device("cpu"))
    return flops, f"measured fp32 GEMM on {torch.get_num_threads()} CPU thread(s)"


def probe_against_data_sheet(peak_flops: float | None) -> str | None:
    """On a GPU, a few timed bf16 8192 x 8192 products (about 1 TFLOP each, milliseconds in all): what
    they reach, and a warning where that is more than PROBE_TOLERANCE away from the share of the
    data-sheet peak a GEMM reaches (GEMM_REACHABLE_FRACTION). None on CPU, whose peak is a probe."""
    if not torch.cuda.is_available():
        return None
    measured = gemm_flops_per_s(8192, torch.bfloat16, torch.device("cuda", torch.cuda.current_device()))
    torch.cuda.empty_cache()  # the probe's 384 MiB go back to the device, not to the allocator's cache
    return describe_probe(measured, peak_flops)


def describe_probe(measured: float, peak_flops: float | None) -> str:
    """What a GEMM probe that reached `measured` FLOP/s says of `peak_flops`: a warning where it is
    more than PROBE_TOLERANCE away from the GEMM_REACHABLE_FRACTION of it that a GEMM reaches."""
    if peak_flops is None:
        return f"a bf16 GEMM probe reached {measured / 1e12:,.1f} TFLOP/s on this device"
    expected = GEMM_REACHABLE_FRACTION * peak_flops
    if abs(measured / expected - 1) <= PROBE_TOLERANCE:
        return (
            f"a bf16 GEMM probe reached {measured / 1e12:,.1f} TFLOP/s, {100 * measured / peak_flops:.0f}% of that peak"
        )
    return (
        f"warning: a bf16 GEMM probe reached {measured / 1e12:,.1f} TFLOP/s, {100 * measured / peak_flops:.0f}% "
        f"of the {peak_flops / 1e12:,.1f} TFLOP/s peak MFU uses, where a GEMM reaches about "
        f"{100 * GEMM_REACHABLE_FRACTION:.0f}%: this may be another part, power-capped, throttled or shared; "
        "pass --peak_tflops to set the peak"
    )


# ---------------------------------------------------------------------------------------------
# A run's records


@dataclass
class StepResult:
    """What one optimizer step did, the same on every rank (loss and tokens are means over replicas)."""

    loss: float
    tokens: int  # trained on by all replicas together
    grad_norm: float | None  # before clipping, where the plugin reports it
    lr: float
    seconds: float
    parts: dict[str, float] = field(default_factory=dict)  # data, forward_backward, optimizer, other
    skipped_update: bool = False  # fp16 overflow: the loss scaler skipped the update and lowered the scale
    slice_tokens: dict[str, int] | None = None  # --data_mix: tokens drawn from each slice so far
    bad: bool = False  # a non-finite loss or gradient norm: the update was skipped
    loss_z: float | None = None  # the loss's z-score against the recent good losses (None early on)
    spike_skipped: bool = False  # a loss spike whose update --on_spike skipped
    communication: Communication | None = None  # --grad_compression: what this rank's gradient sync sent


def _communication_scalars(comm: Communication) -> dict[str, float]:
    """comm/*: the DP sync's counters (this rank's; every rank of a stage sends the same) and the
    pipeline's backward sends (summed over this replica's stages), each counted where it was sent."""
    scalars = {}
    if comm.bytes_uncompressed:  # --grad_compression
        scalars |= {
            "comm/dp_bytes_sent": comm.bytes_sent,
            "comm/dp_bytes_uncompressed": comm.bytes_uncompressed,
            "comm/compression_ratio": comm.ratio,
            "comm/compress_seconds": comm.compress_seconds,
            "comm/wait_seconds": comm.wait_seconds,
        } | ({} if comm.cosine is None else {"comm/cosine": comm.cosine})
    if comm.pipeline_backward is not None:  # --compress_backprop
        sent, exact, messages, compressed, seconds = comm.pipeline_backward
        scalars |= {
            "comm/pp_backward_bytes_sent": sent,
            "comm/pp_backward_bytes_uncompressed": exact,
            "comm/pp_backward_ratio": exact / sent if sent else 1.0,
            "comm/pp_backward_messages": messages,
            "comm/pp_backward_compressed_messages": compressed,
            "comm/pp_backward_compress_seconds": seconds,
        }
    return scalars


def _shares(tokens: dict[str, int]) -> str:
    total = sum(tokens.values()) or 1
    return ", ".join(f"{name} {100 * n / total:.1f}% ({n:,} tokens)" for name, n in tokens.items())


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def announce_mfu(peak_flops: float | None, peak_source: str) -> str:
    """The start-up line: the peak MFU divides by and where it came from, the FLOPs conventions, and
    on a GPU the GEMM probe's rate (a warning where it does not fit the peak)."""
    peak = f"MFU against {peak_flops / 1e12:,.3f} TFLOP/s per device ({peak_source})" if peak_flops else peak_source
    probe = probe_against_data_sheet(peak_flops)
    return f"{peak}; {MFU_FORMULA}" + (f"\n{probe}" if probe else "")


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50))


class RunMetrics:
    """Records every step, logs at --log_interval (progress bar, TensorBoard, MFU), reports held-out
    evaluations, and at the end returns the run's summary and prints its final lines."""

    def __init__(self, cfg: TrainConfig, par: Parallelism, run, start_step: int, checkpoint_states: dict):
        """`run`: the trainer's RunPlan (model_config, seq_len, total_steps, desc, script). The W&B run's
        id goes into `checkpoint_states` (Checkpointer.recorded), which every checkpoint records, so
        that a resume continues the same W&B run (start_wandb)."""
        model_config, seq_len, total_steps = run.model_config, run.seq_len, run.total_steps
        self.cfg, self.par, self.total_steps, self.seq_len = cfg.logging, par, total_steps, seq_len
        if start_step >= total_steps:
            print_main(f"nothing to train: the checkpoint is at step {start_step} and this run stops at {total_steps}")
        self.compiled = cfg.model.compile  # the first step then compiles: its extra time is reported apart
        self.flops_per_token = training_flops_per_token(model_config, seq_len)
        self.flops_per_token_full_attention = training_flops_per_token(model_config, seq_len, causal=False)
        self.peak_flops, self.peak_source = peak_flops_per_device(cfg.logging.peak_tflops)
        print_main(announce_mfu(self.peak_flops, self.peak_source))
        wandb_run = start_wandb(cfg, run.script) if is_main_process() else None
        if wandb_run is not None:
            checkpoint_states[WANDB_RUN_ID] = wandb_run.id
        self.logger = MetricsLogger(
            is_main_process(), cfg.logging.tensorboard_dir, total_steps, start_step, run.desc, wandb_run
        )
        if self.logger.enabled and cfg.logging.tensorboard_dir and cfg.checkpoint.load and start_step:
            # loss.png covers the whole run, not only the part since this resume
            self.logger.history = earlier_losses(resumed_tensorboard_dir(cfg), start_step)
        self.steps: list[StepResult] = []
        self.evals: list[tuple[int, float]] = []
        self.bad_steps = 0  # skipped for a non-finite loss or gradient norm, this run

    def __enter__(self) -> RunMetrics:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        self.logger.bar.close()  # however the loop ends, so an error message starts on a line of its own
        if exc_type is not None:  # the W&B run ends as failed (finish closes it after a clean end)
            self.logger.close(failed=True)

    def log_step(self, step: int, result: StepResult, optimizer, bad_steps: int = 0) -> None:
        self.steps.append(result)
        self.bad_steps = bad_steps
        write = step % self.cfg.log_interval == 0 or step == self.total_steps
        tokens_per_s = result.tokens / result.seconds
        mfu = self.mfu(tokens_per_s)
        self.logger.log_step(step, result.loss, result.lr, result.grad_norm, tokens_per_s, mfu, write)
        if write:
            z = {} if result.loss_z is None else {"train/loss_z": result.loss_z}
            self.logger.log_scalars(step, {"train/bad_steps": bad_steps, **z})
        if result.slice_tokens and write:  # this replica's mixture (every replica tracks the same weights)
            total = sum(result.slice_tokens.values()) or 1
            shares = {f"data/share_{name}": n / total for name, n in result.slice_tokens.items()}
            self.logger.log_scalars(step, {**{f"data/tokens_{k}": v for k, v in result.slice_tokens.items()}, **shares})
        if result.communication and write:
            self.logger.log_scalars(step, _communication_scalars(result.communication))
        if self.cfg.log_edq and write:  # one small all-reduce: the shards' sums
            edq = edq_metrics(sum_across_ranks(unwrap_optimizer(optimizer).metric_sums))
            self.logger.log_scalars(step, {f"optimizer/{name}": value for name, value in edq.items()})
        if result.skipped_update:
            print_main(f"fp16 gradients overflowed at step {step}: update skipped, loss scale lowered")

    def mfu(self, tokens_per_s: float) -> dict[str, float] | None:
        """Both MFUs at this rate (MFU_FORMULA); None where the peak is unknown."""
        if self.peak_flops is None:
            return None
        flops = {"mfu": self.flops_per_token, "mfu_full_attention": self.flops_per_token_full_attention}
        return {
            name: model_flops_utilization(tokens_per_s, f, world_size(), self.peak_flops) for name, f in flops.items()
        }

    def log_eval(self, step: int, loss: float) -> None:
        self.evals.append((step, loss))
        print_main(f"held-out loss {loss:.4f}, perplexity {perplexity(loss):,.2f} at step {step}")
        self.logger.log_eval(step, loss, perplexity(loss))

    @property
    def last_eval_step(self) -> int | None:
        return self.evals[-1][0] if self.evals else None

    def finish(self, step: int, checkpoint: str | None) -> dict:
        """Close the bar and the TensorBoard writer (drawing the loss curve), print the final lines,
        and return the run's summary."""
        wandb_where = wandb_location(self.logger.wandb_run)
        loss_plot = self.logger.close()
        losses = [s.loss for s in self.steps]
        # The first step includes one-off work (allocations, kernel selection); leave it out of the rate.
        timed = self.steps[1:] if len(self.steps) > 1 else self.steps
        tokens_per_s = sum(s.tokens for s in timed) / sum(s.seconds for s in timed) if timed else None
        compile_seconds = None
        if self.compiled and len(self.steps) > 1:  # the first step's time beyond a compiled step's
            compile_seconds = self.steps[0].seconds - statistics.median(s.seconds for s in timed)
            print_main(f"torch.compile: about {compile_seconds:.1f}s of the first step was compiling (not in tokens/s)")
        summary = dict(
            steps=step,
            steps_this_run=len(losses),
            first_loss=losses[0] if losses else None,
            final_loss=losses[-1] if losses else None,
            tokens_per_s=tokens_per_s,
            step_tokens=[s.tokens for s in self.steps],
            step_seconds=[s.seconds for s in self.steps],
            step_parts=[s.parts for s in self.steps],
            flops_per_token=self.flops_per_token,
            flops_per_token_full_attention=self.flops_per_token_full_attention,
            peak_flops=self.peak_flops,
            peak_source=self.peak_source,
            losses=losses,
            peak_memory_mb=peak_memory_mb(),
            world_size=world_size(),
            dp_size=self.par.dp_size,
            precision=self.par.precision,
            optimizer=self.par.optimizer,
            checkpoint=checkpoint,
            tensorboard_dir=self.cfg.tensorboard_dir,
            evals=self.evals,
            seq_len=self.seq_len,
            communication=[vars(s.communication) for s in self.steps if s.communication],
            compile_seconds=compile_seconds,
            bad_steps=self.bad_steps,
            slice_tokens=self.steps[-1].slice_tokens if self.steps else None,
        )
        if losses:
            last = [x for x in losses[-10:] if math.isfinite(x)] or losses[-1:]
            tb = self.cfg.tensorboard_dir
            mfu = self.mfu(tokens_per_s) if tokens_per_s else None
            utilization = (
                f", MFU {_percent(mfu['mfu'])} ({_percent(mfu['mfu_full_attention'])} counting attention whole)"
                if mfu
                else ""
            )
            print_main(
                f"done: {len(losses)} steps this run (step {step} of {self.total_steps}), "
                f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (mean of the last {len(last)}: {sum(last) / len(last):.4f}), "
                f"{tokens_per_s:,.0f} tokens/s, peak memory {summary['peak_memory_mb']:,.0f} MB on rank 0"
                + utilization
                + (f", {self.bad_steps} bad steps skipped" if self.bad_steps else "")
                + "\n"
                f"checkpoint: {checkpoint or 'none'}\n"  # (benchmark.py has no -o or -t to name)
                f"tensorboard: {tb or 'none'}{f'  (tensorboard --logdir {tb})' if tb else ''}"
                + (f"\nW&B: {wandb_where}" if wandb_where else "")
                + (f"\nloss curve: {loss_plot}" if loss_plot else "")
                + (f"\nmixture (rank 0): {_shares(summary['slice_tokens'])}" if summary["slice_tokens"] else "")
            )
        return summary
