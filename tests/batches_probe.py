"""Run under torchrun by test_data.py: each rank reports what the training loop's data would be.

    batches_probe.py OUT_DIR PLUGIN:TP:PP [PLUGIN:TP:PP ...]

For each layout in turn, in one job: builds the real booster plugin, then the real data pipeline for
this rank's data-parallel coordinates (shuffled, with pretrain.py's default seed and buffer), and
writes a digest of its first batches to OUT_DIR/<layout index>-rank-<R>.json.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch.distributed as dist

from llama_recipe.config import SHIPPED_PRETRAIN_DATA, SHIPPED_TOKENIZER, TrainConfig
from llama_recipe.data import build_pretrain_batches, load_tokenizer
from llama_recipe.distributed import launch
from llama_recipe.parallel import build_parallelism

out = Path(sys.argv[1])
launch(seed=0)
tokenizer = load_tokenizer(str(SHIPPED_TOKENIZER))
for index, layout in enumerate(sys.argv[2:]):
    plugin, tp, pp = layout.split(":")
    cfg = TrainConfig.for_script(plugin=plugin, tp=int(tp), pp=int(pp), mixed_precision="fp32")
    par = build_parallelism(cfg)
    batches = build_pretrain_batches(
        str(SHIPPED_PRETRAIN_DATA), tokenizer, 64, 2, par.dp_rank, par.dp_size,
        seed=cfg.training.seed, shuffle_buffer=cfg.data.shuffle_buffer,
    )  # fmt: skip
    digests = [hashlib.sha256(batches.next_batch()["input_ids"].numpy().tobytes()).hexdigest() for _ in range(3)]
    report = {"dp_rank": par.dp_rank, "digests": digests}
    (out / f"{index}-rank-{dist.get_rank()}.json").write_text(json.dumps(report))
dist.barrier()
dist.destroy_process_group()
