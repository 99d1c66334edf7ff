"""Serve a trained model over HTTP: OpenAI's completions and chat APIs and Megatron-LM's PUT /api.

python serve.py checkpoint/latest                 (http://127.0.0.1:8000, this machine only)
python serve.py exported/llama-tiny --port 5000 --host 0.0.0.0

curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
     -d '{"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}'
curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
     -d '{"messages": [{"role": "user", "content": "Give three tips for staying healthy."}], "max_tokens": 32}'
curl -X PUT http://127.0.0.1:8000/api -H 'Content-Type: application/json' \
     -d '{"prompts": ["Once upon a time"], "tokens_to_generate": 32, "top_k": 1}'
"""

import argparse
import socket
import sys

from llama_recipe.errors import EXIT_USAGE, OneLineErrorParser, UsageError


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, for uvicorn to serve on. Bound first thing, before the imports
    and the model load, so that a port another program holds is refused at once (uvicorn's own bind
    comes after the load, and exits 3 with its own message)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's: a port just closed is free
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def main() -> None:
    p: argparse.ArgumentParser = OneLineErrorParser(prog="serve.py", description=__doc__.splitlines()[0])
    p.add_argument(
        "model",
        help="a step-<N> checkpoint, a run's directory or its `latest` file, an exported model directory or a hub name",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's own)")
    p.add_argument("--max_tokens_cap", type=int, default=1024, help="the most tokens one request may generate")
    args = p.parse_args()
    if not 0 <= args.port <= 65535 or args.max_tokens_cap < 1:
        p.error("--port must lie in 0..65535 and --max_tokens_cap be at least 1")

    try:
        sock = listening_socket(args.host, args.port)
    except OSError as e:  # (a busy port, an address not of this machine, a host name that does not resolve)
        p.error(
            f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); pass --port with a free port "
            "(0: any) or --host with an address of this machine"
        )

    import uvicorn

    from llama_recipe.cli import quiet_libraries
    from llama_recipe.server import load_server

    quiet_libraries()
    try:
        server = load_server(args.model, args.tokenizer, args.max_tokens_cap)
    except UsageError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(EXIT_USAGE)
    port = sock.getsockname()[1]  # (--port 0: the one the system chose)
    print(
        f"serving {args.model} on http://{args.host}:{port}: POST /v1/completions, POST /v1/chat/completions, "
        "GET /v1/models, PUT /api, GET /health",
        flush=True,
    )
    uvicorn.Server(uvicorn.Config(server.app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()
