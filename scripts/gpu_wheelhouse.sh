#!/usr/bin/env bash
# On a connected machine: a wheelhouse of everything the recipe needs beside torch, for an offline GPU
# node (CPython 3.12 on manylinux x86-64 by default), then its size and list. See scripts/wheelhouse.py
# and docs/gpu-validation.md.
#   bash scripts/gpu_wheelhouse.sh -o wheelhouse                          # the whole closure
#   bash scripts/gpu_wheelhouse.sh -o wheelhouse --node-freeze node.txt   # minus what the node has
#   (node.txt: `python3 -m pip list --format=freeze` run on the node)
# Options: --python 3.11 (or WHEELHOUSE_PYTHON=3.11), --glibc 2.34, --torch 2.11.0, --loose NAMES,
# --omit NAMES, --from-installed (this Python's own packages, no index). PYTHON=... picks the interpreter.
set -euo pipefail
PY=${PYTHON:-python3}
"$PY" -m pip --version >/dev/null 2>&1 || { echo "error: $PY has no pip: run with PYTHON=<a python with pip>" >&2; exit 2; }
exec "$PY" "$(dirname "$0")/wheelhouse.py" "$@"
