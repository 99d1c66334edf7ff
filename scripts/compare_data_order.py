"""Does the recipe's data order train as well as shuffled rows? Side by side, on the same tokens.

    python scripts/compare_data_order.py              # about 20 minutes on 2 CPU cores
    python scripts/compare_data_order.py --steps 100  # a quicker look
    python scripts/compare_data_order.py --shuffle_buffer 16  # buffers far smaller than the files, as at scale

Every run trains the `tiny` preset from the same initial weights (seed 42) on the shipped sample
(data/redpajama-sample), rows of 512 tokens, 2,048 tokens per step, AdamW (lr 3e-3, betas 0.9/0.95,
epsilon pretrain.py's --adam_eps default, weight decay 0.1 on matrices, clipping at 1.0), 30 warmup
steps then cosine decay to 10%:

- plain loop: the PyTorch loop below, independent of the recipe: every document tokenized as
  BOS + text + EOS, all of them concatenated, cut into rows, the rows shuffled, 4 rows per step;
- recipe, ddp / zero2: `pretrain.py` on 2 processes (2 rows of 512 each), its default shuffled stream;
- recipe, file order: the same with `--shuffle_buffer 0 --shuffle_rows 0`, the order before shuffling existed.

Each model is then scored on the held-out text (data/heldout: Project Gutenberg #1661, which shares
no 50-character run with the training sample; tests/test_heldout.py) in bits per byte. Writes
OUT/table.md and OUT/results.json.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama_recipe.config import REPO_ROOT, SHIPPED_PRETRAIN_DATA, SHIPPED_TOKENIZER, TrainConfig
from llama_recipe.data import load_tokenizer
from llama_recipe.evaluate import eval_scores, evaluate_documents
from llama_recipe.model import MODEL_PRESETS
from llama_recipe.sources import resolve_local_files

HELD_OUT = REPO_ROOT / "data" / "heldout" / "sherlock_holmes_1661.jsonl"
SEQ_LEN, ROWS_PER_STEP, LR, WARMUP, SEED = 512, 4, 3e-3, 30, 42


def read_texts(paths: list[str]) -> list[str]:
    return [json.loads(line)["text"] for path in paths for line in open(path) if line.strip()]


def plain_loop(steps: int, tokenizer) -> LlamaForCausalLM:
    """Shuffled rows of the concatenated corpus, plain PyTorch."""
    torch.set_num_threads(2)
    ids = []
    for text in read_texts(resolve_local_files(str(SHIPPED_PRETRAIN_DATA))):
        ids += tokenizer(text, split_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    rows = torch.tensor(ids[: len(ids) // SEQ_LEN * SEQ_LEN]).view(-1, SEQ_LEN)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(SEED))
    torch.manual_seed(SEED)  # the recipe builds its model right after seeding the same way
    config = LlamaConfig(**MODEL_PRESETS["tiny"])
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    eps = TrainConfig.for_script("pretrain").optim.adam_eps  # the recipe runs' epsilon
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=eps)

    def factor(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / WARMUP
        progress = min(1.0, (step - WARMUP) / max(1, steps - WARMUP - 1))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    for step in range(steps):
        take = order[[(step * ROWS_PER_STEP + i) % len(rows) for i in range(ROWS_PER_STEP)]]
        batch = rows[take]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"  plain loop step {step + 1}: loss {loss.item():.4f}", flush=True)
    return model


def recipe(steps: int, out: Path, flags: list[str]) -> LlamaForCausalLM:
    """pretrain.py on 2 processes; the model of its final checkpoint."""
    command = [
        str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "pretrain.py",
        "-c", "tiny", "-d", str(SHIPPED_PRETRAIN_DATA), "-l", str(SEQ_LEN), "-b", str(ROWS_PER_STEP // 2),
        "--lr", str(LR), "-s", str(WARMUP), "--max_steps", str(steps), "--seed", str(SEED), "-i", "0",
        "-o", str(out), "-t", "", *flags,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"pretrain.py {' '.join(flags)} failed:\n{proc.stderr[-3000:]}")
    print("  " + next(line for line in proc.stdout.splitlines() if line.startswith("done:")), flush=True)
    return LlamaForCausalLM.from_pretrained(out / f"step-{steps}" / "model", torch_dtype=torch.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("-o", "--out", default="runs/data-order")
    p.add_argument(
        "--shuffle_buffer", type=int, default=None, help="the recipe runs' --shuffle_buffer (default: theirs)"
    )
    p.add_argument("--shuffle_rows", type=int, default=None, help="the recipe runs' --shuffle_rows (default: theirs)")
    p.add_argument(
        "--runs",
        default="plain,ddp,zero2,file_order",
        help="which runs, comma-separated; the others' results are kept from OUT/results.json when it has them",
    )
    args = p.parse_args()
    buffer = ["--shuffle_buffer", str(args.shuffle_buffer)] if args.shuffle_buffer is not None else []
    buffer += ["--shuffle_rows", str(args.shuffle_rows)] if args.shuffle_rows is not None else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(str(SHIPPED_TOKENIZER))
    held_out = read_texts([str(HELD_OUT)])
    runs = {
        "plain loop (shuffled rows)": lambda: plain_loop(args.steps, tokenizer),
        "recipe, ddp x2 (shuffled)": lambda: recipe(args.steps, out / "ddp", ["-p", "ddp", *buffer]),
        "recipe, zero2 x2 (shuffled)": lambda: recipe(args.steps, out / "zero2", ["-p", "zero2", *buffer]),
        "recipe, ddp x2, file order": lambda: recipe(args.steps, out / "file-order", ["-p", "ddp", "--shuffle_buffer", "0", "--shuffle_rows", "0"]),
    }  # fmt: skip
    keys = dict(zip(["plain", "ddp", "zero2", "file_order"], runs, strict=True))
    runs = {keys[key]: runs[keys[key]] for key in args.runs.split(",")}
    earlier = out / "results.json"
    results = json.loads(earlier.read_text()) if earlier.exists() else {}
    for name, train in runs.items():
        print(f"{name}:", flush=True)
        started = time.perf_counter()
        model = train()
        # windows of SEQ_LEN tokens that overlap by one: each token is scored once, as eval.py -l 511 does
        documents = ((text, None) for text in held_out)
        sums = evaluate_documents(model, tokenizer, documents, "perplexity", SEQ_LEN - 1, SEQ_LEN - 1, 1)
        scores = eval_scores(sums)
        results[name] = dict(scores, train_seconds=time.perf_counter() - started)
        print(f"  held-out bits per byte {scores['bits_per_byte']:.4f}, perplexity {scores['token_perplexity']:.1f}")
    base = results["plain loop (shuffled rows)"]["bits_per_byte"]
    lines = [
        f"| run ({args.steps} steps x 2,048 tokens) | held-out bits/byte | vs plain loop | token perplexity |",
        "|---|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['bits_per_byte']:.4f} | {100 * (r['bits_per_byte'] / base - 1):+.2f}% | {r['token_perplexity']:.1f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
