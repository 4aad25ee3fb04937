#!/usr/bin/env bash
# Set up a development machine: a virtual environment in .venv with the pinned runtime and
# development requirements, llama-cpp-python compiled for this CPU family, and the default model.
#
# Usage: scripts/setup.sh
# Env:   PYTHON       interpreter for the venv (default python3)
#        LLAMA_CMAKE_ARGS  extra CMake flags for llama.cpp (e.g. "-DGGML_CUDA=on" on a CUDA machine)
#        WHEEL_CACHE  where built llama-cpp-python wheels are kept (default ~/.cache/dragon-llm-extractor/wheels)
#
# llama.cpp is built with GGML_NATIVE=OFF: a native build uses every instruction the build
# machine has (AMX, AVX-512 FP16) and crashed with SIGILL here; the portable build runs anywhere
# with AVX2. The wheel is cached by version and flags, so a second setup skips the 8-minute build.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"

py="${PYTHON:-python3}"
llama_version="$(sed -n 's/^llama-cpp-python==//p' requirements.txt)"
cmake_args="-DGGML_NATIVE=OFF ${LLAMA_CMAKE_ARGS:-}"
cache_root="${WHEEL_CACHE:-${HOME}/.cache/dragon-llm-extractor/wheels}"
key="$(printf '%s %s' "${llama_version}" "${cmake_args}" | sha256sum | cut -c1-16)"
wheel_dir="${cache_root}/llama-cpp-python-${llama_version}-${key}"

if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv"
    "${py}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip

if ! compgen -G "${wheel_dir}/llama_cpp_python-*.whl" >/dev/null; then
    echo "setup: building llama-cpp-python ${llama_version} (${cmake_args}); this takes about 8 minutes on 2 cores"
    mkdir -p "${wheel_dir}"
    CMAKE_ARGS="${cmake_args}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        .venv/bin/python -m pip wheel --quiet --disable-pip-version-check --no-cache-dir --no-deps \
        "llama-cpp-python==${llama_version}" -w "${wheel_dir}"
fi
echo "setup: installing llama-cpp-python from ${wheel_dir}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "${wheel_dir}"/llama_cpp_python-*.whl
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt

bash scripts/fetch_default_model.sh
echo "setup: done"
