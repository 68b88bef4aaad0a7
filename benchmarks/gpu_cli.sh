#!/usr/bin/env bash
# The CLI end to end on a GPU (gpu_check.sh's step cli): `lilmistral bench` and `run` on the small model that
# `python -m benchmarks.gpu_cli_model` wrote into .gpu_model (carried to the machine), then `run` on the CPU to
# compare its greedy answer with the GPU's (a random model's: gibberish, and near-ties may differ).
set -eu
cd "$(dirname "$0")/.."
if [ ! -d .gpu_model ]; then
    echo "no .gpu_model here: python -m benchmarks.gpu_cli_model on the machine with gguf, then carry .gpu_model"
    exit 2
fi
LILMISTRAL_HOME=$(mktemp -d)
export LILMISTRAL_HOME
python3 -m lilmistral bench .gpu_model --device cuda --json
for device in cuda cpu; do
    echo "== run on $device"
    python3 -m lilmistral run .gpu_model "Why is the sky blue?" --device "$device" --max-tokens 24 --temperature 0 \
        --no-save < /dev/null
done
