# Sourced by the GPU scripts on the device machine: installs the carried wheels (.whl/, made
# by scripts/gpu_wheels.sh) and points Python at the source tree, one thread per process.
if [ -d .whl ] && [ "${SKIP_WHEELS:-0}" != 1 ]; then  # SKIP_WHEELS=1: a smoke test here
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export OMP_NUM_THREADS=1 MECHUNLEARN_THREADS=1
