"""--compile: torch.compile of each decoder layer gives eager's losses and gradients (fp32, one rank,
in-process; on CPU compiling takes most of this test's time), keeps the weights' names, and is
refused in one line where the plugin's forward is not verified under it."""

from __future__ import annotations

import pytest
import torch

from llama_recipe.config import TrainConfig
from llama_recipe.errors import UsageError
from llama_recipe.model import build_model, compile_decoder_layers, get_model_config
from llama_recipe.plugins import check_layout


def test_compiled_layers_give_eager_losses_and_gradients():
    config = get_model_config("tiny")
    torch.manual_seed(0)
    eager = build_model(config, chunked_loss=True)
    compiled = build_model(config, chunked_loss=True)
    compiled.load_state_dict(eager.state_dict())
    compile_decoder_layers(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep transformers' names
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (eager, compiled)]
    for step in range(2):  # two steps: the second runs the compiled code on updated weights
        ids = torch.randint(0, config.vocab_size, (2, 64))
        losses = []
        for model in (eager, compiled):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-5, msg=f"step {step + 1}")
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-5, msg=f"step {step + 1}: {name}")
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    assert compiled.model.layers[0]._compiled_call_impl is not None  # it really ran compiled


def test_compile_is_refused_in_one_line_where_it_is_not_verified():
    cfg = TrainConfig.for_script("pretrain", plugin="hybrid_parallel", tp=2, compile=True)
    with pytest.raises(UsageError, match="--compile is not available with -p hybrid_parallel"):
        check_layout(cfg, world_size=2)
    check_layout(TrainConfig.for_script("pretrain", plugin="zero2", compile=True), world_size=2)
