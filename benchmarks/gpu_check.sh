#!/usr/bin/env bash
# What a session lent a GPU runs, the most wanted first, within its ~15 minutes of device time (a machine's
# start ~30 s a call). Steps: int4 (32-layer Mistral-7B-shape int4 decode: eager; graphed, the issue's target;
# graphed without PDL, not decoding ahead, float activations; prefill at 16, 128 and 1024 tokens; ~75 s on an
# H200), tests (tests/test_gpu.py and tests/test_triton.py compiled for the GPU: over 150 s), tune (the int4
# GEMV tile sweep, then decode on its best tiles and on each shape's best: ~5 min), sweep alone, others (int8/bf16), compile (int4 under torch.compile), wide
# (int5/int6: a Q5 or Q6_K file's layouts), cli (`lilmistral bench` and `run` on the GPU, on a small model
# made here and carried: benchmarks/gpu_cli_model.py). Each step has its own time limit, so one that hangs costs only
# its own, and writes its log under $OUT as it goes (what a cut-off call still returns). Steps can be named
# to run only some: bash benchmarks/gpu_check.sh int4 tests
# Run from the repository root (the device image has no mistral_common: --noconftest; the package runs from
# the working tree, not installed).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
steps=${*:-"int4 tests tune others compile wide"}

step() {  # name, seconds, command...
    local name=$1 seconds=$2
    shift 2
    echo "== $name (limit ${seconds}s)"
    timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $?"
    tail -n 40 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for s in $steps; do
    case $s in
        int4) step int4 300 python3 -m benchmarks.gpu_bench --schemes int4 ;;
        tests) step tests 300 python3 -m pytest --noconftest -q --maxfail=20 tests/test_gpu.py tests/test_triton.py ;;
        sweep) step sweep 150 python3 -m benchmarks.gemv_sweep --scheme int4 ;;
        tune)  # the sweep (1 warp: ~2 minutes), then 32-layer int4 decode on its best tiles, and on each
               # shape's best (wo, wqkv, w1/w3 and w2 each at their own)
            step sweep 240 python3 -m benchmarks.gemv_sweep --scheme int4
            best=$(tail -n 1 "$OUT/sweep.log" | grep -E '^int4=[0-9,]+( int4@[0-9x]+=[0-9,]+)*$' || echo int4=512,64,1)
            step tuned 120 python3 -m benchmarks.gpu_bench --schemes int4 --no-kernels --variants --tiles "${best%% *}"
            # shellcheck disable=SC2086  # one --tiles value a word
            step shaped 120 python3 -m benchmarks.gpu_bench --schemes int4 --no-kernels --variants --tiles $best ;;
        others) step others 120 python3 -m benchmarks.gpu_bench --schemes int8 bf16 ;;
        compile) step compile 150 python3 -m benchmarks.gpu_bench --schemes int4 --compile ;;
        wide) step wide 150 python3 -m benchmarks.gpu_bench --schemes int5 int6 ;;
        cli) step cli 150 bash benchmarks/gpu_cli.sh ;;
        *) echo "unknown step $s (int4, tests, sweep, tune, others, compile, wide, cli)"; exit 2 ;;
    esac
done
