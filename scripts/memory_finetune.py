"""Peak memory of full finetuning with AdamW, SGD and in-place SGD (LOMO), or of LoRA against full finetuning, side by side.

Builds a randomly initialised LLaMA of a few hundred million parameters (once), then runs
finetune.py a few steps with each optimizer, one process, same model, data and batch, and reads
the peak resident memory *while training* from its summary (measured from the first step on, so
loading the weights does not count). Writes a markdown table and JSON.

    python scripts/memory_finetune.py                       # ~374M parameters, fp32, CPU
    python scripts/memory_finetune.py --hidden 2048 --layers 16 --intermediate 5632   # ~1B
    python scripts/memory_finetune.py --compare lora -c small --steps 20   # LoRA (--lora_rank 8) vs full, AdamW

--compare lora also reports the loss after the same steps and the median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OPTIMIZERS = {"adamw": 1e-5, "sgd": 1e-2, "inplace_sgd": 1e-2}  # name: learning rate
# --compare lora: name -> flags. Each at its usual learning rate: finetune.py's default for full finetuning
# (Alpaca's 2e-5), LitGPT's LoRA default 3e-4 (LoRA wants a larger one: its B starts at zero).
LORA_VS_FULL = {
    "full (adamw)": ["--optimizer", "adamw", "--lr", "2e-5"],
    "lora r8 q,v (adamw)": ["--optimizer", "adamw", "--lr", "3e-4", "--lora_rank", "8"],
}
# The run in a subprocess, its summary printed as JSON (peak memory is the process's own)
RUN = (
    "import json, sys; from llama_recipe.cli import run_script; from llama_recipe.recipes import finetune; "
    "s = run_script('finetune', finetune, sys.argv[1:]); "
    "print('SUMMARY ' + json.dumps({k: s[k] for k in ('tokens_per_s', 'peak_memory_mb', 'losses', 'step_seconds')}))"
)


def build_model(args: argparse.Namespace, path: Path) -> int:
    """A random LLaMA saved as a Hugging Face directory; returns its parameter count."""
    import torch
    from transformers import LlamaConfig

    from llama_recipe.model import LLAMA_VOCAB_SIZE, build_model, count_parameters, get_model_config

    config = (
        get_model_config(args.config)
        if args.config
        else LlamaConfig(
            vocab_size=LLAMA_VOCAB_SIZE,
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64,
            intermediate_size=args.intermediate,
            max_position_embeddings=2048,
        )
    )
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        build_model(config).save_pretrained(path)
    return count_parameters(config)


def run(name: str, flags: list[str], args: argparse.Namespace, model: Path) -> dict:
    command = [
        sys.executable, "-c", RUN, "--model_path", str(model), "-p", "ddp", *flags,
        "-d", str(REPO / "data" / "self_instruct"), "--task_name", "self_instruct", "--eval_split", "0",
        "-l", str(args.max_length), "-b", str(args.batch_size),
        "--warmup_ratio", "0", "--grad_clip", "1.0", "--max_steps", str(args.steps), "-x", "fp32",
        "-o", "", "-t", "",
    ]  # fmt: skip
    # Large allocations straight from mmap and back to the OS when freed: otherwise the allocator may
    # keep freed loading buffers and hand them to the gradients, hiding part of the peak.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    print(f"{name}: finetune.py {' '.join(command[3:])}", flush=True)
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    summary = json.loads(proc.stdout.split("SUMMARY ", 1)[1].splitlines()[0])
    return dict(
        tokens_per_s=summary["tokens_per_s"],
        peak_mb=summary["peak_memory_mb"],
        final_loss=summary["losses"][-1],
        step_s=statistics.median(summary["step_seconds"][1:]),  # the first step does one-off work
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", choices=["optimizers", "lora"], default="optimizers")
    p.add_argument("-c", "--config", default=None, help="a model preset (e.g. small) instead of --hidden/--layers")
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
    model = out / (
        f"model-{args.config}" if args.config else f"model-h{args.hidden}-l{args.layers}-i{args.intermediate}"
    )
    parameters = build_model(args, model)
    header = (
        f"{parameters / 1e6:,.0f}M parameters, fp32, batch {args.batch_size}x{args.max_length}, 1 process (-p ddp), "
        f"gradient clipping 1.0, {args.steps} steps; peak resident memory while training"
    )
    if args.compare == "lora":
        results = {name: run(name, flags, args, model) for name, flags in LORA_VS_FULL.items()}
        full = results["full (adamw)"]
        rows = [header, "", "| run | peak memory (MB) | vs full | tokens/s | median step (s) | loss at the last step |"]
        rows += ["|---|---:|---:|---:|---:|---:|"]
        rows += [
            f"| {name} | {r['peak_mb']:,.0f} | {r['peak_mb'] / full['peak_mb']:.2f}x | {r['tokens_per_s']:,.0f} | "
            f"{r['step_s']:.2f} | {r['final_loss']:.4f} |"
            for name, r in results.items()
        ]
    else:
        results = {
            name: run(name, ["--optimizer", name, "--lr", str(lr)], args, model) for name, lr in OPTIMIZERS.items()
        }
        sgd = results["sgd"]["peak_mb"]
        rows = [header, "", "| optimizer | peak memory (MB) | vs sgd |", "|---|---:|---:|"]
        rows += [f"| {name} | {r['peak_mb']:,.0f} | {r['peak_mb'] / sgd:.2f}x |" for name, r in results.items()]
    table = "\n".join(rows)
    (out / f"table-{args.compare}.md").write_text(table + "\n")
    (out / f"results-{args.compare}.json").write_text(
        json.dumps(dict(args=vars(args), parameters=parameters, results=results))
    )
    print(table)


if __name__ == "__main__":
    main()
