#!/usr/bin/env bash
# Build an offline wheelhouse for air-gapped GPU compute nodes (run it on a login node or any machine with
# internet), then install on the node with no network:
#
#   bash env/build_wheelhouse.sh [OUT_DIR=wheelhouse] [PYTHON_VERSION=3.11]
#   # copy OUT_DIR and this repo to the cluster, then on the node:
#   python -m venv .venv && . .venv/bin/activate
#   pip install --no-index --find-links OUT_DIR -e . && pip install --no-index --find-links OUT_DIR -r env/requirements-gpu.txt
set -euo pipefail
out=${1:-wheelhouse}
py=${2:-3.11}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
common=(--only-binary=:all: --python-version "$py" --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$out")
# The CPU/GPU-common set, with every transitive dependency resolved for the target platform.
pip download "${common[@]}" -r "$here/env/minimal_requirements.txt" pytest setuptools wheel
# Unsloth's set; --no-deps keeps the resolver from swapping torch / transformers.
pip download "${common[@]}" --no-deps -r "$here/env/requirements-gpu.txt"
pip download "${common[@]}" -r <(grep -vE '^(#|unsloth|bitsandbytes|trl)' "$here/env/requirements-gpu.txt"; \
  echo "dill"; echo "multiprocess"; echo "tyro"; echo "hf_transfer"; echo "sentencepiece"; echo "protobuf")
echo "wheelhouse ready: $out ($(ls "$out" | wc -l) files, $(du -sh "$out" | cut -f1))"
