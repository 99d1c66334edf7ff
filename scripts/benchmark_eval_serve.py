"""Measure eval.py's throughput (1 and 2 processes) and serve.py's latency (50 requests from 4
concurrent clients), for the `tiny` and `small` presets (random weights: speed depends on the
shape, not the values).

python scripts/benchmark_eval_serve.py                       # both presets -> a table on stdout
python scripts/benchmark_eval_serve.py --presets tiny --requests 20

Each model is saved once as a Hugging Face directory in a temporary folder. eval.py runs over the
shipped held-out text (-l 256, --limit 8); serve.py is started as a user would, on a free loopback
port, and asked for 32 greedy tokens per request.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from llama_recipe.config import SHIPPED_TOKENIZER
from llama_recipe.data import load_tokenizer
from llama_recipe.distributed import free_port
from llama_recipe.model import build_model, get_model_config
from llama_recipe.server import wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def save_model(preset: str, out: Path) -> Path:
    torch.manual_seed(0)
    build_model(get_model_config(preset)).save_pretrained(out, safe_serialization=True)
    load_tokenizer(str(SHIPPED_TOKENIZER)).save_pretrained(out)
    return out


def eval_throughput(model: Path, nproc: int, work: Path) -> dict:
    results = work / f"eval-{nproc}.jsonl"
    args = ["--model_path", str(model), "-l", "256", "--limit", "8", "--results", str(results)]
    launcher = (
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable]
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, os.cpu_count() // nproc)))
    started = time.perf_counter()
    subprocess.run([*launcher, str(ROOT / "eval.py"), *args], cwd=ROOT, env=env, check=True, capture_output=True)
    result = json.loads(results.read_text().splitlines()[-1])
    return dict(tokens=result["tokens"], tokens_per_s=result["tokens_per_s"], wall_s=time.perf_counter() - started)


def serve_latency(model: Path, requests: int, clients: int, max_tokens: int) -> dict:
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), str(model), "--port", str(port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url)
        prompts = [f"Request {i}: the adventure began when" for i in range(requests)]

        def ask(prompt: str) -> tuple[float, int]:
            started = time.perf_counter()
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            reply = httpx.post(f"{url}/v1/completions", json=body, timeout=600).json()
            return time.perf_counter() - started, reply["usage"]["completion_tokens"]

        ask(prompts[0])  # warm-up
        single = [ask(p)[0] for p in prompts[:5]]
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            done = list(pool.map(ask, prompts))
        wall = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=30)
    latencies = sorted(t for t, _ in done)
    return dict(
        single_request_s=statistics.median(single), p50_s=latencies[len(latencies) // 2],
        p99_s=latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        tokens_per_s=sum(n for _, n in done) / wall, requests_per_s=len(done) / wall,
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max_tokens", type=int, default=32)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            model = save_model(preset, Path(tmp) / preset)
            one, two = eval_throughput(model, 1, Path(tmp)), eval_throughput(model, 2, Path(tmp))
            print(f"{preset}: eval.py {one['tokens']:,} tokens: {one['tokens_per_s']:,.0f} tokens/s on 1 process, "
                  f"{two['tokens_per_s']:,.0f} on 2 ({two['tokens_per_s'] / one['tokens_per_s']:.2f}x)", flush=True)  # fmt: skip
            s = serve_latency(model, args.requests, args.clients, args.max_tokens)
            print(f"{preset}: serve.py {args.requests} requests x {args.max_tokens} tokens, {args.clients} clients: "
                  f"p50 {s['p50_s']:.2f} s, p99 {s['p99_s']:.2f} s, {s['tokens_per_s']:,.0f} tokens/s "
                  f"({s['requests_per_s']:.2f} requests/s); one request alone {s['single_request_s']:.2f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
