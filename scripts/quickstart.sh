#!/usr/bin/env bash
# Fresh machine -> results: install everything, then run the main job on the embedded default
# model (Gemma 3 270M): the Mechanistic Unlearning comparison. Edit 16 known athletes to another
# sport, training only the weights each localization method selects (fact lookup, causal
# tracing, attribution patching, causal tracing on MLPs, random, all MLPs, everything) at equal
# parameter budget, then attack every edit (prompt formats, relearning, latent probes, soft
# prompt). One seed here; `--full` runs all three.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/mechunlearn models
.venv/bin/mechunlearn run sports-athlete-edit-16 --seeds 1 --out runs/quickstart "$@"
