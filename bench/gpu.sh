#!/usr/bin/env bash
# Throughput on an NVIDIA GPU without network: CUDA build of llama-cpp-python, a random-weight
# 14B-shaped GGUF (bench/random_gguf.py), then bench/throughput.py against the naive loop.
#
#   bash bench/gpu.sh WHEELHOUSE [JOB_DIR] [MAX_CASES]
#
# WHEELHOUSE is a folder made beforehand on a machine with network:
#   pip download -d wheelhouse -r requirements.txt gguf==0.19.0 PyYAML==6.0.4 requests==2.34.2 \
#       scikit-build-core cmake ninja
# (it holds the llama-cpp-python source and every wheel the build and the benchmark need).
# Needs nvcc (a CUDA toolkit) on the machine. Results go to runs/gpu/ (table, JSON, log).
set -euo pipefail

WHEELS=$(realpath "${1:?usage: bash bench/gpu.sh WHEELHOUSE [JOB_DIR] [MAX_CASES]}")
JOB=${2:-test/fixtures/jobs/Task102_Example_sl_mc_clf-fold0}
CASES=${3:-64}
PRESET=${PRESET:-qwen2.5-14b}
cd "$(dirname "$0")/.."
OUT=runs/gpu
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version --format=csv | tee "$OUT/gpu.txt"

VENV=.venv-gpu
python3 -m venv "$VENV"
pip_local() { "$VENV/bin/python" -m pip install --quiet --no-index --find-links "$WHEELS" "$@"; }
# The CUDA variant of the pinned llama-cpp-python (build tools from the wheelhouse: no isolation,
# which would fetch them), then the rest of the runtime and the GGUF writer.
pip_local scikit-build-core cmake ninja
CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=OFF" pip_local --no-build-isolation \
    "$(grep '^llama-cpp-python==' requirements.txt)"
pip_local -r requirements.txt gguf==0.19.0 PyYAML==6.0.4 requests==2.34.2
"$VENV/bin/python" -c "import llama_cpp; assert llama_cpp.llama_supports_gpu_offload(), 'no CUDA in this build'"

MODEL=${MODEL:-/tmp/random-$PRESET.gguf}
[ -f "$MODEL" ] || "$VENV/bin/python" bench/random_gguf.py --out "$MODEL" --preset "$PRESET"
"$VENV/bin/python" bench/throughput.py --job "$JOB" --model "$MODEL" --gpu on --max-cases "$CASES" \
    --settings naive,1m,8m,16m,32m --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.txt"
