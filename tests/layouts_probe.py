"""Run under torchrun by test_parallelism.py: trains several layouts one after another in one job.

    layouts_probe.py OUT_DIR NAME "ARGS" [NAME "ARGS" ...]

Each NAME trains `pretrain.py ARGS` (the real parser, checks, plugin and loop) in this process
group; ARGS may name {out}, which becomes OUT_DIR/NAME. One launch pays the interpreter's and
ColossalAI's start-up once for all the layouts the test compares.
"""

import shlex
import sys
from pathlib import Path

import torch.distributed as dist

from llama_recipe.cli import parse_args, quiet_libraries, validate
from llama_recipe.distributed import launch, world_size
from llama_recipe.recipes import pretrain

out = Path(sys.argv[1])
quiet_libraries()
launch(seed=0)
pairs = sys.argv[2:]
for name, args in zip(pairs[::2], pairs[1::2], strict=True):
    cfg = parse_args("pretrain", shlex.split(args.format(out=out / name)))
    validate(cfg, world_size())
    pretrain(cfg)
    dist.barrier()
dist.barrier()
dist.destroy_process_group()
