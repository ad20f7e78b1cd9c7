#!/usr/bin/env bash
# Fresh machine -> results: install everything, then run the main job on the embedded
# default model (Gemma 3 270M): its knowledge of the shipped sports facts in completion and
# multiple-choice formats, and how many athletes it knows.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/mechunlearn models
.venv/bin/mechunlearn eval --model gemma3-270m --task sports --formats completion,mcq --out runs/quickstart
