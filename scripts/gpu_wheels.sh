#!/usr/bin/env bash
# Run HERE (not on the GPU machine): download into .whl/ the wheels of the toolkit's
# dependencies that the GPU image lacks (pydantic and its parts, gguf), at the versions this
# venv has, for the image's Python 3.12. The device tool carries .whl/ when a call names it in
# `carry`; scripts/gpu_env.sh installs them there. .whl/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
mkdir -p .whl
for name in pydantic pydantic_core annotated-types typing-inspection gguf; do
    version=$("$PIP" show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')
    [ -n "$version" ] || { echo "error: $name is not installed in this venv" >&2; exit 1; }
    "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$name==$version"
done
ls .whl
