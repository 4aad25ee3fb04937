# shellcheck shell=bash
# Shared by build.sh, test.sh and export.sh (sourced, not run): the Docker client, the flavour
# choice and the image names.

readonly CUDA_TAG_DEFAULT="dragon-llm-extractor:latest"
readonly CPU_TAG_DEFAULT="dragon-llm-extractor:cpu"

# The docker client for runs: $DOCKER, else the first `docker` on the PATH.
docker_cli() {
    echo "${DOCKER:-docker}"
}

# A client that can build this Dockerfile (BuildKit, for RUN --mount): $DOCKER when set; else
# `docker` when it has buildx (Docker 23 and later build through it); else a client older than 23,
# whose built-in BuildKit DOCKER_BUILDKIT=1 turns on (Debian's docker.io 20.10 is /usr/bin/docker,
# while a newer client without buildx, first on the PATH, refuses BuildKit builds).
docker_build_cli() {
    if [[ -n "${DOCKER:-}" ]]; then
        echo "${DOCKER}"
        return 0
    fi
    local c major
    for c in docker /usr/bin/docker /usr/local/bin/docker; do
        command -v "${c}" >/dev/null 2>&1 || continue
        if "${c}" buildx version >/dev/null 2>&1; then
            echo "${c}"
            return 0
        fi
        major="$("${c}" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)"
        if [[ "${major}" =~ ^[0-9]+$ && "${major}" -lt 23 ]]; then
            echo "${c}"
            return 0
        fi
    done
    return 1
}

# True when the engine can give containers NVIDIA GPUs: `docker info` lists an nvidia runtime, or
# the NVIDIA container toolkit (which --gpus uses) is installed.
nvidia_runtime_present() {
    local cli
    cli="$(docker_cli)"
    "${cli}" info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia && return 0
    command -v nvidia-container-cli >/dev/null 2>&1
}

# The flavour for auto mode: cuda where an NVIDIA runtime is present, cpu otherwise.
auto_flavour() {
    if nvidia_runtime_present; then
        echo cuda
    else
        echo cpu
    fi
}

default_tag() {
    if [[ "$1" == cpu ]]; then
        echo "${DOCKER_TAG:-${CPU_TAG_DEFAULT}}"
    else
        echo "${DOCKER_TAG:-${CUDA_TAG_DEFAULT}}"
    fi
}
