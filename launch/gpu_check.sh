#!/usr/bin/env bash
# The prepared accelerator check: every GPU figure the project records, in one command (lm/bench/gpu.py).
set -euo pipefail

usage() {
  cat <<'EOF_USAGE'
Usage: launch/gpu_check.sh [--smoke] [--out=DIR] [--sections=train,loss,attention,decode]

Runs python -m lm.bench.gpu from this checkout (no install needed) on the first device of the
current JAX backend and writes DIR/gpu_check.json and DIR/gpu_check.md (default DIR: gpu_check).
On one H100/H200-class GPU it takes at most 8 minutes; --smoke runs tiny shapes on any backend.
Needs JAX, flax, optax, orbax and numpy, and ml_collections: where the image lacks it, put its wheel
in .whl/ (pip download --no-deps ml_collections -d .whl) and it is installed into /tmp/lm_site
first. No TensorFlow, grain or tokenizers: the data is synthetic. Exits non-zero when a section
failed.

Options:
  --smoke        tiny shapes: checks the script's logic in seconds (CI runs it on the CPU)
  --out=DIR      where the JSON and markdown go
  --sections=..  a comma-separated subset of train, loss, attention, decode
  -h, --help     show this help

Example:
  bash launch/gpu_check.sh --out=$OUT
EOF_USAGE
}

for arg in "$@"; do
  if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
    usage
    exit 0
  fi
done

cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lm_site .whl/*.whl
  export PYTHONPATH="/tmp/lm_site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
exec python3 -m lm.bench.gpu "$@"
