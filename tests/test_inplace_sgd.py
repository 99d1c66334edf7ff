"""InplaceSGD (LOMO): equal to torch SGD + clip_grad_norm_, frees gradients during backward, fp16 loss scaling,
data parallelism over gloo, checkpoint round trips. CPU only."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import check_ok, launch
from torch import nn

from llama_recipe.inplace_sgd import DynamicLossScaler, InplaceSGD

LR = 0.1


def mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def batches(n: int, rows: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 8, generator=gen), torch.randn(rows, 4, generator=gen)) for _ in range(n)]


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    return F.mse_loss(model(x.to(dtype)).float(), y)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """As the trainer builds them: decay on matrices, none on 1-D params."""
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def grads_left(model: nn.Module) -> int:
    return sum(p.grad is not None for p in model.parameters())


def max_abs_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p.float() - q.float()).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


def reference_step(model, optimizer, params, loss_fn, max_norm: float) -> float | None:
    """torch.optim.SGD + clip_grad_norm_, the result InplaceSGD must reproduce."""
    loss_fn(model).backward()
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item() if max_norm > 0 else None
    optimizer.step()
    optimizer.zero_grad()
    return norm


def compare_with_sgd(model, loss_fns, max_norm: float, weight_decay: float = 0.0) -> tuple[float, list, list]:
    """Run InplaceSGD and SGD + clip_grad_norm_ side by side (same groups, same LR schedule); max |dw|, both norms."""
    ref = copy.deepcopy(model)
    groups, ref_groups = decay_groups(model, weight_decay), decay_groups(ref, weight_decay)
    opt = InplaceSGD(groups, lr=LR, max_norm=max_norm)
    ref_opt = torch.optim.SGD(ref_groups, lr=LR)  # coupled decay: the same update, rounded differently
    # A schedule edits group["lr"]: the hooks must read it at update time.
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step)) for o in (opt, ref_opt)]
    ref_params = [p for g in ref_groups for p in g["params"]]  # InplaceSGD's order, so the norm sums alike
    norms, ref_norms = [], []
    for loss_fn in loss_fns:
        norms.append(opt.fused_backward(loss_fn(model)))
        opt.step()
        assert grads_left(model) == 0, "a .grad survived fused_backward"
        ref_norms.append(reference_step(ref, ref_opt, ref_params, loss_fn, max_norm))
        for schedule in schedules:
            schedule.step()
    return max_abs_diff(model, ref), norms, ref_norms


@pytest.mark.parametrize("max_norm", [0.5, 1e3, 0.0], ids=["clip-binds", "clip-idle", "no-clip"])
def test_mlp_matches_sgd_bit_exactly(max_norm):
    model = mlp()
    start = copy.deepcopy(model)
    loss_fns = [lambda m, b=b: mse(m, *b) for b in batches(5)]
    diff, norms, ref_norms = compare_with_sgd(model, loss_fns, max_norm)
    assert max_abs_diff(model, start) > 1e-2  # it trained
    assert diff == 0.0
    assert norms == ref_norms  # the same floats, or None when not computed
    if max_norm == 0.5:
        assert all(n > 0.5 for n in norms)  # clipping really bound on every step
    if max_norm == 1e3:
        assert all(n < 1e3 for n in norms)


def tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied-embeddings"])
def test_tiny_llama_matches_sgd(tie):
    model = tiny_llama(tie)
    start = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(2)
    ids = [torch.randint(0, 256, (2, 16), generator=gen) for _ in range(5)]
    loss_fns = [lambda m, x=x: m(input_ids=x, labels=x).loss for x in ids]
    diff, norms, ref_norms = compare_with_sgd(model, loss_fns, max_norm=0.5)
    assert max_abs_diff(model, start) > 1e-3
    assert all(n > 0.5 for n in norms)
    assert diff == 0.0, diff  # bit-exact here too (<= 1e-6 would be the fp32-rounding bound)
    assert norms == ref_norms


def test_decoupled_weight_decay_per_group():
    """p <- p(1 - lr wd) - lr coef g, only on the decay group: vs a hand-written update and vs torch SGD's coupled
    decay (the same update, rounded differently)."""
    model = mlp()
    x, y = batches(1)[0]
    expected = copy.deepcopy(model)
    mse(expected, x, y).backward()
    grads = [p.grad.clone() for p in expected.parameters()]
    coef = min(1.0, 0.5 / (torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() + 1e-6))
    with torch.no_grad():
        for p, g in zip(expected.parameters(), grads, strict=True):
            wd = 0.3 if p.ndim >= 2 else 0.0
            p.copy_(p * (1 - LR * wd) - LR * coef * g)
    InplaceSGD(decay_groups(model, 0.3), lr=LR, max_norm=0.5).fused_backward(mse(model, x, y))
    assert max_abs_diff(model, expected) <= 1e-6
    bias_moved = (model[0].bias - mlp()[0].bias).abs().max().item()
    assert 0 < bias_moved <= LR * coef * grads[1].abs().max().item() + 1e-7  # no decay on 1-D params

    model = mlp()
    diff, _, _ = compare_with_sgd(model, [lambda m, b=b: mse(m, *b) for b in batches(5)], 0.5, weight_decay=0.3)
    assert diff <= 1e-6, diff


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_weights_updated_in_fp32_then_rounded(dtype):
    model = mlp(dtype)
    x, y = batches(1)[0]
    expected = copy.deepcopy(model)
    mse(expected, x, y).backward()
    with torch.no_grad():
        for p in expected.parameters():
            p.copy_((p.float() * (1 - LR * 0.1) - LR * p.grad.float()).to(dtype))
    before = copy.deepcopy(model)
    InplaceSGD(model.parameters(), lr=LR, weight_decay=0.1).fused_backward(mse(model, x, y))
    assert all(p.dtype == dtype for p in model.parameters())
    assert max_abs_diff(model, before) > 1e-3
    assert max_abs_diff(model, expected) == 0.0


def count_live_grads(model: nn.Module) -> list[int]:
    """Before any other hook: how many params hold a .grad each time a gradient lands. Returns the live list."""
    params, counts = list(model.parameters()), []
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _: counts.append(sum(q.grad is not None for q in params)))
    return counts


@pytest.mark.parametrize("max_norm", [0.0, 0.5])
def test_gradients_are_freed_during_backward(max_norm):
    model = mlp()
    n_params = len(list(model.parameters()))
    x, y = batches(1)[0]

    plain = copy.deepcopy(model)
    counts = count_live_grads(plain)
    mse(plain, x, y).backward()
    assert max(counts) == n_params  # plain backward: every gradient alive at the end

    counts = count_live_grads(model)  # registered first, so it fires before InplaceSGD's hook
    InplaceSGD(model.parameters(), lr=LR, max_norm=max_norm).fused_backward(mse(model, x, y))
    assert len(counts) == n_params * (2 if max_norm else 1)  # every hook fired (twice with clipping)
    assert max(counts) == 1  # only the gradient just written, never two at once
    assert grads_left(model) == 0


def test_no_reference_cycle_and_remove_hooks():
    model = mlp()
    opt = InplaceSGD(model.parameters(), lr=LR)
    opt_ref, model_ref = weakref.ref(opt), weakref.ref(model)
    del opt
    gc.collect()
    assert opt_ref() is None  # the hooks did not keep the optimizer alive
    x, y = batches(1)[0]
    mse(model, x, y).backward()  # dead optimizer: hooks are no-ops, ordinary gradients
    assert grads_left(model) == len(list(model.parameters()))
    del model
    gc.collect()
    assert model_ref() is None

    model = mlp()
    opt = InplaceSGD(model.parameters(), lr=LR)
    opt.remove_hooks()
    mse(model, x, y).backward()
    assert grads_left(model) == len(list(model.parameters()))
    with pytest.raises(RuntimeError, match="remove_hooks"):
        opt.fused_backward(mse(model, x, y))


def test_refuses_existing_grads_and_step_zero_grad_are_harmless():
    model = mlp()
    opt = InplaceSGD(model.parameters(), lr=LR, max_norm=1.0)
    x, y = batches(1)[0]
    mse(model, x, y).backward()  # outside fused_backward: ordinary gradients
    with pytest.raises(RuntimeError, match="gradient accumulation"):
        opt.fused_backward(mse(model, x, y))
    opt.zero_grad()
    before = copy.deepcopy(model)
    opt.step()
    assert max_abs_diff(model, before) == 0.0  # step() is a no-op
    assert opt.fused_backward(mse(model, x, y)) > 0
    opt.zero_grad()
    assert max_abs_diff(model, before) > 0


def test_dynamic_loss_scaler():
    scaler = DynamicLossScaler(init_scale=8.0, window=3, min_scale=2.0)
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 8.0
    scaler.update(True)  # resets the clean streak
    assert scaler.scale == 4.0
    for _ in range(2):
        scaler.update(False)
    assert scaler.scale == 4.0
    scaler.update(False)
    assert scaler.scale == 8.0
    for _ in range(5):
        scaler.update(True)
    assert scaler.scale == 2.0  # not below min_scale
    restored = DynamicLossScaler()
    scaler.update(False)
    restored.load_state_dict(scaler.state_dict())
    assert (restored.scale, restored.clean_steps) == (2.0, 1)


def test_fp16_overflow_skips_step_and_halves_scale():
    model = mlp(torch.float16)
    scaler = DynamicLossScaler(init_scale=2.0**8)
    opt = InplaceSGD(model.parameters(), lr=LR, loss_scaler=scaler)
    x, y = batches(1)[0]
    before = copy.deepcopy(model)
    bad = x.clone()
    bad[0, 0] = float("inf")
    norm = opt.fused_backward(mse(model, bad, y))
    assert opt.skipped and not torch.isfinite(torch.tensor(norm))
    assert scaler.scale == 2.0**7
    assert max_abs_diff(model, before) == 0.0  # weights untouched
    assert grads_left(model) == 0

    norm = opt.fused_backward(mse(model, x, y))  # a clean step updates
    assert not opt.skipped and 0 < norm < float("inf")
    assert scaler.scale == 2.0**7 and scaler.clean_steps == 1
    assert max_abs_diff(model, before) > 1e-3
    assert grads_left(model) == 0


def test_fp16_too_large_scale_backs_off_until_steps_succeed():
    model = mlp(torch.float16)
    scaler = DynamicLossScaler(init_scale=2.0**24)  # loss * scale is inf in fp16
    opt = InplaceSGD(model.parameters(), lr=LR, loss_scaler=scaler)
    x, y = batches(1)[0]
    before = copy.deepcopy(model)
    skips = 0
    while True:
        opt.fused_backward(F.mse_loss(model(x.half()), y.half()))  # an fp16 loss
        if not opt.skipped:
            break
        skips += 1
        assert max_abs_diff(model, before) == 0.0 and grads_left(model) == 0
    assert skips >= 8 and scaler.scale <= 2.0**16
    assert max_abs_diff(model, before) > 1e-3


def test_fp16_updates_match_fp32_reference():
    """fp16 weights, scaled loss, clipping: follows an fp32 run from the same weights to within fp16 rounding."""
    model = mlp(torch.float16)
    ref = copy.deepcopy(model).float()
    start = copy.deepcopy(ref)
    opt = InplaceSGD(model.parameters(), lr=LR, max_norm=0.5, loss_scaler=DynamicLossScaler(init_scale=2.0**12))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for x, y in batches(3):
        loss_fn = lambda m: mse(m, x, y)  # noqa: B023 - used at once
        opt.fused_backward(loss_fn(model))
        assert not opt.skipped and grads_left(model) == 0
        reference_step(ref, ref_opt, list(ref.parameters()), loss_fn, 0.5)
    moved, error = max_abs_diff(ref, start), max_abs_diff(model, ref)
    assert moved > 1e-2
    assert error <= 1e-3, (error, moved)  # a few fp16 ulps of weights ~0.5 (ulp 4.9e-4)


def test_loss_scale_keeps_small_fp16_gradients():
    """A tiny loss: unscaled, its fp16 gradients lose bits to underflow (the norm is off by %); scaled, they don't."""
    x, y = batches(1)[0]
    ref = mlp(torch.float16).float()
    (1e-5 * mse(ref, x, y)).backward()
    ref_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()])).item()
    errors = {}
    for scale in (1.0, 2.0**12):
        model = mlp(torch.float16)
        opt = InplaceSGD(model.parameters(), lr=LR, max_norm=1.0, loss_scaler=DynamicLossScaler(scale, min_scale=scale))
        errors[scale] = abs(opt.fused_backward(1e-5 * mse(model, x, y)) / ref_norm - 1)
    assert errors[2.0**12] < 1e-3 < 1e-2 < errors[1.0], errors


def test_state_dict_round_trip_keeps_loss_scale(tmp_path):
    model = mlp()
    opt = InplaceSGD(decay_groups(model, 0.1), lr=LR, loss_scaler=DynamicLossScaler(init_scale=2.0**10))
    opt.loss_scaler.update(True)
    opt.loss_scaler.update(False)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    assert "loss_scaler" not in opt.param_groups[0]  # state_dict() did not write into the live group

    fresh = InplaceSGD(decay_groups(model, 0.1), lr=LR, loss_scaler=DynamicLossScaler())
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt"))
    assert (fresh.loss_scaler.scale, fresh.loss_scaler.clean_steps) == (2.0**9, 1)
    assert "loss_scaler" not in fresh.param_groups[0]
    assert fresh.param_groups[0]["weight_decay"] == 0.1

    # ColossalAI's sharded optimizer checkpoint saves state_dict()["param_groups"] and, on load, replaces the
    # optimizer's param_groups with the saved ones (params swapped in); it never calls load_state_dict.
    saved_groups = opt.state_dict()["param_groups"]
    late = InplaceSGD(decay_groups(model, 0.1), lr=LR, loss_scaler=DynamicLossScaler())
    late.param_groups = [
        {**saved, "params": live["params"]} for saved, live in zip(saved_groups, late.param_groups, strict=True)
    ]
    assert (late.loss_scaler.scale, late.loss_scaler.clean_steps) == (2.0**9, 1)  # picked up on first access
    assert "loss_scaler" not in late.param_groups[0]
    late.fused_backward(mse(model, *batches(1)[0]))
    assert late.loss_scaler.clean_steps == 2


@pytest.mark.multiprocess
def test_data_parallel_matches_single_process_on_full_batch(tmp_path):
    """tests/inplace_sgd_worker.py on 2 gloo ranks, each on its half of every batch, against
    single-process SGD on the whole batch."""
    world_size = 2
    check_ok(launch("tests/inplace_sgd_worker.py", [str(tmp_path)], nproc=world_size))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for name, tensor in results[0]["model"].items():
        assert torch.equal(tensor, results[1]["model"][name]), name  # ranks stay in lockstep
    assert results[0]["norms"] == results[1]["norms"]

    ref, start = mlp(), mlp()
    groups = decay_groups(ref, 0.1)
    ref_opt = torch.optim.SGD(groups, lr=LR)
    ref_norms = []
    for x, y in batches(3, rows=8 * world_size):  # the concatenated batch, mean loss
        params = [p for g in groups for p in g["params"]]
        ref_norms.append(reference_step(ref, ref_opt, params, lambda m, x=x, y=y: mse(m, x, y), 0.5))
    model = mlp()
    model.load_state_dict(results[0]["model"])
    assert max_abs_diff(ref, start) > 1e-2
    assert max_abs_diff(model, ref) <= 1e-6
    assert results[0]["norms"] == pytest.approx(ref_norms, rel=1e-5)
