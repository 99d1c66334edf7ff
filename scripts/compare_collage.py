"""Pretrain the same small LLaMA four ways and compare the loss curves: fp32 AdamW, plain bf16 AdamW,
collage_light and collage_plus (same seed, data, steps and schedule). Writes a PNG of the curves,
a markdown table and the raw losses as JSON.

    python scripts/compare_collage.py                      # tiny model, 500 steps, beta2 0.999
    python scripts/compare_collage.py --beta2 0.95 --steps 200 -o runs/collage-0.95

fp32 AdamW computes in fp32; the other three store everything in bf16 and compute in bf16 (on
CPUs without native bf16 that is ~10x slower, so keep the model tiny there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llama_recipe.metrics import read_scalars

REPO = Path(__file__).resolve().parent.parent


VARIANTS = {  # label: pretrain.py flags
    "fp32 AdamW": ["-x", "fp32", "--optimizer", "adamw"],
    "bf16 AdamW": ["-x", "pure_bf16", "--optimizer", "adamw"],
    "collage_light": ["--optimizer", "collage_light"],
    "collage_plus": ["--optimizer", "collage_plus"],
}
TAIL = 20  # the final loss is the mean of the last TAIL steps, so one noisy batch does not decide


def run_variant(label: str, args: argparse.Namespace) -> dict[int, float]:
    out = Path(args.out) / label.replace(" ", "_")
    command = [
        sys.executable, "pretrain.py", "-p", "ddp", "-c", args.config, "-d", args.dataset,
        "-l", str(args.max_length), "-b", str(args.batch_size), "--lr", str(args.lr), "-s", str(args.warmup_steps),
        "--max_steps", str(args.steps), "--beta2", str(args.beta2), "--seed", str(args.seed),
        "-i", "0", "-o", str(out / "checkpoints"), "-t", str(out / "tensorboard"), *VARIANTS[label],
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    print(f"{label}: {' '.join(command[1:])}", flush=True)
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return read_scalars(out / "tensorboard")


def final_loss(losses: dict[int, float]) -> float:
    last = [losses[step] for step in sorted(losses)[-TAIL:]]
    return sum(last) / len(last)


def moving_average(values: list[float], window: int = 10) -> list[float]:
    """Single batches are noisy; this smooths them for the eye (the table uses raw losses)."""
    return [
        sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
        for i in range(len(values))
    ]


def plot(curves: dict[str, dict[int, float]], title: str, path: Path) -> None:
    """Left: the loss curves. Right: each curve minus fp32 AdamW's, where the differences show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (losses_ax, gap_ax) = plt.subplots(1, 2, figsize=(13, 4.5))
    reference = curves["fp32 AdamW"]
    for label, losses in curves.items():
        steps = sorted(losses)
        losses_ax.plot(steps, moving_average([losses[s] for s in steps]), label=label)
        gap_ax.plot(steps, moving_average([losses[s] - reference[s] for s in steps], 25), label=label)
    losses_ax.set_ylabel("training loss (moving average of 10 steps)")
    gap_ax.set_ylabel("loss minus fp32 AdamW's (moving average of 25 steps)")
    gap_ax.axhline(0, color="gray", linewidth=0.8)
    for ax in (losses_ax, gap_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-c", "--config", default="tiny")
    p.add_argument("-d", "--dataset", default=str(REPO / "data" / "redpajama-sample"))
    p.add_argument("-l", "--max_length", type=int, default=128)
    p.add_argument("-b", "--batch_size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup_steps", type=int, default=20)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--jobs", type=int, default=2, help="variants run side by side")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per variant")
    p.add_argument("-o", "--out", default="runs/collage")
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {label: pool.submit(run_variant, label, args) for label in VARIANTS}
        curves = {label: future.result() for label, future in futures.items()}

    final = {label: final_loss(losses) for label, losses in curves.items()}
    reference = final["fp32 AdamW"]
    rows = ["| optimizer | final loss (mean of last 20 steps) | vs fp32 AdamW |", "|---|---:|---:|"]
    rows += [f"| {label} | {loss:.4f} | {100 * (loss / reference - 1):+.2f}% |" for label, loss in final.items()]
    table = "\n".join(rows)
    title = f"{args.config}, {args.steps} steps, lr {args.lr}, beta2 {args.beta2}, batch {args.batch_size}x{args.max_length}"
    plot(curves, title, Path(args.out) / "loss_curves.png")
    (Path(args.out) / "results.json").write_text(
        json.dumps(dict(args=vars(args), final=final, losses=curves), indent=1)
    )
    (Path(args.out) / "table.md").write_text(table + "\n")
    print(f"{title}\n{table}\nwrote {args.out}/loss_curves.png, table.md, results.json")


if __name__ == "__main__":
    main()
