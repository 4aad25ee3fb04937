#!/usr/bin/env bash
# Write the image (and optionally the model) as .tar.gz files for upload to Grand Challenge.
#
# Usage: ./export.sh [--cuda | --cpu] [--tag TAG] [--out DIR] [--model-tarball] [--model FILE] [--no-image]
#   --cuda, --cpu    which flavour's image to export when --tag is not given [default --cuda:
#                    dragon-llm-extractor:latest, the image for the platform's GPUs; --cpu:
#                    dragon-llm-extractor:cpu]
#   --tag TAG        image to export [default $DOCKER_TAG, else the flavour's tag]
#   --out DIR        where the files go [default runs/export/, git-ignored]
#   --model-tarball  also write DIR/model.tar.gz with the GGUF at its root, for the algorithm's
#                    model upload (Grand Challenge extracts it to /opt/ml/model/ at every job,
#                    and process.py prefers it over the model baked into the image)
#   --model FILE     the GGUF in models/ for the model tarball [default SmolLM2-135M-Instruct.Q4_1.gguf]
#   --no-image       write only the model tarball
# Output: DIR/<image-name>_<tag>.tar.gz (docker save | gzip) and DIR/model.tar.gz, with SHA-256 sums.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/docker_common.sh
source "${repo_root}/scripts/docker_common.sh"
flavour=cuda
tag=""
out="${repo_root}/runs/export"
model="SmolLM2-135M-Instruct.Q4_1.gguf"
model_tarball=0
image=1

die() {
    echo "export.sh: $*" >&2
    exit 1
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --cuda) flavour=cuda; shift ;;
        --cpu) flavour=cpu; shift ;;
        --tag) tag="${2:?--tag needs a tag}"; shift 2 ;;
        --out) out="${2:?--out needs a directory}"; shift 2 ;;
        --model-tarball) model_tarball=1; shift ;;
        --model) model="${2:?--model needs a file name}"; model_tarball=1; shift 2 ;;
        --no-image) image=0; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[[ ${image} -eq 1 || ${model_tarball} -eq 1 ]] || die "nothing to do (--no-image without --model-tarball)"
[[ -n "${tag}" ]] || tag="$(default_tag "${flavour}")"
docker="$(docker_cli)"

# pigz compresses on every core; gzip otherwise.
gz=(gzip -c)
if command -v pigz >/dev/null 2>&1; then
    gz=(pigz -c)
fi

mkdir -p "${out}"

if [[ ${image} -eq 1 ]]; then
    command -v "${docker}" >/dev/null 2>&1 || die "docker is not installed"
    "${docker}" info >/dev/null 2>&1 || die "no Docker engine answers"
    "${docker}" image inspect "${tag}" >/dev/null 2>&1 ||
        die "no image ${tag}: build it with ./build.sh --${flavour} --tag ${tag}"
    name="$(printf '%s' "${tag}" | tr '/:@' '__-')"
    image_out="${out}/${name}.tar.gz"
    echo "export.sh: docker save ${tag} | gzip > ${image_out}"
    "${docker}" save "${tag}" | "${gz[@]}" >"${image_out}.part"
    mv -f "${image_out}.part" "${image_out}"
    echo "export.sh: wrote ${image_out} ($(du -h "${image_out}" | cut -f1))"
    (cd "${out}" && sha256sum "$(basename "${image_out}")")
fi

if [[ ${model_tarball} -eq 1 ]]; then
    model="$(basename "${model}")"
    model_path="${repo_root}/models/${model}"
    [[ -f "${model_path}" ]] || die "models/${model} is missing"
    model_out="${out}/model.tar.gz"
    echo "export.sh: tar models/${model} > ${model_out} (the .gguf at the archive root)"
    # -h: store the file a symbolic link points to, not the link.
    tar -C "${repo_root}/models" -h -cf - "${model}" | "${gz[@]}" >"${model_out}.part"
    mv -f "${model_out}.part" "${model_out}"
    echo "export.sh: wrote ${model_out} ($(du -h "${model_out}" | cut -f1))"
    (cd "${out}" && sha256sum model.tar.gz)
fi
