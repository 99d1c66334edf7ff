"""Peak memory of full finetuning with AdamW, SGD and in-place SGD (LOMO), side by side.

Builds a randomly initialised LLaMA of a few hundred million parameters (once), then runs
finetune.py a few steps with each optimizer, one process, same model, data and batch, and reads
the peak resident memory *while training* from its summary (measured from the first step on, so
loading the weights does not count). Writes a markdown table and JSON.

    python scripts/memory_finetune.py                       # ~374M parameters, fp32, CPU
    python scripts/memory_finetune.py --hidden 2048 --layers 16 --intermediate 5632   # ~1B
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OPTIMIZERS = {"adamw": 1e-5, "sgd": 1e-2, "inplace_sgd": 1e-2}  # name: learning rate


def build_model(args: argparse.Namespace, path: Path) -> int:
    """A random LLaMA saved as a Hugging Face directory; returns its parameter count."""
    import torch
    from transformers import LlamaConfig

    from llama_recipe.model import LLAMA_VOCAB_SIZE, build_model, count_parameters

    config = LlamaConfig(
        vocab_size=LLAMA_VOCAB_SIZE,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        intermediate_size=args.intermediate,
        max_position_embeddings=2048,
    )
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        build_model(config).save_pretrained(path)
    return count_parameters(config)


def run(optimizer: str, args: argparse.Namespace, model: Path) -> dict:
    command = [
        sys.executable, "finetune.py", "--model_path", str(model), "-p", "ddp", "--optimizer", optimizer,
        "-d", str(REPO / "data" / "self_instruct"), "--task_name", "self_instruct", "--eval_split", "0",
        "-l", str(args.max_length), "-b", str(args.batch_size), "--lr", str(OPTIMIZERS[optimizer]),
        "--warmup_ratio", "0", "--grad_clip", "1.0", "--max_steps", str(args.steps), "-x", "fp32",
        "-o", "", "-t", "",
    ]  # fmt: skip
    # Large allocations straight from mmap and back to the OS when freed: otherwise the allocator may
    # keep freed loading buffers and hand them to the gradients, hiding part of the peak.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    print(f"{optimizer}: finetune.py {' '.join(command[2:])}", flush=True)
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{optimizer} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    done = re.search(r"([\d,]+) tokens/s, peak memory ([\d,]+) MB", proc.stdout)
    return dict(tokens_per_s=float(done[1].replace(",", "")), peak_mb=float(done[2].replace(",", "")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("-l", "--max_length", type=int, default=256)
    p.add_argument("-b", "--batch_size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-o", "--out", default="runs/memory_finetune")
    args = p.parse_args()
    out = Path(args.out)
    model = out / f"model-h{args.hidden}-l{args.layers}-i{args.intermediate}"
    parameters = build_model(args, model)
    results = {name: run(name, args, model) for name in OPTIMIZERS}
    sgd = results["sgd"]["peak_mb"]
    rows = [
        f"{parameters / 1e6:,.0f}M parameters, fp32, batch {args.batch_size}x{args.max_length}, 1 process (-p ddp), "
        "gradient clipping 1.0; peak resident memory while training",
        "",
        "| optimizer | peak memory (MB) | vs sgd |",
        "|---|---:|---:|",
    ]
    rows += [f"| {name} | {r['peak_mb']:,.0f} | {r['peak_mb'] / sgd:.2f}x |" for name, r in results.items()]
    table = "\n".join(rows)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(dict(args=vars(args), parameters=parameters, results=results)))
    print(table)


if __name__ == "__main__":
    main()
