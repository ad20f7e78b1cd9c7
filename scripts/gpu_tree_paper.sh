#!/usr/bin/env bash
# On a lent GPU machine: train the paper's configuration (recipe paper-n16) for TRAIN_SECONDS
# more, resuming runs/tree-paper/state when the call carries it, then evaluate the newest state
# and put what the next piece needs under $OUT:
#   $OUT/state/     the resumable state (model, optimizer, step): copy it back to
#                   runs/tree-paper/state here, and carry runs/tree-paper/state next time
#   $OUT/now.json   the exported state's step and held-out accuracy (500 trees per length)
#   $OUT/train.log, $OUT/export.log, $OUT/env.txt
# The call, from this machine (after `bash scripts/gpu_wheels.sh` once):
#   run(command="OUT=$OUT bash scripts/gpu_tree_paper.sh", carry=[".whl", "runs/tree-paper/state"],
#       timeout_s=560)
# DEVICE, TRAIN_ARGS (e.g. "--until 2") and PER_LENGTH exist for a smoke test on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
OUT=${OUT:-runs/gpu-tree-paper}
RUN=${RUN:-runs/tree-paper}
mkdir -p "$OUT"
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers',
transformers.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" \
    | tee "$OUT/env.txt" || exit 1

# A kill at the time limit loses at most the steps since the last checkpoint (written atomically).
timeout --signal=TERM "${TRAIN_SECONDS:-420}" python3 -m mechunlearn tree train \
    --config paper-n16 --out "$RUN" --resume --device "${DEVICE:-cuda}" ${TRAIN_ARGS:-} 2>&1 \
    | tr '\r' '\n' | grep --line-buffered -v '━' > "$OUT/train.log"
tail -n 5 "$OUT/train.log"
[ -f "$RUN/state/state.json" ] || { echo "no state was written" >&2; exit 1; }
python3 -m mechunlearn tree export --run "$RUN" --out "$RUN/now" --per-length "${PER_LENGTH:-500}" \
    > "$OUT/export.log" 2>&1 || { cat "$OUT/export.log"; exit 1; }
cat "$OUT/export.log"
mkdir -p "$OUT/state"
cp "$RUN"/state/* "$OUT/state/"
cp "$RUN/now/tree_model.json" "$OUT/now.json"
ls -la "$OUT" "$OUT/state"
