"""Bar charts of benchmark.py results: tokens/s and peak memory per plugin, relative to `-p none`.

python scripts/plot_benchmarks.py runs/benchmarks_cpu.jsonl -o runs/benchmarks_cpu.png
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt


def label(row: dict) -> str:
    tp = f" tp{row['tp']}" if row["tp"] > 1 else ""
    pp = f" pp{row['pp']}" if row["pp"] > 1 else ""
    return f"{row['plugin']}{tp}{pp}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="a JSON-lines file written by benchmark.py --results")
    p.add_argument("-o", "--out", default="benchmarks.png")
    args = p.parse_args()
    rows = {}
    for line in open(args.results):
        row = json.loads(line)
        rows[label(row)] = row  # the latest run of each layout
    names = list(rows)
    baseline = rows.get("none", {}).get("tokens_per_s")

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    bars = speed.bar(names, [rows[n]["tokens_per_s"] for n in names], color="tab:blue")
    if baseline:
        speed.bar_label(bars, labels=[f"{rows[n]['tokens_per_s'] / baseline:.2f}x" for n in names])
    speed.set_ylabel("tokens/s (all processes)")
    speed.set_title("throughput, relative to plain PyTorch (none)")
    memory.bar(names, [rows[n]["peak_memory_mb"] for n in names], color="tab:orange")
    memory.set_ylabel("peak memory per process (MB)")
    memory.set_title("peak memory (CUDA allocated, or RSS on CPU)")
    first = next(iter(rows.values()))
    fig.suptitle(f"{first['config']}, {first['world_size']} processes, {first['precision']}, seq {first['seq_len']}")
    for ax in (speed, memory):
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
