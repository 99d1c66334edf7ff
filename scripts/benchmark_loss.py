"""Peak memory and tokens/s of training steps with the chunked loss and with the plain one, side by side.

    python scripts/benchmark_loss.py -c small -l 2048 -b 2 --steps 3

Each loss runs in a fresh process (so neither inherits the other's freed memory): the model and
AdamW, one warm-up step (the optimizer state now exists), then the peak is reset and `--steps`
timed steps run. Reported per loss: the whole process's peak (CUDA max allocated, or peak RSS on
CPU), the peak above what the process held before the timed steps (weights and optimizer state:
what a step itself adds — activations, logits, gradients), and tokens/s. The losses must agree.
"""

import argparse
import json
import subprocess
import sys
import time

import torch

from llama_recipe.metrics import peak_memory_mb, reset_peak_memory
from llama_recipe.model import build_model, get_model_config


def current_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def measure(args: argparse.Namespace, chunked: bool) -> dict:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = get_model_config(args.config)
    model = build_model(config, chunked_loss=chunked).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.max_length), device=device)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    losses = [step()]
    before = current_memory_mb()
    reset_peak_memory()
    started = time.perf_counter()
    losses += [step() for _ in range(args.steps)]
    seconds = time.perf_counter() - started
    peak = peak_memory_mb()
    tokens_per_s = args.steps * ids.numel() / seconds
    return dict(chunked=chunked, peak_mb=peak, step_peak_mb=peak - before, tokens_per_s=tokens_per_s, losses=losses)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-c", "--config", default="small")
    p.add_argument("-l", "--max_length", type=int, default=2048)
    p.add_argument("-b", "--batch_size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child", choices=["chunked", "plain"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args, args.child == "chunked")))
        return
    rows = {}
    for mode in ("plain", "chunked"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", mode], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    plain, chunked = rows["plain"], rows["chunked"]
    for mode, row in rows.items():
        print(f"{mode:8} peak {row['peak_mb']:8,.0f} MB   a step's own peak {row['step_peak_mb']:8,.0f} MB   "
              f"{row['tokens_per_s']:8,.1f} tokens/s   losses {[round(x, 5) for x in row['losses']]}")  # fmt: skip
    print(
        f"chunked vs plain: peak {chunked['peak_mb'] / plain['peak_mb']:.2f}x, a step's own peak "
        f"{chunked['step_peak_mb'] / plain['step_peak_mb']:.2f}x, tokens/s {chunked['tokens_per_s'] / plain['tokens_per_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
