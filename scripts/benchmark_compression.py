"""Measure PowerSGD on data-parallel gradients (-p ddp, 2 processes) and compressed backpropagation
between pipeline stages: what they send, what they cost, and what they do to the loss. Same seed, data
(the shipped sample) and schedule in every run.

    python scripts/benchmark_compression.py                 # bytes on `small`, loss curves on `tiny` (300 steps)
    python scripts/benchmark_compression.py --steps 100 -o runs/compression-quick
    python scripts/benchmark_compression.py --only backprop --backprop_config tiny --backprop_steps 150
    python scripts/benchmark_compression.py --link 100mbit,1gbit,10gbit,none --pp_link 100mbit,none   # as root

1. Bytes and compute (`--bytes_config`, default small): one run whose first steps all-reduce exactly
   and whose last steps compress, so both byte counts come from the same hook, counted where sent.
2. Loss curves (`--config`, default tiny): uncompressed, PowerSGD rank R with error feedback, and
   without; the final loss is the mean of the last 20 steps.
3. Selective stage compression (`--bytes_config`, pp 2 x dp 2, 4 processes, --compress_stages 1): each
   stage's bytes per step, from each rank's own counters.
3b. Compressed backpropagation (`--only backprop` runs just this; `--backprop_config`, default
   `--bytes_config`, pp 2 x dp 2, 4 processes, 4 micro-batches a step, `--backprop_steps`, default 4): the
   pipeline backward bytes per step, exact vs --compress_backprop R and its epilogue-only form (both
   counts from the same counters, where sent), and the final losses.
4. A time model, stated as such: step = compute + compression + ring all-reduce bytes / link
   (2 (W-1)/W of the payload per rank, no overlap with backward), at 10, 25 and 100 Gb/s.

5. `--link RATES` (only this part; root, Linux): each rank on its own host, a private network
   namespace whose one link to a common switch is shaped to the rate in both directions
   (scripts/shaped_links.py; `none`: unshaped). At each rate, `--link_steps` steps (default 8, the first 2
   exact in every run) of `--bytes_config` under ddp (2 hosts) uncompressed and with PowerSGD, and under
   pp 2 x dp 2 (4 hosts, at the `--pp_link` rates) uncompressed, with selective stage compression (SC,
   --compress_stages 1) and with SC plus compressed backpropagation (CB): rank 0's median step time over
   the steps after the exact ones (from the run's own step times), the speedup over uncompressed, the
   loss gap at the last step, and for ddp the time model beside it, fed with the PowerSGD run's own
   compute, compression and bytes on that link and the link's measured TCP rate. Writes
   OUT/results.json, OUT/table.md and OUT/speedup_vs_link.png after each rate.

Writes OUT/results.json, OUT/table.md and the loss-curve PNG (--plot).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from shaped_links import Hosts, measure_throughput, parse_rate

from llama_recipe.metrics import read_scalars

REPO = Path(__file__).resolve().parent.parent
LINKS_GBPS = (10, 25, 100)
TAIL = 20
VARIANTS = {  # label: pretrain.py flags
    "uncompressed": [],
    "PowerSGD + error feedback": ["--grad_compression", "powersgd"],
    "PowerSGD, no error feedback": ["--grad_compression", "powersgd", "--powersgd_no_error_feedback"],
}


def pretrain(out: Path, flags: list[str], threads: int) -> Path:
    """Run pretrain.py on 2 processes; returns its TensorBoard directory."""
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "pretrain.py",
               "-p", "ddp", "-d", str(REPO / "data" / "redpajama-sample"), "-i", "0", "-o", str(out / "checkpoints"),
               "-t", str(out / "tensorboard"), *flags]  # fmt: skip
    print(" ".join(command[4:]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "w") as log:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return out / "tensorboard"


def measure_bytes(args: argparse.Namespace) -> dict:
    """Steps 1-3 exact, 4-6 compressed (warm-up 0.5 of 6 steps); the first step of each is left out of times."""
    flags = ["-c", args.bytes_config, "-l", str(args.max_length), "-b", "1", "--max_steps", "6", "-s", "0",
             "--grad_compression", "powersgd", "--powersgd_rank", str(args.rank), "--powersgd_warmup", "0.5"]  # fmt: skip
    tb = pretrain(Path(args.out) / f"bytes-{args.bytes_config}", flags, args.threads)
    scalar = {tag: read_scalars(tb, f"comm/{tag}") for tag in ("dp_bytes_sent", "compress_seconds", "wait_seconds")}
    tokens_per_s = read_scalars(tb, "train/tokens_per_s")
    seconds = {s: 2 * args.max_length / tokens_per_s[s] for s in tokens_per_s}  # 2 replicas x 1 row
    exact, compressed = (2, 3), (5, 6)
    mean = lambda tag, steps: statistics.mean(scalar[tag][s] for s in steps)  # noqa: E731
    return dict(
        config=args.bytes_config, rank=args.rank, seq_len=args.max_length,
        bytes_exact=int(scalar["dp_bytes_sent"][1]), bytes_compressed=int(scalar["dp_bytes_sent"][6]),
        compress_seconds=mean("compress_seconds", compressed),
        step_seconds_exact=statistics.mean(seconds[s] for s in exact),
        step_seconds_compressed=statistics.mean(seconds[s] for s in compressed),
        compute_seconds=statistics.mean(seconds[s] - scalar["wait_seconds"][s] for s in exact),
    )  # fmt: skip


PIPELINE = ["-p", "hybrid_parallel", "--pp", "2", "-l", "128", "--mbs", "1", "-s", "0", "-o", "", "-t", ""]
STAGE_FLAGS = [*PIPELINE, "--compress_stages", "1", "-b", "2", "--max_steps", "4", "--grad_compression", "powersgd",
               "--powersgd_warmup", "0.5"]  # fmt: skip
BACKPROP_VARIANTS = {  # label: flags (R appended to --compress_backprop)
    "uncompressed": [],
    "CB": ["--compress_backprop"],
    "CB, epilogue only": ["--compress_backprop_epilogue_only", "--compress_backprop"],
}


def stage_probe(out: Path, config: str, flags: list[str]) -> None:
    """Under torchrun, or one process per host of `run_probe(hosts=...)`: train `config` with `flags` and
    write this rank's pipeline stage (0 without a pipeline), per-step byte counters, step times and
    losses to OUT/rank<R>.json."""
    import torch.distributed as dist

    import llama_recipe.recipes as recipes
    from llama_recipe.cli import parse_args
    from llama_recipe.validation import validate

    cfg = parse_args("pretrain", ["-c", config, "-d", str(REPO / "data" / "redpajama-sample"), *flags])
    validate(cfg, int(os.environ["WORLD_SIZE"]))
    layouts = []
    build = recipes.build_parallelism
    recipes.build_parallelism = lambda c: layouts.append(build(c)) or layouts[-1]  # to read this rank's stage
    summary = recipes.pretrain(cfg)
    stages = getattr(layouts[0].plugin, "stage_manager", None)
    (out / f"rank{dist.get_rank()}.json").write_text(
        json.dumps(dict(stage=int(stages.stage) if stages else 0, communication=summary["communication"],
                        losses=summary["losses"], step_seconds=summary["step_seconds"]))
    )  # fmt: skip


def run_probe(
    args: argparse.Namespace, name: str, flags: list[str], config: str | None = None, hosts: Hosts | None = None
) -> list[dict]:
    """`stage_probe` with `flags` on 4 processes under torchrun, or on one process per host of `hosts`
    (each in its own network namespace, rendezvous at host 0); each rank's results, by rank."""
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    probe = [
        __file__,
        "--stage_probe",
        str(out),
        "--bytes_config",
        config or args.bytes_config,
        "--probe_flags",
        json.dumps(flags),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    with open(out / "log.txt", "w") as log:
        if hosts is None:
            command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "4", *probe]
            print(" ".join(command[4:]), flush=True)
            subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
        else:
            print(f"{hosts.rate}: {' '.join(flags)}", flush=True)
            world = len(hosts.names)
            env |= dict(
                WORLD_SIZE=str(world),
                LOCAL_RANK="0",
                LOCAL_WORLD_SIZE="1",
                MASTER_ADDR=hosts.addresses[0],
                MASTER_PORT="29500",
                GLOO_SOCKET_IFNAME="eth0",
            )
            ranks = [
                subprocess.Popen(
                    hosts.command(r, [sys.executable, *probe]),
                    cwd=REPO,
                    env=env | dict(RANK=str(r)),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                for r in range(world)
            ]
            if any([rank.wait() for rank in ranks]):
                raise SystemExit(f"{name} failed: see {out / 'log.txt'}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(len(hosts.names) if hosts else 4)]


def measure_stages(args: argparse.Namespace) -> dict:
    """Selective stage compression on `--bytes_config`: each stage's bytes per step, exact and compressed."""
    stages = {}
    for probe in run_probe(args, f"stages-{args.bytes_config}", [*STAGE_FLAGS, "--powersgd_rank", str(args.rank)]):
        steps = probe["communication"]
        stages[probe["stage"]] = dict(bytes_exact=steps[0]["bytes_sent"], bytes_step_4=steps[-1]["bytes_sent"])
    return dict(config=args.bytes_config, compress_stages=1, pp=2, dp=2, stages=stages)


def measure_backprop(args: argparse.Namespace) -> dict:
    """Compressed backpropagation on `--backprop_config`, pp 2 x dp 2, -b 4 (4 micro-batches a step): the
    bytes one pipeline sends backward per step (rank 0's TensorBoard sums over its stages; here from
    each stage-1 rank's own counters) and the losses, per variant."""
    config, steps = args.backprop_config or args.bytes_config, args.backprop_steps
    flags = [*PIPELINE, "-b", "4", "--max_steps", str(steps), "-s", str(steps // 10), "--seed", str(args.seed),
             "--lr", str(args.lr)]  # fmt: skip
    rows = {}
    for label, extra in BACKPROP_VARIANTS.items():
        name = f"backprop-{config}-" + label.replace(" ", "_").replace(",", "")
        probes = run_probe(args, name, [*flags, *extra, *([str(args.rank)] if extra else [])], config)
        sender = next(p for p in probes if p["stage"] == 1)  # (stage 0 sends nothing backward)
        counts = sender["communication"]  # empty uncompressed (no counters): CB's count the exact bytes too
        rows[label] = dict(losses=sender["losses"], bytes_sent=[c["pp_backward_bytes_sent"] for c in counts],
                           bytes_uncompressed=[c["pp_backward_bytes_uncompressed"] for c in counts])  # fmt: skip
    return dict(config=config, rank=args.rank, pp=2, dp=2, micro_batches=4, seq_len=128, steps=steps, variants=rows)


def backprop_table(b: dict) -> str:
    """Pipeline backward bytes per step (one pipeline: stage 1's sends) and the losses, per variant."""
    exact = b["variants"]["CB"]["bytes_uncompressed"][-1]
    lines = [f"`{b['config']}`, pp {b['pp']} x dp {b['dp']}, {b['micro_batches']} micro-batches of 1 x {b['seq_len']} "
             f"a step, rank {b['rank']}, {b['steps']} steps", "",
             f"| run | backward bytes per step | ratio | final loss (mean of the last {TAIL} steps) | gap |",
             "|---|---|---|---|---|"]  # fmt: skip
    base = statistics.mean(b["variants"]["uncompressed"]["losses"][-TAIL:])
    for label, row in b["variants"].items():
        sent = row["bytes_sent"][-1] if row["bytes_sent"] else exact  # uncompressed: no counters, CB's exact count
        final = statistics.mean(row["losses"][-TAIL:])
        lines.append(
            f"| {label} | {sent:,} | {exact / sent:.1f}x | {final:.4f} | {100 * (final - base) / base:+.2f}% |"
        )
    return "\n".join(lines)


def time_model(m: dict, world: int = 2) -> list[dict]:
    """Step time at each link speed: compute + (compression) + ring all-reduce bytes / bandwidth."""
    wire = 2 * (world - 1) / world
    rows = []
    for gbps in LINKS_GBPS:
        bandwidth = gbps * 1e9 / 8
        exact = m["compute_seconds"] + wire * m["bytes_exact"] / bandwidth
        compressed = m["compute_seconds"] + m["compress_seconds"] + wire * m["bytes_compressed"] / bandwidth
        rows.append(dict(gbps=gbps, exact_s=exact, compressed_s=compressed, speedup=exact / compressed))
    saved = wire * (m["bytes_exact"] - m["bytes_compressed"])
    m["break_even_gbps"] = saved / m["compress_seconds"] * 8 / 1e9  # below this link speed compression wins
    return rows


EXACT_STEPS = 2  # PowerSGD's shortest exact warm-up: step times and losses are compared after it


def link_layouts(args: argparse.Namespace) -> dict[str, tuple[int, list[str], dict[str, list[str]]]]:
    """--link's runs: layout -> (hosts, flags, {variant: its flags}); `--link_steps` steps each, the first
    EXACT_STEPS all-reduced exactly in every variant."""
    steps = ["--max_steps", str(args.link_steps), "--lr", str(args.lr), "--seed", str(args.seed)]
    powersgd = [
        "--grad_compression",
        "powersgd",
        "--powersgd_rank",
        str(args.rank),
        "--powersgd_warmup",
        str(EXACT_STEPS / args.link_steps),
    ]
    stages = [*powersgd, "--compress_stages", "1"]
    return {
        "ddp": (
            2,
            ["-p", "ddp", "-l", "128", "-b", "1", "-s", "0", "-o", "", "-t", "", *steps],
            {"uncompressed": [], "PowerSGD": powersgd},
        ),
        "pp2 x dp2": (
            4,
            [*PIPELINE, "-b", "4", *steps],
            {"uncompressed": [], "SC": stages, "SC + CB": [*stages, "--compress_backprop", str(args.rank)]},
        ),
    }


def summarize(probes: list[dict]) -> dict:
    """One run on shaped links: rank 0's median step time after the exact warm-up, the last stage's
    final loss and, where compressed, rank 0's median counters over the same steps."""
    rank0, last = probes[0], max(probes, key=lambda p: p["stage"])
    row = dict(
        step_seconds=statistics.median(rank0["step_seconds"][EXACT_STEPS:]),
        final_loss=last["losses"][-1],
        step_seconds_all=rank0["step_seconds"],
        losses=last["losses"],
    )
    counts = rank0["communication"][EXACT_STEPS:]
    if counts:
        median = lambda key: statistics.median(c[key] for c in counts)  # noqa: E731
        row |= {key: median(key) for key in ("bytes_sent", "bytes_uncompressed", "compress_seconds", "wait_seconds")}
        row["compute_seconds"] = statistics.median(
            t - c["wait_seconds"] - c["compress_seconds"]
            for t, c in zip(rank0["step_seconds"][EXACT_STEPS:], counts, strict=True)
        )
        row["stage_bytes_sent"] = {p["stage"]: p["communication"][-1]["bytes_sent"] for p in probes}
    return row


def link_model(run: dict, bits_per_s: float) -> dict:
    """The time model at one link rate for -p ddp on 2 hosts (a ring all-reduce puts the payload once on
    each link), from the PowerSGD run's own figures on that link: compute (step less the all-reduces
    and compression), compression, and both byte counts; only the transfer time is modelled."""
    exact = run["compute_seconds"] + 8 * run["bytes_uncompressed"] / bits_per_s
    compressed = run["compute_seconds"] + run["compress_seconds"] + 8 * run["bytes_sent"] / bits_per_s
    return dict(exact_s=exact, compressed_s=compressed, speedup=exact / compressed)


def measure_links(args: argparse.Namespace) -> list[dict]:
    """Every layout's variants on hosts joined by links of each --link rate (scripts/shaped_links.py);
    results.json and table.md are rewritten after each rate."""
    results = []
    for rate in args.link:
        for layout, (world, flags, variants) in link_layouts(args).items():
            if layout != "ddp" and rate not in args.pp_link:
                continue
            with Hosts(world, rate) as hosts:
                measured = measure_throughput(hosts, 32 << 20 if (parse_rate(rate) or 1e10) >= 1e9 else 8 << 20)
                print(f"{layout} on {rate} links: one TCP stream measured {measured / 1e6:,.0f} Mbit/s", flush=True)
                runs = {}
                for label, extra in variants.items():
                    name = f"link-{rate}-{layout.replace(' ', '')}-{label.replace(' + ', '+')}"
                    runs[label] = summarize(run_probe(args, name, [*flags, *extra], hosts=hosts))
            row = dict(layout=layout, rate=rate, measured_bits_per_s=measured, runs=runs)
            if layout == "ddp":
                row["model"] = link_model(runs["PowerSGD"], measured)
            results.append(row)
            write_links(args, results)
    return results


def link_table(results: list[dict]) -> str:
    """Measured step times and speedups per link, the ddp time model beside them, and the loss gaps."""
    lines = []
    for layout in ("ddp", "pp2 x dp2"):
        rows = [r for r in results if r["layout"] == layout]
        if not rows:
            continue
        labels = [k for k in rows[0]["runs"] if k != "uncompressed"]
        head = [
            "link (tbf rate)",
            "one TCP stream",
            "step, uncompressed",
            *(f"step, {k}" for k in labels),
            *(f"speedup, {k}" for k in labels),
            *(["speedup, model"] if layout == "ddp" else []),
            *(f"loss gap, {k}" for k in labels),
        ]
        lines += [f"**{layout}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            base = r["runs"]["uncompressed"]
            cells = [r["rate"], f"{r['measured_bits_per_s'] / 1e6:,.0f} Mbit/s", f"{base['step_seconds']:.2f} s"]
            cells += [f"{r['runs'][k]['step_seconds']:.2f} s" for k in labels]
            cells += [f"**{base['step_seconds'] / r['runs'][k]['step_seconds']:.2f}x**" for k in labels]
            cells += [f"{r['model']['speedup']:.2f}x"] if layout == "ddp" else []
            cells += [f"{100 * (r['runs'][k]['final_loss'] / base['final_loss'] - 1):+.2f}%" for k in labels]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_links(results: list[dict], path: Path) -> None:
    """Speedup against the link's measured rate: each compressed variant measured, and the ddp model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for layout, marker in (("ddp", "o"), ("pp2 x dp2", "s")):
        rows = sorted((r for r in results if r["layout"] == layout), key=lambda r: r["measured_bits_per_s"])
        for label in [k for k in (rows[0]["runs"] if rows else {}) if k != "uncompressed"]:
            x = [r["measured_bits_per_s"] / 1e9 for r in rows]
            y = [r["runs"]["uncompressed"]["step_seconds"] / r["runs"][label]["step_seconds"] for r in rows]
            ax.plot(x, y, marker=marker, label=f"{layout}, {label}: measured")
        if layout == "ddp" and rows:
            ax.plot(
                [r["measured_bits_per_s"] / 1e9 for r in rows],
                [r["model"]["speedup"] for r in rows],
                "k--",
                marker="x",
                label="ddp, PowerSGD: time model",
            )
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("link rate, one TCP stream measured (Gbit/s)")
    ax.set_ylabel("speedup of the step over uncompressed")
    ax.set_title("small, fp32, 2-core CPU: each rank on its own shaped full-duplex link", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_links(args: argparse.Namespace, results: list[dict]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(dict(links=results, args=vars(args)), indent=1))
    (out / "table.md").write_text(link_table(results))
    plot_links(results, out / "speedup_vs_link.png")


def loss_curves(args: argparse.Namespace) -> dict[str, dict[int, float]]:
    common = ["-c", args.config, "-l", str(args.max_length), "-b", str(args.batch_size), "--lr", str(args.lr),
              "-s", str(args.warmup_steps), "--max_steps", str(args.steps), "--powersgd_rank", str(args.rank),
              "--powersgd_warmup", str(args.powersgd_warmup), "--seed", str(args.seed)]  # fmt: skip
    curves = {}
    for label, flags in VARIANTS.items():
        out = Path(args.out) / label.replace(" ", "_").replace(",", "").replace("+", "plus")
        curves[label] = read_scalars(pretrain(out, [*common, *flags], args.threads))
    return curves


def plot(curves: dict[str, dict[int, float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, losses in curves.items():
        steps = sorted(losses)
        smooth = [statistics.mean(losses[t] for t in steps[max(0, i - 9) : i + 1]) for i in range(len(steps))]
        ax.plot(steps, smooth, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean of the last 10 steps)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(m: dict, rows: list[dict], finals: dict[str, float]) -> str:
    base = finals["uncompressed"]
    lines = ["| run | final loss (mean of last 20) | gap to uncompressed |", "|---|---|---|"]
    lines += [f"| {k} | {v:.4f} | {100 * (v - base) / base:+.2f}% |" for k, v in finals.items()]
    lines += ["", f"`{m['config']}`, rank {m['rank']}: {m['bytes_exact']:,} bytes per step uncompressed, "
              f"{m['bytes_compressed']:,} compressed (ratio {m['bytes_exact'] / m['bytes_compressed']:.1f}x); "
              f"compression {m['compress_seconds'] * 1e3:.1f} ms per step; compute {m['compute_seconds']:.3f} s "
              f"per step; break-even link {m['break_even_gbps']:.1f} Gb/s", "",
              "| link | step, exact all-reduce | step, PowerSGD | speedup |", "|---|---|---|---|"]  # fmt: skip
    lines += [
        f"| {r['gbps']} Gb/s | {r['exact_s']:.3f} s | {r['compressed_s']:.3f} s | {r['speedup']:.2f}x |" for r in rows
    ]
    return "\n".join(lines)


def rate_list(text: str) -> list[str]:
    """'100mbit,1gbit,none' -> its rates, each checked (argparse reports a bad one and exits 2)."""
    rates = text.split(",")
    for rate in rates:
        try:
            parse_rate(rate)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="tiny", help="model of the loss curves")
    parser.add_argument("--bytes_config", default="small", help="model of the byte and compute measurement")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("-l", "--max_length", type=int, default=128)
    parser.add_argument("-b", "--batch_size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup_steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--powersgd_warmup", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("-o", "--out", default="runs/compression")
    parser.add_argument("--plot", default="docs/compression_loss_curves.png")
    parser.add_argument(
        "--backprop_config", help="model of the compressed-backpropagation runs (default: --bytes_config)"
    )
    parser.add_argument("--backprop_steps", type=int, default=4, help="steps of each compressed-backpropagation run")
    parser.add_argument("--only", choices=["stages", "backprop"], help="run one part only")
    parser.add_argument(
        "--link", type=rate_list, help="only the runs on shaped links, at these rates (e.g. 100mbit,1gbit,none)"
    )
    parser.add_argument("--pp_link", type=rate_list, help="the rates of --link that also run pp2 x dp2 (default: all)")
    parser.add_argument(
        "--link_steps", type=int, default=8, help=f"steps of each --link run ({EXACT_STEPS} exact first)"
    )
    parser.add_argument("--stage_probe", help=argparse.SUPPRESS)  # (the 4-process runs of run_probe)
    parser.add_argument("--probe_flags", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage_probe:
        return stage_probe(Path(args.stage_probe), args.bytes_config, json.loads(args.probe_flags))
    if args.link:
        args.pp_link = args.pp_link or args.link
        if args.link_steps <= EXACT_STEPS or not set(args.pp_link) <= set(args.link):
            parser.error(f"--link_steps must exceed {EXACT_STEPS}, and --pp_link's rates be among --link's")
        print(link_table(measure_links(args)))
        return
    backprop = measure_backprop(args) if args.only in (None, "backprop") else None
    if backprop:
        print(backprop_table(backprop))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"backprop-{backprop['config']}.json").write_text(json.dumps(backprop, indent=1))
    if args.only == "backprop":
        return
    stages = measure_stages(args)
    print(json.dumps(stages))
    if args.only == "stages":
        return
    measured = measure_bytes(args)
    rows = time_model(measured)
    curves = loss_curves(args)
    finals = {k: statistics.mean(v[s] for s in sorted(v)[-TAIL:]) for k, v in curves.items()}
    plot(curves, args.plot, f"{args.config}, -p ddp x2, -l {args.max_length} -b {args.batch_size}, rank {args.rank}, "
         f"{args.powersgd_warmup:g} of {args.steps} steps exact first")  # fmt: skip
    text = table(measured, rows, finals)
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "table.md").write_text(text + "\n")
    results = dict(
        bytes=measured,
        stages=stages,
        backprop=backprop,
        time_model=rows,
        final_losses=finals,
        curves=curves,
        args=vars(args),
    )
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
