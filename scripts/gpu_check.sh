#!/usr/bin/env bash
# One-call GPU check, for a CUDA machine whose python3 has torch and the toolkit's dependencies
# (missing ones can be carried as wheels in .whl/). It runs the fast test suite with the
# tiny-model fixtures and the toolkit's default device on the GPU, then the tree trainer's
# throughput benchmark on the GPU (BENCH=0 skips it). Logs and JSON go to $OUT (default
# runs/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
source scripts/gpu_env.sh
export MECHUNLEARN_TEST_DEVICE=cuda
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers',
transformers.__version__, '|', torch.cuda.get_device_name())" | tee "$OUT/env.txt" || exit 1

timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -m "not slow" -p no:cacheprovider \
    -n "${WORKERS:-8}" -rfE tests >"$OUT/pytest.log" 2>&1
status=$?
tail -n 60 "$OUT/pytest.log"

[ "${BENCH:-1}" = 0 ] && exit "$status"
for model in cpu paper; do
    timeout 120 python3 bench/tree_train_speed.py --model "$model" --batch-size 1024 \
        --precision bf16 --steps 20 --warmup 3 --device cuda --json "$OUT/bench-$model.json"
done 2>&1 | tee "$OUT/bench.log"
exit "$status"
