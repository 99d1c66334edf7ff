#!/usr/bin/env bash
# On a connected machine: a wheelhouse of everything the recipe needs beside torch, for an offline GPU
# node (CPython 3.12 on manylinux x86-64 by default), then its size and list. See scripts/wheelhouse.py
# and docs/gpu-validation.md.
#   bash scripts/gpu_wheelhouse.sh -o wheelhouse                          # the whole closure
#   bash scripts/gpu_wheelhouse.sh -o wheelhouse --node-freeze node.txt   # minus what the node has
#   (node.txt: `python3 -m pip list --format=freeze` run on the node)
# Options: --python 3.11 (or WHEELHOUSE_PYTHON=3.11), --glibc 2.34, --torch 2.11.0, --from-installed.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/wheelhouse.py" "$@"
