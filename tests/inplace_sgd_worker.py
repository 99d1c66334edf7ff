"""Run under torchrun by test_inplace_sgd.py: in-place SGD on 2 gloo ranks, each on its own half of
every batch; writes OUT_DIR/rank<R>.pt with the final weights and the gradient norms."""

import os
import sys

import torch
import torch.distributed as dist
from test_inplace_sgd import LR, batches, decay_groups, grads_left, mlp, mse

from llama_recipe.inplace_sgd import InplaceSGD

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world_size = dist.get_rank(), dist.get_world_size()
try:
    model = mlp()
    opt = InplaceSGD(decay_groups(model, 0.1), lr=LR, max_norm=0.5, process_group=dist.group.WORLD)
    norms = []
    for x, y in batches(3, rows=8 * world_size):
        shard = slice(rank * 8, (rank + 1) * 8)  # different data on each rank
        norms.append(opt.fused_backward(mse(model, x[shard], y[shard])))
        assert grads_left(model) == 0
    torch.save({"model": model.state_dict(), "norms": norms}, f"{sys.argv[1]}/rank{rank}.pt")
finally:
    dist.barrier()  # destroying a gloo group while the peer still uses it can abort the process
    dist.destroy_process_group()
# Out without the interpreter's teardown: once in CI both ranks aborted after finishing ("terminate called
# without an active exception", a gloo thread destroyed at exit); the results are written by now.
sys.stdout.flush()
os._exit(0)
