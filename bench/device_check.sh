#!/usr/bin/env bash
# The one device command: install the kit offline, then bench/device_check.py (at most 5 minutes).
#
#   bash bench/device_check.sh [--rehearse] [KIT_DIR]     (default KIT_DIR: device-kit)
#
# On the lent GPU machine (docs/gpu.md), from the repository root, with the kit carried:
#   device run: command "bash bench/device_check.sh", carry ["device-kit"], timeout_s 420
# Results go to $OUT (the device tool's folder; default runs/device-check here): device_check.md
# (the tables), device_check.json (every figure) and device_check.log, rewritten after every
# measurement, so a run cut short still returns what it measured.
#
# On the device: the kit's wheels are installed with pip --target into /tmp/dragon-site (the
# image's python3 has numpy, scikit-learn, jinja2 and the nvidia-* CUDA packages); the CUDA
# llama.cpp finds libcublas/libcudart in those nvidia-* packages through LD_LIBRARY_PATH, set here
# because the dynamic linker reads it only when a process starts.
# --rehearse: here, on the CPU: this checkout's .venv (the CPU build), tiny models, few reports.
set -uo pipefail

start=$(date +%s)
rehearse=0
kit=device-kit
for arg in "$@"; do
    case "${arg}" in
        --rehearse) rehearse=1 ;;
        -*) echo "device_check: unknown option ${arg}" >&2; exit 2 ;;
        *) kit="${arg}" ;;
    esac
done
cd "$(dirname "$0")/.." || exit 1
out="${OUT:-runs/device-check}"
mkdir -p "${out}"
log="${out}/device_check.log"
: >"${log}"
export PYTHONUNBUFFERED=1
[[ -d "${kit}/wheels" && -d "${kit}/job" ]] || {
    echo "device_check: ${kit} is not a kit (scripts/make_device_kit.sh makes one)" | tee -a "${log}" >&2
    exit 1
}

if ((rehearse)); then
    py="${PYTHON:-.venv/bin/python}"
    budget=170
    extra=(--rehearse)
else
    py="${PYTHON:-python3}"  # the image's python3 (the one with PyTorch and the nvidia-* packages)
    budget=290
    extra=()
    site=/tmp/dragon-site
    "${py}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "${site}" \
        "${kit}"/wheels/*.whl 2>&1 | tee -a "${log}" || { echo "device_check: pip install failed" | tee -a "${log}"; exit 1; }
    export PYTHONPATH="${site}${PYTHONPATH:+:${PYTHONPATH}}"
    libs="$("${py}" - <<'PY'
import glob
import os

try:
    import nvidia

    roots = list(nvidia.__path__)
except ImportError:
    roots = []
dirs = sorted({os.path.dirname(p) for r in roots for p in glob.glob(os.path.join(r, "**", "lib*.so*"), recursive=True)})
print(":".join(dirs))
PY
)"
    if [[ -f "${kit}/libs/libgomp.so.1" ]] && [[ "$(ldconfig -p | grep -c 'libgomp\.so\.1 ')" == 0 ]]; then
        libs="${libs:+${libs}:}$(realpath "${kit}/libs")"
    fi
    export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}"
    echo "device_check: LD_LIBRARY_PATH=${LD_LIBRARY_PATH}" | tee -a "${log}"
    nvidia-smi 2>&1 | tee -a "${log}"
fi
deadline=$((start + budget))
"${py}" bench/device_check.py run --kit "${kit}" --out "${out}" --deadline "${deadline}" "${extra[@]}" 2>&1 | tee -a "${log}"
rc=${PIPESTATUS[0]}
echo "device_check: exit ${rc} after $(($(date +%s) - start)) s" | tee -a "${log}"
exit "${rc}"
