#!/usr/bin/env bash
# What a session lent a GPU runs first, in one go (~6-8 minutes on an H100, most of it Triton compiling):
# the GPU tests, the GEMV tile sweep, then decode of the 32-layer Mistral-7B shape, eager and graphed, for
# int4/int8/bf16, and int4 compiled. Each step has its own time limit, so one that hangs costs only its own.
# Run from the repository root: bash benchmarks/gpu_check.sh   (the device image has no mistral_common:
# --noconftest; the package runs from the working tree, not installed).
set -u
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 240 python3 -m pytest --noconftest -q tests/test_gpu.py tests/test_triton.py
timeout 150 python3 -m benchmarks.gemv_sweep
timeout 150 python3 -m benchmarks.gpu_bench
timeout 150 python3 -m benchmarks.gpu_bench --schemes int4 --compile
