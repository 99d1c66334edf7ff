"""Serve a trained model over HTTP: OpenAI's completions API and Megatron-LM's PUT /api.

python serve.py checkpoint/latest                 (http://127.0.0.1:8000, this machine only)
python serve.py exported/llama-tiny --port 5000 --host 0.0.0.0

curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
     -d '{"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}'
curl -X PUT http://127.0.0.1:8000/api -H 'Content-Type: application/json' \
     -d '{"prompts": ["Once upon a time"], "tokens_to_generate": 32, "top_k": 1}'
"""

import argparse
import sys

from llama_recipe.errors import EXIT_USAGE, OneLineErrorParser, UsageError


def main() -> None:
    p: argparse.ArgumentParser = OneLineErrorParser(prog="serve.py", description=__doc__.splitlines()[0])
    p.add_argument(
        "model",
        help="a step-<N> checkpoint, a run's directory or its `latest` file, an exported model directory or a hub name",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's own)")
    p.add_argument("--max_tokens_cap", type=int, default=1024, help="the most tokens one request may generate")
    args = p.parse_args()
    if not 0 <= args.port <= 65535 or args.max_tokens_cap < 1:
        p.error("--port must lie in 0..65535 and --max_tokens_cap be at least 1")

    import uvicorn

    from llama_recipe.cli import quiet_libraries
    from llama_recipe.server import load_server

    quiet_libraries()
    try:
        server = load_server(args.model, args.tokenizer, args.max_tokens_cap)
    except UsageError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(EXIT_USAGE)
    print(
        f"serving {args.model} on http://{args.host}:{args.port}: POST /v1/completions, PUT /api, GET /health",
        flush=True,
    )
    uvicorn.run(server.app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
