# syntax=docker/dockerfile:1
#
# DRAGON LLM extractor: the Grand Challenge algorithm image (linux/amd64).
#
# Build it with ./build.sh, which checks the model file and lets the chosen GGUF through the
# build context (.dockerignore admits only the default one). By hand:
#   DOCKER_BUILDKIT=1 docker build --build-arg MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf -t dragon-llm-extractor .
#
# Stage 1 compiles llama-cpp-python with CUDA into a wheel in the -devel image; stage 2 is the
# -runtime image with Python, that wheel, the pinned requirements, the code and the model. No
# compilers, no torch, nothing fetched at run time.

# ------------------------------------------------------------------------------ builder
FROM nvidia/cuda:12.4.1-devel-ubuntu22.04 AS builder

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive

# Ubuntu 22.04 (jammy) packages, pinned to their series. Python here only drives the build: the
# wheel loads llama.cpp through ctypes (tag py3-none-linux_x86_64), so any Python 3 installs it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential=12.9* \
        cmake=3.22.* \
        ninja-build=1.10.* \
        python3=3.10.* \
        python3-venv=3.10.* \
    && rm -rf /var/lib/apt/lists/*

ARG PIP_VERSION=24.3.1
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
# Real SASS for T4 (sm_75), A10G (sm_86), L4 (sm_89) and H100 (sm_90): no PTX JIT at start.
ARG CUDA_ARCHITECTURES="75-real;86-real;89-real;90-real"
# Parallel compile jobs (default: all cores); lower it when nvcc runs out of memory.
ARG BUILD_JOBS=""

# GGML_NATIVE=OFF: the T4 hosts have AVX-512, the A10G hosts (AMD) do not; a -march=native
# build from an AVX-512 builder dies with SIGILL there. AVX2/FMA/F16C are on every such host.
# The CLI tools that would link against the libcuda stub are not built by llama-cpp-python.
RUN python3 -m venv /opt/build-venv \
    && /opt/build-venv/bin/pip install --no-cache-dir "pip==${PIP_VERSION}" \
    && CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=OFF -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES} -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
       CMAKE_BUILD_PARALLEL_LEVEL="${BUILD_JOBS:-$(nproc)}" \
       /opt/build-venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels \
           "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" \
    && ls -l /wheels

# ------------------------------------------------------------------------------ runtime
FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04 AS runtime

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive

# Python 3.11 from jammy's universe (requirements.txt pins packages, numpy 2.4 among them,
# that no longer support 3.10). libgomp1: llama.cpp's CPU backend uses OpenMP.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        libgomp1=12.* \
        python3.11=3.11.* \
        python3.11-venv=3.11.* \
    && rm -rf /var/lib/apt/lists/*

# Grand Challenge runs the container as a non-root `user`. /output is created here and owned
# by `user` so that an empty docker volume mounted there inherits that ownership.
RUN groupadd --system user \
    && useradd --system --create-home --no-log-init --gid user user \
    && mkdir -p /opt/app/models /input /output \
    && chown user:user /output

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The prebuilt CUDA wheel first, so that requirements.txt (which pins the same
# llama-cpp-python version) finds it installed and builds nothing.
ARG PIP_VERSION=24.3.1
RUN --mount=type=bind,from=builder,source=/wheels,target=/tmp/wheels \
    --mount=type=bind,source=requirements.txt,target=/tmp/requirements.txt \
    python3.11 -m venv /opt/venv \
    && pip install --no-cache-dir "pip==${PIP_VERSION}" \
    && pip install --no-cache-dir /tmp/wheels/llama_cpp_python-*.whl \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && pip check

# Every shared library of the wheel must resolve here, except libcuda.so.1, which the NVIDIA
# container runtime mounts from the host driver at run time (so llama_cpp is not imported now).
RUN libs="$(find /opt/venv -path '*/llama_cpp/lib/*.so*' -type f)" \
    && test -n "${libs}" \
    && missing="$(echo "${libs}" | xargs ldd | grep 'not found' | grep -v 'libcuda\.so\.1' | sort -u || true)" \
    && if [ -n "${missing}" ]; then echo "unresolved libraries:" >&2; echo "${missing}" >&2; exit 1; fi \
    && python3 -c "import importlib.metadata as m; print('llama-cpp-python', m.version('llama-cpp-python'))"

WORKDIR /opt/app

# The model goes in before the code: a code change then reuses the (large) model layer.
ARG MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
COPY models/${MODEL_FILE} /opt/app/models/${MODEL_FILE}

COPY requirements.txt process.py /opt/app/
COPY extractor/ /opt/app/extractor/
COPY taskfiles/ /opt/app/taskfiles/
RUN python3 -m compileall -q /opt/app/process.py /opt/app/extractor

# Grand Challenge's templates and checks use the account by name; it exists in /etc/passwd above.
# hadolint ignore=DL3066
USER user

# Reads /input, writes /output/nlp-predictions-dataset.json. A model uploaded as the model
# tarball (extracted to /opt/ml/model/) is preferred over the baked-in one.
ENTRYPOINT ["/opt/venv/bin/python3", "process.py"]
