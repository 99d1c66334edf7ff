"""Run under torchrun by test_parallelism.py: trains several layouts one after another in one job.

    layouts_probe.py OUT_DIR NAME "ARGS" [NAME "ARGS" ...]
    layouts_probe.py OUT_DIR RUNS.json          ({"script": "pretrain" or "finetune", "runs": [NAME,
                                                 "ARGS", ...]}: `colossalai run` splits arguments at spaces)

Each NAME trains `pretrain.py ARGS` (the real parser, checks, plugin and loop) in this process
group; ARGS may name {out}, which becomes OUT_DIR/NAME. One launch pays the interpreter's and
ColossalAI's start-up once for all the layouts the test compares.

For in-place SGD it also counts, each time a gradient lands, how many of the parameters hold a
gradient (a hook registered before the optimizer's, so it sees the moment before that gradient is
consumed and freed); the most seen goes to OUT_DIR/NAME/live_grads-rank<R>.json.
"""

import json
import shlex
import sys
from pathlib import Path

import torch.distributed as dist

from llama_recipe.cli import parse_args, quiet_libraries
from llama_recipe.distributed import launch, world_size
from llama_recipe.inplace_sgd import InplaceSGD
from llama_recipe.recipes import finetune, pretrain
from llama_recipe.validation import validate

RECIPES = {"pretrain": pretrain, "finetune": finetune}
RUN_MARKER = "=== run "

live_counts: list[int] = []
attach_hooks = InplaceSGD.attach_hooks


def attach_counting_hooks(self) -> None:
    params = [p for group in self.param_groups for p in group["params"]]
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _: live_counts.append(sum(q.grad is not None for q in params)))
    attach_hooks(self)


InplaceSGD.attach_hooks = attach_counting_hooks

out = Path(sys.argv[1])
quiet_libraries()
launch(seed=0)
spec = json.loads(Path(sys.argv[2]).read_text()) if sys.argv[2].endswith(".json") else {"runs": sys.argv[2:]}
script, pairs = spec.get("script", "pretrain"), spec["runs"]
for name, args in zip(pairs[::2], pairs[1::2], strict=True):
    if dist.get_rank() == 0:
        print(f"{RUN_MARKER}{name}", flush=True)  # where this run's output starts (conftest.run_outputs)
    cfg = parse_args(script, shlex.split(args.format(out=out / name)))
    validate(cfg, world_size(), script)
    live_counts.clear()
    RECIPES[script](cfg)
    if live_counts:
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / f"live_grads-rank{dist.get_rank()}.json").write_text(json.dumps(max(live_counts)))
    dist.barrier()
dist.barrier()
dist.destroy_process_group()
