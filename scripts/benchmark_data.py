"""How fast each data path delivers tokens, next to how fast training consumes them, in one run.

    python scripts/benchmark_data.py                # the shipped sample, rows of 256 tokens
    python scripts/benchmark_data.py -d DIR -l 2048 --no_training

1. streaming: JSONL -> shuffle buffers -> tokenize -> pack (pretrain.py's default path, buffers of
   1000 documents and rows), and the same in file order (--shuffle_buffer 0); one replica, one thread;
2. prepared: `scripts/prepare_data.py` once, then reading rows from the memory-mapped tokens (in the
   shuffled order pretrain.py uses);
3. training: benchmark.py with the `small` preset on 2 CPU processes (what the data must keep up with);
4. the data ledger's cost per step (its fingerprint, documents and line, on the training thread) and its
   bytes per step and rank (docs/data.md quotes `-l 4096 -b 8`).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llama_recipe.cli import parse_args
from llama_recipe.config import SHIPPED_PRETRAIN_DATA, SHIPPED_TOKENIZER
from llama_recipe.data import build_pretrain_batches, load_tokenizer
from llama_recipe.ledger import DataLedger
from llama_recipe.prepared import PreparedBatches, prepare_dataset

REPO = Path(__file__).resolve().parent.parent


FIRST_BATCH_S: dict[int, float] = {}  # id(batches) -> seconds its first batch took (files opened, buffers filled)


def rate(batches, seq_len: int, batch_size: int, seconds: float) -> float:
    """Tokens per second delivered by next_batch() over at least `seconds` after the first batch."""
    started = time.perf_counter()
    batches.next_batch()  # first call opens files and fills buffers
    FIRST_BATCH_S[id(batches)] = time.perf_counter() - started
    started, n = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        batches.next_batch()
        n += 1
    return n * batch_size * seq_len / (time.perf_counter() - started)


def ledger_cost(batches, seq_len: int, batch_size: int, steps: int = 50) -> tuple[float, float]:
    """(seconds, bytes) the data ledger adds per step of one micro-batch: what pretrain.py's loop does
    around each step (DataLedger.next_batch, then write), less reading the batch itself."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["-d", "unused", "-l", str(seq_len), "-b", str(batch_size), "-o", tmp, "-t", ""]
        ledger = DataLedger(parse_args("pretrain", args), batches, 0, resumed_exactly=False)
        spent = 0.0
        for step in range(1, steps + 1):
            batch = batches.next_batch()
            started = time.perf_counter()
            ledger.record(batch, batches.provenance)  # DataLedger.next_batch, less the read
            ledger.write(step)
            spent += time.perf_counter() - started
        ledger.__exit__()
        return spent / steps, (Path(tmp) / "ledger" / "rank-0.jsonl").stat().st_size / steps


def training_rate(seq_len: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results.jsonl"
        cmd = [
            str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "benchmark.py",
            "-c", "small", "-p", "zero2", "-l", str(seq_len), "-b", "2", "--max_steps", "5", "--ignore_steps", "1", "--results", str(results),
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env=env)
        return json.loads(results.read_text().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-d", "--dataset", default=str(SHIPPED_PRETRAIN_DATA))
    p.add_argument("-l", "--max_length", type=int, default=256)
    p.add_argument("-b", "--batch_size", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--no_training", action="store_true", help="skip the training-consumption measurement")
    args = p.parse_args()
    tokenizer = load_tokenizer(str(SHIPPED_TOKENIZER))

    shuffled = dict(seed=42, shuffle_buffer=1000)
    default = build_pretrain_batches(args.dataset, tokenizer, args.max_length, args.batch_size, 0, 1, **shuffled)
    streaming = rate(default, args.max_length, args.batch_size, args.seconds)
    file_order = rate(
        build_pretrain_batches(args.dataset, tokenizer, args.max_length, args.batch_size, 0, 1),
        args.max_length, args.batch_size, args.seconds,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        stats = prepare_dataset(args.dataset, f"{tmp}/prepared", tokenizer, progress=False)
        prepared = rate(
            PreparedBatches(f"{tmp}/prepared", args.max_length, args.batch_size, 0, 1, seed=42, shuffle=True),
            args.max_length, args.batch_size, args.seconds,
        )  # fmt: skip
    print(
        f"streaming, shuffled (1 thread)       : {streaming:>12,.0f} tokens/s (first batch {FIRST_BATCH_S[id(default)]:.1f} s)"
    )
    print(f"streaming, file order (1 thread)     : {file_order:>12,.0f} tokens/s")
    print(f"prepare_data.py (one-off)            : {stats['tokens_per_s']:>12,.0f} tokens/s")
    print(
        f"prepared memmap                      : {prepared:>12,.0f} tokens/s  ({prepared / streaming:,.0f}x streaming)"
    )
    seconds, size = ledger_cost(default, args.max_length, args.batch_size)
    print(f"data ledger, per step and rank       : {seconds * 1e3:>12.2f} ms, {size:,.0f} bytes")
    if not args.no_training:
        training = training_rate(args.max_length)
        print(f"training, small preset, 2 CPU procs  : {training:>12,.0f} tokens/s")
        print(f"streaming / training                 : {streaming / training:>12,.0f}x")


if __name__ == "__main__":
    main()
