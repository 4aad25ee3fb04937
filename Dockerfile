#
# DRAGON LLM extractor: the Grand Challenge algorithm image (linux/amd64), in two flavours.
#
# Build it with ./build.sh, which picks the flavour (--cuda/--cpu, default: cuda where an NVIDIA
# container runtime is present), checks the model file and lets the chosen GGUF (and, for the CPU
# flavour, a cached llama-cpp-python wheel) through the build context. By hand, CUDA:
#   DOCKER_BUILDKIT=1 docker build -t dragon-llm-extractor .
# CPU, on debian:bookworm-slim or the base that scripts/bootstrap_base.sh makes without a registry:
#   DOCKER_BUILDKIT=1 docker build -t dragon-llm-extractor:cpu --build-arg FLAVOUR=cpu \
#     --build-arg BUILDER_IMAGE=debian:bookworm-slim --build-arg RUNTIME_IMAGE=debian:bookworm-slim \
#     --build-arg GGML_CUDA=off --build-arg "BUILD_PACKAGES=build-essential=12.9* cmake=3.25.* \
#     ninja-build=1.11.* python3=3.11.* python3-venv=3.11.*" .
#
# One file, not two: what differs between the flavours is only the base images and the CUDA
# switch of the llama.cpp build, given as build arguments. Users, paths, the venv, the
# requirements, the library check, the code, the model lookup and the entry point are the same
# lines, so the CPU image that CI runs checks the lines the platform runs.
# No `# syntax=` line: the frontend built into BuildKit (Docker 20.10 and later) reads this file,
# so a build needs no registry for a frontend image.
#
# Stage wheel-build compiles llama-cpp-python into a wheel; wheel-prebuilt instead takes one that
# build.sh placed in runs/build/wheels/ (the CPU wheel scripts/setup.sh built), so that CI does not
# compile llama.cpp twice. The runtime stage is the base with Python, that wheel, the pinned
# requirements, the code and the model. No compilers, no torch, nothing fetched at run time.

ARG BUILDER_IMAGE=nvidia/cuda:12.4.1-devel-ubuntu22.04
ARG RUNTIME_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04
# wheel-build or wheel-prebuilt; BuildKit builds only the stage that is used.
ARG WHEEL_STAGE=wheel-build

# ------------------------------------------------------------------------------ wheel-build
FROM ${BUILDER_IMAGE} AS wheel-build

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive

# Pinned to the base's release series (the defaults are Ubuntu 22.04's; build.sh --cpu gives
# bookworm's). Python here only drives the build: the wheel loads llama.cpp through ctypes (tag
# py3-none-linux_x86_64), so any Python 3 installs it. The secret (build.sh passes this
# machine's apt proxy and validity settings) is read by apt only; it is not stored in the image.
ARG BUILD_PACKAGES="build-essential=12.9* cmake=3.22.* ninja-build=1.10.* python3=3.10.* python3-venv=3.10.*"
# hadolint ignore=DL3008,SC2086
RUN --mount=type=secret,id=apt_conf,target=/etc/apt/apt.conf.d/90build-host \
    apt-get update \
    && apt-get install -y --no-install-recommends ${BUILD_PACKAGES} \
    && rm -rf /var/lib/apt/lists/*

ARG PIP_VERSION=24.3.1
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
# on: CUDA build; off: the CPU flavour.
ARG GGML_CUDA=on
# Real SASS for T4 (sm_75), A10G (sm_86), L4 (sm_89) and H100 (sm_90): no PTX JIT at start.
ARG CUDA_ARCHITECTURES="75-real;86-real;89-real;90-real"
# Parallel compile jobs (default: all cores); lower it when nvcc runs out of memory.
ARG BUILD_JOBS=""

# GGML_NATIVE=OFF: the T4 hosts have AVX-512, the A10G hosts (AMD) do not; a -march=native
# build from an AVX-512 builder dies with SIGILL there. AVX2/FMA/F16C are on every such host.
# The CLI tools that would link against the libcuda stub are not built by llama-cpp-python.
# pip reads the secret pip_conf (build.sh writes this machine's index and CA settings into it).
RUN --mount=type=secret,id=pip_conf --mount=type=secret,id=pip_cert \
    export PIP_CONFIG_FILE=/run/secrets/pip_conf \
    && python3 -m venv /opt/build-venv \
    && /opt/build-venv/bin/pip install --no-cache-dir "pip==${PIP_VERSION}" \
    && cuda_args="" \
    && if [ "${GGML_CUDA}" = on ]; then cuda_args="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}"; fi \
    && CMAKE_ARGS="${cuda_args} -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
       CMAKE_BUILD_PARALLEL_LEVEL="${BUILD_JOBS:-$(nproc)}" \
       /opt/build-venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels \
           "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" \
    && ls -l /wheels

# ------------------------------------------------------------------------------ wheel-prebuilt
FROM scratch AS wheel-prebuilt
COPY runs/build/wheels/ /wheels/

# ------------------------------------------------------------------------------ runtime
# hadolint ignore=DL3006
FROM ${WHEEL_STAGE} AS wheels

FROM ${RUNTIME_IMAGE} AS runtime

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive

# Python 3.11 (jammy's universe; bookworm's own Python): requirements.txt pins packages, numpy
# 2.4 among them, that no longer support 3.10. libgomp1: llama.cpp's CPU backend uses OpenMP.
RUN --mount=type=secret,id=apt_conf,target=/etc/apt/apt.conf.d/90build-host \
    apt-get update \
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

# The prebuilt wheel first, so that requirements.txt (which pins the same llama-cpp-python
# version) finds it installed and builds nothing. Then what the runtime never uses goes: the
# wheel's CMake/pkg-config copies of the libraries and headers (site-packages/lib, include: llama_cpp
# loads llama_cpp/lib/ only), the two extra copies of each library (wheels cannot hold symbolic
# links, so libX.so, libX.so.0 and libX.so.0.N.M are three files; the links are restored), and
# pip and setuptools.
ARG PIP_VERSION=24.3.1
RUN --mount=type=bind,from=wheels,source=/wheels,target=/tmp/wheels \
    --mount=type=bind,source=requirements.txt,target=/tmp/requirements.txt \
    --mount=type=secret,id=pip_conf --mount=type=secret,id=pip_cert \
    export PIP_CONFIG_FILE=/run/secrets/pip_conf \
    && python3.11 -m venv /opt/venv \
    && pip install --no-cache-dir "pip==${PIP_VERSION}" \
    && pip install --no-cache-dir /tmp/wheels/llama_cpp_python-*.whl \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && pip check \
    && site=/opt/venv/lib/python3.11/site-packages \
    && rm -rf "${site:?}/lib" "${site:?}/include" \
    && for f in "${site}"/llama_cpp/lib/lib*.so.*.*.*; do \
        so="${f%%.so.*}.so"; soname="${so}.$(echo "${f##*.so.}" | cut -d. -f1)"; \
        ln -sf "$(basename "${f}")" "${soname}"; ln -sf "$(basename "${soname}")" "${so}"; \
    done \
    && pip uninstall --yes --quiet pip setuptools

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

# cuda or cpu: test.sh reads it to run the image with or without GPUs.
ARG FLAVOUR=cuda
LABEL org.dragon-llm-extractor.flavour="${FLAVOUR}"

# Grand Challenge's templates and checks use the account by name; it exists in /etc/passwd above.
# hadolint ignore=DL3066
USER user

# Reads /input, writes /output/nlp-predictions-dataset.json. A model uploaded as the model
# tarball (extracted to /opt/ml/model/) is preferred over the baked-in one.
ENTRYPOINT ["/opt/venv/bin/python3", "process.py"]
