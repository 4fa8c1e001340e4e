#!/usr/bin/env bash
# The GPU checks as one command, for a session lent a CUDA machine (the library's `device` tool runs a command in
# a copy of this tree, without network or pip, and brings back the files written under $OUT).
#
# Prepare here, once (the device has torch and an older transformers; this carries the version we test with,
# and a regex new enough for its import-time version check):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl transformers==5.24.0 regex==2026.11.19
#
# Then one device call: command `bash bench/device_check.sh`, carry [".whl"], timeout_s 600.
# It writes to $OUT: gpu.txt (GPU, versions), pytest.txt (the CUDA tests, skipped on CPUs: the fused GPU pieces
# against matrix products and against the masked path; padded batches on sdpa and flash-attn, bfloat16 cached keys
# against float64: tests/test_cuda.py), bench.txt + gpu.json (python -m bench.gpu, sized to end
# within about 7 minutes on an H200; the figures go to docs/bench.md section 6 and the README).
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "device_check: installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -rs tests/test_pieces.py tests/test_cuda.py 2>&1 | tail -n 40 | tee "$OUT/pytest.txt"
timeout 450 python3 -m bench.gpu --lengths 8192 16384 32768 --methods none dynamic_ntk consistent_ntk self_extend \
    --repeats 2 --warmup 1 --out "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.txt"
