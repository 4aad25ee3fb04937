#!/usr/bin/env bash
# Build and tag the Grand Challenge algorithm image, CUDA or CPU flavour (one Dockerfile).
#
# Usage: ./build.sh [--cuda | --cpu] [--model FILE] [--tag TAG] [--base IMAGE] [--wheel FILE]
#                   [--jobs N] [--no-cache]
#   --cuda        the platform's image: nvidia/cuda bases, llama.cpp compiled with CUDA
#   --cpu         the CPU flavour: a Debian bookworm base, llama.cpp for the CPU
#                 [default: --cuda where an NVIDIA container runtime is present, else --cpu]
#   --model FILE  GGUF file in models/ to bake into the image
#                 [default SmolLM2-135M-Instruct.Q4_1.gguf; get it with scripts/fetch_default_model.sh]
#   --tag TAG     image tag [default $DOCKER_TAG, else dragon-llm-extractor:latest (cuda) or
#                 dragon-llm-extractor:cpu (cpu)]
#   --base IMAGE  CPU flavour's base [default debian:bookworm-slim when present or pullable, else
#                 dragon-llm-extractor-base:bookworm, made by scripts/bootstrap_base.sh when missing]
#   --wheel FILE  CPU flavour: install this llama-cpp-python wheel instead of compiling one
#                 [default: the CPU wheel scripts/setup.sh cached, when there is one]
#   --jobs N      parallel compile jobs for the llama.cpp build [default: all cores of the builder]
#   --no-cache    rebuild every layer
# Needs a Docker engine and a client that builds with BuildKit (Docker 23 or newer with buildx,
# or Docker 20.10-22 with DOCKER_BUILDKIT=1, which this script sets; $DOCKER picks the client).
# Package registries are reached with --network host ($DOCKER_BUILD_NETWORK) and this machine's
# pip index/CA and apt proxy settings, passed as build secrets (not stored in the image).
set -euo pipefail

readonly DEFAULT_MODEL="SmolLM2-135M-Instruct.Q4_1.gguf"
readonly IMAGE_LIMIT_BYTES=$((10 * 1000 * 1000 * 1000))
readonly SLIM_BASE="debian:bookworm-slim"
readonly BOOTSTRAP_BASE="dragon-llm-extractor-base:bookworm"
# Debian bookworm's series of the build tools (the Dockerfile's defaults are Ubuntu 22.04's).
readonly BOOKWORM_BUILD_PACKAGES="build-essential=12.9* cmake=3.25.* ninja-build=1.11.* python3=3.11.* python3-venv=3.11.*"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/docker_common.sh
source "${repo_root}/scripts/docker_common.sh"
model="${DEFAULT_MODEL}"
flavour=""
tag=""
base=""
wheel=""
jobs=""
extra=()

die() {
    echo "build.sh: $*" >&2
    exit 1
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --cuda) flavour=cuda; shift ;;
        --cpu) flavour=cpu; shift ;;
        --model) model="${2:?--model needs a file name}"; shift 2 ;;
        --tag) tag="${2:?--tag needs a tag}"; shift 2 ;;
        --base) base="${2:?--base needs an image}"; shift 2 ;;
        --wheel) wheel="${2:?--wheel needs a file}"; shift 2 ;;
        --jobs) jobs="${2:?--jobs needs a number}"; shift 2 ;;
        --no-cache) extra+=(--no-cache); shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

# The model must sit in models/ (the build context); accept models/FILE or a path to it too.
if [[ "${model}" == */* ]]; then
    model_dir="$(cd "$(dirname "${model}")" 2>/dev/null && pwd -P)" ||
        die "no such directory: $(dirname "${model}")"
    [[ "${model_dir}" == "$(cd "${repo_root}/models" && pwd -P)" ]] ||
        die "the model must be in ${repo_root}/models/ (copy or hard-link it there): ${model}"
    model="$(basename "${model}")"
fi
[[ "${model}" == *.gguf ]] || die "not a .gguf file name: ${model}"
model_path="${repo_root}/models/${model}"
if [[ ! -e "${model_path}" ]]; then
    if [[ "${model}" == "${DEFAULT_MODEL}" ]]; then
        die "models/${model} is missing: run scripts/fetch_default_model.sh first"
    fi
    die "models/${model} is missing: put the GGUF file in models/ first"
fi
[[ ! -L "${model_path}" ]] ||
    die "models/${model} is a symbolic link, which Docker does not follow out of the build context: copy or hard-link the file instead"
[[ -f "${model_path}" ]] || die "models/${model} is not a regular file"
for f in requirements.txt process.py extractor taskfiles; do
    [[ -e "${repo_root}/${f}" ]] || die "${f} is missing from ${repo_root}"
done

command -v "$(docker_cli)" >/dev/null 2>&1 || die "docker is not installed (see https://docs.docker.com/engine/install/)"
"$(docker_cli)" info >/dev/null 2>&1 || die "no Docker engine answers (is the daemon running, may this user use it?)"
cli="$(docker_build_cli)" ||
    die "no docker client here builds with BuildKit: install buildx, or Debian's docker.io (its /usr/bin/docker), or set DOCKER"
[[ -n "${flavour}" ]] || flavour="$(auto_flavour)"
[[ -n "${tag}" ]] || tag="$(default_tag "${flavour}")"
if [[ -n "${base}${wheel}" && "${flavour}" != cpu ]]; then
    die "--base and --wheel are for the CPU flavour (--cpu)"
fi

tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT
# BuildKit reads <Dockerfile>.dockerignore next to the Dockerfile given with -f: the allow-list
# with the chosen model (and the staged wheel) admitted.
cp "${repo_root}/Dockerfile" "${tmp}/Dockerfile"
{
    grep -v '^!models/' "${repo_root}/.dockerignore"
    printf '\n!models/%s\n' "${model}"
} >"${tmp}/Dockerfile.dockerignore"

build_args=(--build-arg "MODEL_FILE=${model}" --build-arg "FLAVOUR=${flavour}")
if [[ -n "${jobs}" ]]; then
    build_args+=(--build-arg "BUILD_JOBS=${jobs}")
fi

if [[ "${flavour}" == cpu ]]; then
    if [[ -z "${base}" ]]; then
        if "${cli}" image inspect "${SLIM_BASE}" >/dev/null 2>&1 ||
            "${cli}" pull -q "${SLIM_BASE}" >/dev/null 2>&1; then
            base="${SLIM_BASE}"
        else
            echo "build.sh: ${SLIM_BASE} cannot be pulled: using ${BOOTSTRAP_BASE} (scripts/bootstrap_base.sh)"
            DOCKER="${cli}" bash "${repo_root}/scripts/bootstrap_base.sh" --tag "${BOOTSTRAP_BASE}"
            base="${BOOTSTRAP_BASE}"
        fi
    fi
    build_args+=(--build-arg "BUILDER_IMAGE=${base}" --build-arg "RUNTIME_IMAGE=${base}"
        --build-arg GGML_CUDA=off --build-arg "BUILD_PACKAGES=${BOOKWORM_BUILD_PACKAGES}")
    if [[ -z "${wheel}" ]]; then
        # scripts/setup.sh's cache key for its default (CPU) build: the version and its CMake
        # flags, "-DGGML_NATIVE=OFF " with LLAMA_CMAKE_ARGS empty.
        llama_version="$(sed -n 's/^llama-cpp-python==//p' "${repo_root}/requirements.txt")"
        key="$(printf '%s %s' "${llama_version}" "-DGGML_NATIVE=OFF " | sha256sum | cut -c1-16)"
        cached="${WHEEL_CACHE:-${HOME}/.cache/dragon-llm-extractor/wheels}/llama-cpp-python-${llama_version}-${key}"
        wheel="$(compgen -G "${cached}/llama_cpp_python-${llama_version}-*.whl" | head -n 1 || true)"
    fi
    stage="${repo_root}/runs/build/wheels"
    rm -rf "${stage}"
    if [[ -n "${wheel}" ]]; then
        [[ -f "${wheel}" && "$(basename "${wheel}")" == llama_cpp_python-*.whl ]] ||
            die "not a llama-cpp-python wheel: ${wheel}"
        mkdir -p "${stage}"
        ln -f "${wheel}" "${stage}/" 2>/dev/null || cp "${wheel}" "${stage}/"
        printf '!runs/build/wheels\n!runs/build/wheels/*.whl\n' >>"${tmp}/Dockerfile.dockerignore"
        build_args+=(--build-arg WHEEL_STAGE=wheel-prebuilt)
        echo "build.sh: CPU flavour on ${base}, llama-cpp-python from ${wheel}"
    else
        echo "build.sh: CPU flavour on ${base}, llama-cpp-python compiled in the build (no cached wheel)"
    fi
fi
printf '**/__pycache__\n**/*.pyc\n' >>"${tmp}/Dockerfile.dockerignore"

# This machine's package-registry settings, as build secrets: pip's index URLs, CA bundle and
# timeout (file:// indexes do not exist inside the build), apt's proxies and validity checks.
py="${repo_root}/.venv/bin/python"
[[ -x "${py}" ]] || py="$(command -v python3 || true)"
declare -A pip_cfg=()
if [[ -n "${py}" ]]; then
    while IFS= read -r line; do
        [[ "${line}" =~ ^([^=]*)\.([a-z-]+)=\'(.*)\'$ ]] || continue
        pip_cfg["${BASH_REMATCH[2]}"]="${BASH_REMATCH[3]}"
    done < <("${py}" -m pip config list 2>/dev/null || true)
fi
{
    echo "[global]"
    cert="${pip_cfg[cert]:-}"
    if [[ -n "${cert}" && -f "${cert}" ]]; then
        echo "cert = /run/secrets/pip_cert"
        build_args+=(--secret "id=pip_cert,src=${cert}")
    fi
    for k in index-url extra-index-url trusted-host timeout default-timeout; do
        v="${pip_cfg[${k}]:-}"
        if [[ "${k}" == *index-url ]]; then
            v="$(tr ' ' '\n' <<<"${v}" | grep -E '^https?://' | tr '\n' ' ' || true)"
        fi
        v="${v%% }"
        [[ -z "${v}" ]] || echo "${k} = ${v}"
    done
} >"${tmp}/pip.conf"
build_args+=(--secret "id=pip_conf,src=${tmp}/pip.conf")
if command -v apt-config >/dev/null 2>&1; then
    apt-config dump 2>/dev/null |
        grep -E '^Acquire::(https?|ftp)::Proxy|^Acquire::Check-(Valid-Until|Date) ' >"${tmp}/apt.conf" || true
    if [[ -s "${tmp}/apt.conf" ]]; then
        build_args+=(--secret "id=apt_conf,src=${tmp}/apt.conf")
    fi
fi
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    if [[ -n "${!v:-}" ]]; then
        build_args+=(--build-arg "${v}")
    fi
done

echo "build.sh: building ${tag} (${flavour}) with models/${model} ($(du -h "${model_path}" | cut -f1)), client ${cli}"
start=${SECONDS}
DOCKER_BUILDKIT=1 "${cli}" build --platform=linux/amd64 --network "${DOCKER_BUILD_NETWORK:-host}" \
    --progress "${BUILD_PROGRESS:-auto}" -f "${tmp}/Dockerfile" \
    "${build_args[@]}" "${extra[@]}" -t "${tag}" "${repo_root}"

size="$("${cli}" image inspect --format '{{.Size}}' "${tag}" 2>/dev/null || echo 0)"
echo "build.sh: built ${tag} (${flavour}) in $((SECONDS - start)) s: $((size / 1000 / 1000)) MB"
if [[ "${size}" -gt "${IMAGE_LIMIT_BYTES}" ]]; then
    echo "build.sh: WARNING: the image is over Grand Challenge's 10 GB limit; bake in a smaller model" \
        "and upload the large one as the model tarball (./export.sh --model-tarball --model FILE)" >&2
fi
