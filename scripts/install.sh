#!/usr/bin/env bash
# `make install`: a venv with the pinned CPU stack and llama_recipe (editable). uv installs the pins:
# it unpacks wheels in parallel (about 25 s on a 2-core machine, where pip takes 70 s); pip only
# bootstraps uv and installs our own package.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -qq uv==0.13.9  # -qq: not the warnings about indexes that lack uv

# uv reads no pip configuration: hand it the index settings pip has on this machine (pip.conf, PIP_*).
uv_flags=()
while IFS= read -r line; do
  key=${line%%=*} value=${line#*=}
  value=${value#\'} value=${value%\'}
  case ${key##*.} in
    index-url) uv_flags+=(--index-url "$value") ;;
    extra-index-url) for v in $value; do uv_flags+=(--extra-index-url "$v"); done ;;
    find-links) for v in $value; do uv_flags+=(--find-links "$v"); done ;;
    constraint) for v in $value; do uv_flags+=(--constraint "$v"); done ;;
  esac
done < <("$VENV/bin/pip" config list 2>/dev/null)

uv_install() {
  # unsafe-best-match: the best version from any index, as pip chooses (uv's default stops at the first)
  "$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" --index-strategy unsafe-best-match \
    "${uv_flags[@]}" "$@"
}
uv_install -r requirements.txt
# colossalai pins torch<=2.5.1 and ~100 packages; install it alone so the pinned stack stays as it is.
uv_install --no-deps -r requirements-colossalai.txt
# Byte-compiled once here on every core. A file that does not compile (a package's Python 2 test data)
# is left to import as source, as pip leaves it.
"$VENV/bin/python" -m compileall -q -j 0 "$VENV/lib" > /dev/null 2>&1 || true
# llama_recipe itself, editable as a plain path entry (compat): scripts and tests import this checkout.
"$VENV/bin/pip" install --quiet --no-deps --no-build-isolation --config-settings editable_mode=compat -e .
