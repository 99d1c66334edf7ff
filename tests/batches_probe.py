"""Run under torchrun by test_data.py: each rank reports what the training loop's data would be.

Builds the real booster plugin for the given flags, then the real data pipeline for this rank's
data-parallel coordinates, and writes a digest of its first batches to OUT/rank-<R>.json.
"""

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from tests/

from llama_recipe import plugins  # noqa: E402
from llama_recipe.config import SHIPPED_PRETRAIN_DATA, SHIPPED_TOKENIZER, TrainConfig  # noqa: E402
from llama_recipe.data import build_pretrain_batches, load_tokenizer  # noqa: E402

out, plugin, tp, pp = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = TrainConfig(plugin=plugin, tp=tp, pp=pp, mixed_precision="fp32")
plugins.launch(seed=0)
par = plugins.build_parallelism(cfg)
batches = build_pretrain_batches(
    str(SHIPPED_PRETRAIN_DATA), load_tokenizer(str(SHIPPED_TOKENIZER)), 64, 2, par.dp_rank, par.dp_size
)
digests = [hashlib.sha256(batches.next_batch()["input_ids"].numpy().tobytes()).hexdigest() for _ in range(3)]
(out / f"rank-{plugins.rank()}.json").write_text(json.dumps({"dp_rank": par.dp_rank, "digests": digests}))
