#!/usr/bin/env bash
# Build and tag the Grand Challenge algorithm image.
#
# Usage: ./build.sh [--model FILE] [--tag TAG] [--jobs N] [--no-cache]
#   --model FILE  GGUF file in models/ to bake into the image
#                 [default SmolLM2-135M-Instruct.Q4_1.gguf; get it with scripts/fetch_default_model.sh]
#   --tag TAG     image tag [default $DOCKER_TAG or dragon-llm-extractor:latest]
#   --jobs N      parallel compile jobs for the CUDA build [default: all cores of the builder]
#   --no-cache    rebuild every layer
# Needs a Docker engine with BuildKit (Docker 23 or newer uses it by default).
set -euo pipefail

readonly DEFAULT_MODEL="SmolLM2-135M-Instruct.Q4_1.gguf"
readonly IMAGE_LIMIT_BYTES=$((10 * 1000 * 1000 * 1000))

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
model="${DEFAULT_MODEL}"
tag="${DOCKER_TAG:-dragon-llm-extractor:latest}"
jobs=""
extra=()

die() {
    echo "build.sh: $*" >&2
    exit 1
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --model) model="${2:?--model needs a file name}"; shift 2 ;;
        --tag) tag="${2:?--tag needs a tag}"; shift 2 ;;
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

command -v docker >/dev/null 2>&1 || die "docker is not installed (see https://docs.docker.com/engine/install/)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (is the daemon running, may this user use it?)"

# The Dockerfile-specific ignore file admits the chosen model only (BuildKit reads
# <Dockerfile>.dockerignore next to the Dockerfile given with -f).
tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT
cp "${repo_root}/Dockerfile" "${tmp}/Dockerfile"
{
    grep -v '^!models/' "${repo_root}/.dockerignore"
    printf '\n!models/%s\n**/__pycache__\n**/*.pyc\n' "${model}"
} >"${tmp}/Dockerfile.dockerignore"

build_args=(--build-arg "MODEL_FILE=${model}")
if [[ -n "${jobs}" ]]; then
    build_args+=(--build-arg "BUILD_JOBS=${jobs}")
fi

echo "build.sh: building ${tag} with models/${model} ($(du -h "${model_path}" | cut -f1))"
DOCKER_BUILDKIT=1 docker build --platform=linux/amd64 -f "${tmp}/Dockerfile" \
    "${build_args[@]}" "${extra[@]}" -t "${tag}" "${repo_root}"

size="$(docker image inspect --format '{{.Size}}' "${tag}" 2>/dev/null || echo 0)"
echo "build.sh: built ${tag}: $((size / 1000 / 1000)) MB"
if [[ "${size}" -gt "${IMAGE_LIMIT_BYTES}" ]]; then
    echo "build.sh: WARNING: the image is over Grand Challenge's 10 GB limit; bake in a smaller model" \
        "and upload the large one as the model tarball (./export.sh --model-tarball --model FILE)" >&2
fi
