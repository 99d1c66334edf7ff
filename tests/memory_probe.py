"""Run under torchrun by test_collage_training.py: build and boost the model exactly as training
does, take one optimizer step (so the optimizer states exist) and one more forward/backward (so the
gradients exist too), then write the bytes of every tensor reachable from the boosted model and
optimizer, by dtype, to $MEMORY_PROBE_OUT/rank-<R>.json. Arguments: pretrain.py's flags."""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from llama_recipe import plugins
from llama_recipe.config import parse_pretrain_args
from llama_recipe.data import SyntheticBatches
from llama_recipe.metrics import tensor_bytes_by_dtype
from llama_recipe.model import count_parameters, get_model_config
from llama_recipe.trainer import build_boosted, train_step

cfg = parse_pretrain_args(sys.argv[1:])
plugins.launch(cfg.seed)
par = plugins.build_parallelism(cfg)
model_config = get_model_config(cfg.config)
model, optimizer, _ = build_boosted(cfg, par, model_config, "sdpa", warmup_steps=0, total_steps=10)
batches = SyntheticBatches(model_config.vocab_size, cfg.max_length, cfg.batch_size, seed=cfg.seed + par.dp_rank)
train_step(par, model, optimizer, batches, 1, inputs=lambda batch: batch)
plugins.step_optimizer(par, optimizer, cfg.grad_clip)
optimizer.zero_grad()
train_step(par, model, optimizer, batches, 1, inputs=lambda batch: batch)
report = dict(
    rank=dist.get_rank(),
    parameters=count_parameters(model_config),
    bytes=tensor_bytes_by_dtype(model, optimizer),
    param_dtypes=sorted({str(p.dtype) for p in model.parameters()}),
)
Path(os.environ["MEMORY_PROBE_OUT"], f"rank-{dist.get_rank()}.json").write_text(json.dumps(report))
dist.barrier()
dist.destroy_process_group()
