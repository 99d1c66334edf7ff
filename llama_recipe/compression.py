"""PowerSGD with error feedback on data-parallel gradients (Vogels et al., NeurIPS 2019; the DP part
of Optimus-CC, Song et al., ASPLOS 2023): a communication hook of the torch DDP that ColossalAI's
TorchDDPPlugin (and HybridParallelPlugin with pp = 1 and no ZeRO) wrap the model in, or, with a
pipeline, the whole data-parallel sync of a step (`sync_step`, wired in by parallel.py).

Each gradient matrix M (n x m, a weight's gradient viewed as [shape[0], -1]) on each replica:

    M += e                      error feedback: what earlier steps' compression left out
    P  = M Q                    Q (m x r): last step's averaged Q (warm start), orthonormalised
    P  = sum over replicas (P); P = orthonormal basis of P
    Q  = mean over replicas (M^T P)
    M' = P Q^T                  the same decompressed mean gradient on every replica
    e  = M - M'                 (this replica's input minus what was applied)

so a matrix sends r (n + m) numbers instead of n m. Vectors (norms) and matrices that would not
shrink by half are all-reduced exactly, in one flat all-reduce per bucket. The first
`warmup_steps` steps all-reduce everything exactly.

Unlike torch's own `powerSGD_hook`, the state (error buffers, warm-start Q) is kept per parameter
name, not per DDP bucket index. A fresh DDP runs its first iteration in the initial bucket order and
then rebuilds its buckets in gradient-ready order; state laid out per bucket is then silently
applied to the wrong elements after a resume (see docs/compression.md). Per parameter it cannot be.

The hook counts what it sends (`Communication`): the bytes handed to each all-reduce, the bytes an
exact all-reduce of the same buckets would have sent, and the seconds spent compressing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

GRAD_COMPRESSIONS = ["none", "powersgd"]  # --grad_compression's choices
MIN_COMPRESSION_RATE = 2  # compress a matrix only if its factors are at most half its size (torch's default)


@dataclass
class CompressionSettings:
    """What --grad_compression and the --powersgd_* flags ask for."""

    rank: int
    warmup_steps: int  # steps all-reduced exactly before compression starts (>= 2)
    error_feedback: bool = True
    seed: int = 0  # the initial Q factors: the same on every replica
    log_cosine: bool = False  # also all-reduce the exact gradients (not counted as sent) to compare


@dataclass
class Communication:
    """What one rank's gradient sync sent since the last `take`."""

    bytes_sent: int = 0  # handed to all-reduce calls (a ring all-reduce moves 2 (W-1)/W of this per rank)
    bytes_uncompressed: int = 0  # what an exact all-reduce of the same buckets would have handed over
    compress_seconds: float = 0.0  # computing factors, orthogonalising, decompressing, error buffers
    wait_seconds: float = 0.0  # inside the all-reduce calls (the network, and waiting for the slowest replica)
    compressed: bool = False  # this step was compressed (past the warm-up)
    # --compress_backprop: this rank's pipeline backward sends (bytes handed to ColossalAI's p2p), and
    # [bytes sent, bytes uncompressed, messages, compressed messages, seconds] summed over this replica's pipeline
    pp_backward_bytes_sent: int = 0
    pp_backward_bytes_uncompressed: int = 0
    pipeline_backward: list[float] | None = None
    # --powersgd_log_cosine: <applied, exact>, |applied|^2, |exact|^2 over the compressed matrices
    dot: float = 0.0
    applied_sq: float = 0.0
    exact_sq: float = 0.0

    @property
    def ratio(self) -> float:
        return self.bytes_uncompressed / self.bytes_sent if self.bytes_sent else 1.0

    @property
    def cosine(self) -> float | None:
        """Cosine similarity of the applied (compressed) mean gradient to the exact mean, or None."""
        return self.dot / (self.applied_sq * self.exact_sq) ** 0.5 if self.applied_sq and self.exact_sq else None


def compressed_rank(shape: torch.Size | tuple[int, ...], rank: int) -> int:
    """The rank a gradient of `shape` is compressed with, or 0 when it is all-reduced exactly
    (vectors, and matrices whose factors would not be at most half their size)."""
    if len(shape) < 2:
        return 0
    n, m = shape[0], int(torch.Size(shape[1:]).numel())
    r = min(n, m, rank)
    return r if r * (n + m) * MIN_COMPRESSION_RATE <= n * m else 0


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of p's columns (reduced QR, in fp32: no division by a zero column norm,
    unlike Gram-Schmidt, when a gradient is zero)."""
    return torch.linalg.qr(p.float(), mode="reduced").Q.to(p.dtype)


def initial_q(m: int, r: int, seed: int, index: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The first Q of the index-th parameter: N(0, 1), the same on every replica."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn(m, r, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


class PowerSGD:
    """The DDP communication hook and its state. `names` maps each parameter (by data pointer) to
    its name, the key of its state."""

    def __init__(self, settings: CompressionSettings, names: dict[int, str], group=None):
        self.settings, self.names, self.group = settings, names, group
        self.index = {name: i for i, name in enumerate(names.values())}  # seeds each parameter's first Q
        self.step = 0  # synchronised steps seen (the last bucket of each ends one)
        self.errors: dict[str, torch.Tensor] = {}
        self.qs: dict[str, torch.Tensor] = {}
        self.counts = Communication()
        self._waited = 0.0

    # -- what the training loop and checkpoints use

    def take(self) -> Communication:
        """This step's counters, reset for the next step."""
        counts, self.counts = self.counts, Communication()
        return counts

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {f"error/{k}": v for k, v in self.errors.items()} | {f"q/{k}": v for k, v in self.qs.items()}
        return {**{k: v.detach().contiguous().clone() for k, v in tensors.items()}, "step": torch.tensor(self.step)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step = int(state["step"])
        self.errors = {k.removeprefix("error/"): v.clone() for k, v in state.items() if k.startswith("error/")}
        self.qs = {k.removeprefix("q/"): v.clone() for k, v in state.items() if k.startswith("q/")}

    def restart(self, step: int) -> None:
        """Fresh state (no errors, new Q factors), counting steps from `step`."""
        self.step, self.errors, self.qs = step, {}, {}

    # -- the hook

    def hook(self, state, bucket):  # no annotations: DDP compares them to its own types, and ours are strings
        """DDP's communication hook: sync one bucket of gradients (registered with state None)."""
        buffer = bucket.buffer()
        names = [self.names[p.data_ptr()] for p in bucket.parameters()]
        self.sync(list(zip(names, bucket.gradients(), strict=True)), buffer)
        if bucket.is_last():
            self.step += 1
        future = torch.futures.Future()
        future.set_result(buffer)
        return future

    def sync_step(self, grads: list[tuple[str, torch.Tensor]]) -> None:
        """Sync all of a step's gradients at once (the pipeline's data-parallel sync, no DDP)."""
        self.sync(grads)
        self.step += 1

    def sync(self, grads: list[tuple[str, torch.Tensor]], buffer: torch.Tensor | None = None) -> None:
        """Replace each named gradient, in place, by the mean over replicas: exact during the warm-up
        (one all-reduce of `buffer`, which holds them all, when given), PowerSGD's after it."""
        self.counts.bytes_uncompressed += sum(g.numel() * g.element_size() for _, g in grads)
        if self.step < self.settings.warmup_steps:
            self._exact_mean([buffer] if buffer is not None else [g for _, g in grads])
        else:
            self._compress(grads)

    def _exact_mean(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor, in place, by its exact mean over replicas: one all-reduce of them all."""
        flat = tensors[0] if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])
        flat.div_(self._world())  # as DDP's own all-reduce: divide, then sum
        self._all_reduce(flat)
        if len(tensors) > 1:
            for t, mean in zip(tensors, _split(flat, tensors), strict=True):
                t.copy_(mean)

    def _world(self) -> int:
        return dist.get_world_size(self.group)

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        self.counts.bytes_sent += tensor.numel() * tensor.element_size()
        started = time.perf_counter()
        dist.all_reduce(tensor, group=self.group)
        waited = time.perf_counter() - started
        self._waited += waited  # waiting for the network is not compressing
        self.counts.wait_seconds += waited

    def _compress(self, grads: list[tuple[str, torch.Tensor]]) -> None:
        started, self._waited = time.perf_counter(), 0.0
        self.counts.compressed = True
        world, rank = self._world(), self.settings.rank
        exact, matrices = [], []
        for name, grad in grads:
            r = compressed_rank(grad.shape, rank)
            if not r:
                exact.append(grad)
                continue
            matrix = grad.view(grad.shape[0], -1)
            if self.settings.error_feedback and name in self.errors:
                matrix.add_(self.errors[name])
            matrices.append((name, matrix, r))
        if exact:
            self._exact_mean(exact)
        exact_means = self._exact_means(matrices, world) if self.settings.log_cosine and matrices else None
        if matrices:
            self._power_iteration(matrices, world)
        if exact_means:
            for (_, applied, _), exact in zip(matrices, exact_means, strict=True):
                self.counts.dot += float((applied * exact).sum())
                self.counts.applied_sq += float(applied.square().sum())
                self.counts.exact_sq += float(exact.square().sum())
        self.counts.compress_seconds += time.perf_counter() - started - self._waited

    def _exact_means(self, matrices: list[tuple[str, torch.Tensor, int]], world: int) -> list[torch.Tensor]:
        """The exact mean of this step's gradients (without error feedback's residuals), for the
        cosine diagnostic; its all-reduce is not counted as sent."""
        local = [
            m - self.errors[name] if self.settings.error_feedback and name in self.errors else m.clone()
            for name, m, _ in matrices
        ]
        flat = torch.cat([t.reshape(-1) for t in local])
        dist.all_reduce(flat, group=self.group)
        return [t.div_(world) for t in _split(flat, local)]

    def _power_iteration(self, matrices: list[tuple[str, torch.Tensor, int]], world: int) -> None:
        """One warm-started power iteration for every matrix of a bucket: two flat all-reduces."""
        qs = []
        for name, matrix, r in matrices:
            q = self.qs.get(name)
            if q is None:
                q = initial_q(matrix.shape[1], r, self.settings.seed, self.index[name], matrix.dtype, matrix.device)
            qs.append(orthonormalize(q))
        ps = [matrix @ q for (_, matrix, _), q in zip(matrices, qs, strict=True)]
        ps = [orthonormalize(p) for p in self._sum_flat(ps)]
        qs = [(p.T @ matrix).T for (_, matrix, _), p in zip(matrices, ps, strict=True)]  # = M^T P, 9x faster on CPU
        qs = [q.div_(world) for q in self._sum_flat(qs)]
        for (name, matrix, _), p, q in zip(matrices, ps, qs, strict=True):
            if self.settings.error_feedback:  # e = M - P Q^T, before M is overwritten
                self.errors[name] = torch.addmm(matrix, p, q.T, alpha=-1, out=self.errors.get(name))
            torch.mm(p, q.T, out=matrix)  # the same on every replica
            self.qs[name] = q.contiguous()

    def _sum_flat(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """All-reduce (sum) several tensors as one flat message; returns them, summed."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self._all_reduce(flat)
        return _split(flat, tensors)


def _split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of `flat` shaped as the tensors of `like`, in order."""
    out, offset = [], 0
    for t in like:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


# -- Compressed backpropagation (Optimus-CC's CB) with lazy error propagation (LEP)

BACKPROP_FACTORS = ("powersgd_p", "powersgd_q")  # the keys of a compressed message's factors


@dataclass
class BackpropCounts:
    """What one rank's pipeline backward sends handed to ColossalAI's p2p since the last `take`."""

    bytes_sent: int = 0  # the tensors of the messages sent (the factors, where compressed)
    bytes_uncompressed: int = 0  # the exact activation gradients of the same messages
    messages: int = 0
    compressed: int = 0  # of which compressed
    seconds: float = 0.0  # compressing (factors, residual) and, on the receiver, rebuilding P Q^T


class BackpropCompression:
    """The activation gradients one pipeline stage sends to the previous one (Optimus-CC's CB), each
    [batch, seq, hidden] gradient G of a message viewed as a matrix (batch*seq x hidden):

        M = G + e                   LEP: what compressing the previous message at this boundary left out
        P = M Q, orthonormalised    Q (hidden x r): the previous message's Q (warm start), orthonormalised
        Q = M^T P
        e = M - P Q^T               kept here, added to the next message (the next micro-batch's, or
                                    the next step's first: the residual is never dropped)

    Only P (viewed [batch, seq, r]) and Q travel; the receiver rebuilds P Q^T (`decode`). Exact for
    a message of rank <= r with no residual; LEP makes the sum of what was sent over micro-batches
    plus the residual equal the sum of the exact gradients. State (e, Q) per key of the message."""

    def __init__(self, rank: int, seed: int = 0, index: int = 0):
        self.rank, self.seed, self.index = rank, seed, index
        self.residuals: dict[str, torch.Tensor] = {}
        self.qs: dict[str, torch.Tensor] = {}
        self.counts = BackpropCounts()

    def encode(self, message: dict | None, compress: bool = True) -> dict | None:
        """The object to send for `message` (a dict of gradients, or None when nothing is sent)."""
        if message is None:
            return None
        started = time.perf_counter()
        out = {k: self._compress(k, g) if compress and _compressible(g) else g for k, g in message.items()}
        self.counts.seconds += time.perf_counter() - started
        self.counts.messages += 1
        self.counts.compressed += int(any(isinstance(v, dict) for v in out.values()))
        self.counts.bytes_uncompressed += sum(_nbytes(g) for g in message.values())
        self.counts.bytes_sent += sum(_nbytes(v) for v in out.values())
        return out

    def decode(self, received: dict | None) -> dict | None:
        """The gradients a received message stands for: P Q^T where it was compressed."""
        if received is None:
            return None
        started = time.perf_counter()
        out = {
            k: _rebuild(v) if isinstance(v, dict) and set(v) == set(BACKPROP_FACTORS) else v
            for k, v in received.items()
        }
        self.counts.seconds += time.perf_counter() - started
        return out

    def _compress(self, key: str, grad: torch.Tensor) -> dict[str, torch.Tensor]:
        matrix = grad.detach().float().reshape(-1, grad.shape[-1])
        n, m = matrix.shape
        r = min(n, m, self.rank)
        residual = self.residuals.get(key)
        if residual is not None and residual.shape == matrix.shape:
            matrix = matrix + residual
        q = self.qs.get(key)
        if q is None or q.shape != (m, r):
            q = initial_q(m, r, self.seed, self.index, torch.float32, matrix.device)
        p = orthonormalize(matrix @ orthonormalize(q))
        q = matrix.T @ p
        p_sent, q_sent = p.to(grad.dtype), q.to(grad.dtype)
        self.residuals[key] = matrix - p_sent.float() @ q_sent.float().T  # what the receiver will not get
        self.qs[key] = q
        return dict(zip(BACKPROP_FACTORS, (p_sent.view(*grad.shape[:-1], r), q_sent), strict=True))

    def take(self) -> BackpropCounts:
        counts, self.counts = self.counts, BackpropCounts()
        return counts

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {f"residual/{k}": v for k, v in self.residuals.items()} | {f"q/{k}": v for k, v in self.qs.items()}
        return {k: v.detach().contiguous().clone() for k, v in tensors.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.residuals = {k.removeprefix("residual/"): v.clone() for k, v in state.items() if k.startswith("residual/")}
        self.qs = {k.removeprefix("q/"): v.clone() for k, v in state.items() if k.startswith("q/")}

    def restart(self) -> None:
        self.residuals, self.qs = {}, {}


def _compressible(grad) -> bool:
    return isinstance(grad, torch.Tensor) and grad.dim() >= 2 and grad.is_floating_point()


def _nbytes(value) -> int:
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def _rebuild(factors: dict[str, torch.Tensor]) -> torch.Tensor:
    p, q = (factors[k] for k in BACKPROP_FACTORS)
    r = p.shape[-1]
    return (p.reshape(-1, r).float() @ q.float().T).to(p.dtype).view(*p.shape[:-1], q.shape[0])


def backprop_payload_bytes(batch: int, seq: int, hidden: int, rank: int, element_size: int = 4) -> tuple[int, int]:
    """(bytes of one compressed message, bytes of the exact one) for a [batch, seq, hidden] gradient:
    the analytic count the counters must match."""
    r = min(batch * seq, hidden, rank)
    return element_size * r * (batch * seq + hidden), element_size * batch * seq * hidden
