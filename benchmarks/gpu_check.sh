#!/usr/bin/env bash
# The GPU check: tiderl's GPU paths on a CUDA machine that has torch and transformers but no Ray, in at most
# 8 minutes (docs/speed.md "GPU check"). Runs benchmarks/gpu_check.py; its JSON report goes to $OUT/gpu_check.json
# when $OUT is set (the device machine's output folder), else ./gpu_check.json.
#
#   benchmarks/gpu_check.sh --fetch-wheels   # here (with the registry): the packages the GPU machine lacks, as wheels
#   benchmarks/gpu_check.sh                  # on the GPU machine (carry .gpu_wheels with the working tree)
#   benchmarks/gpu_check.sh --cpu-dry-run    # the same code paths at tiny sizes on the CPU (< 60 s; tests run it)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fetch-wheels" ]]; then
    pip="${PIP:-.venv/bin/pip}"
    mkdir -p .gpu_wheels
    "$pip" download --quiet --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .gpu_wheels -r benchmarks/gpu_wheels.txt
    du -sh .gpu_wheels
    exit 0
fi
python="${PYTHON:-python3}"
if [[ -x .venv/bin/python && -z "${PYTHON:-}" ]]; then python=.venv/bin/python; fi
if [[ "${DEVICE:-}" == "cpu" ]]; then set -- --cpu-dry-run "$@"; fi
exec timeout "${GPU_CHECK_TIMEOUT_S:-480}" "$python" benchmarks/gpu_check.py "$@"
