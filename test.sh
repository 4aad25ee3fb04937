#!/usr/bin/env bash
# Run the algorithm on every job in a folder the way Grand Challenge does, verify every
# predictions file and, with ground truth, score them with dragon-eval.
#
# Usage: ./test.sh [options] [INPUT_DIR [GROUND_TRUTH_DIR]]
#   INPUT_DIR          folder of job folders (each with the four DRAGON JSON files)
#                      [default test/fixtures/jobs]
#   GROUND_TRUTH_DIR   dragon-eval ground truth (<Task>.json) [default test/fixtures/ground-truth
#                      when INPUT_DIR is defaulted too; none otherwise: verification only]
# Options:
#   --cuda | --cpu     which image flavour to run when --tag is not given: dragon-llm-extractor:latest
#                      (cuda) or dragon-llm-extractor:cpu [default: cuda where an NVIDIA container
#                      runtime is present, else cpu]
#   --no-docker        run `python process.py` in scripts/sandbox_run.sh (non-root, no network,
#                      read-only input, empty TMPDIR, RLIMIT_DATA) instead of the image
#   --min-score X      fail when the overall score is below X [default 0]
#   --max-cases N      predict and check only the first N test cases of each job
#   --tag TAG          image to run [default $DOCKER_TAG, else the flavour's tag]
#   --output DIR       where predictions and logs go [default runs/test-<date>-<pid>]
#   --memory SIZE      memory limit, as docker --memory and RLIMIT_DATA [default $TEST_MEMORY or 15g]
#   --timeout SECONDS  per-job time limit [default $TEST_TIMEOUT or none]
#   --allow-cpu        pass --allow-cpu to process.py (run on the CPU although a GPU is visible)
# Environment: PYTHON (default .venv/bin/python, else python3) runs process.py (--no-docker) and
# the evaluation; DOCKER_GPUS=all|none overrides the GPU detection; DRAGON_* variables are
# passed on to process.py (DRAGON_MODEL only with --no-docker); DOCKER picks the docker client.
# The last line printed is `overall <score>` (with ground truth) or `verified <n> jobs`.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "${repo_root}"
# shellcheck source=scripts/docker_common.sh
source "${repo_root}/scripts/docker_common.sh"

die() {
    echo "test.sh: $*" >&2
    exit 1
}

use_docker=1
min_score=0
min_score_set=0
max_cases=""
tag=""
flavour=""
out_root=""
memory="${TEST_MEMORY:-15g}"
timeout_s="${TEST_TIMEOUT:-0}"
allow_cpu=0
positional=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        --no-docker) use_docker=0; shift ;;
        --cuda) flavour=cuda; shift ;;
        --cpu) flavour=cpu; shift ;;
        --min-score) min_score="${2:?--min-score needs a number}"; min_score_set=1; shift 2 ;;
        --max-cases) max_cases="${2:?--max-cases needs a number}"; shift 2 ;;
        --tag) tag="${2:?--tag needs a tag}"; shift 2 ;;
        --output) out_root="${2:?--output needs a directory}"; shift 2 ;;
        --memory) memory="${2:?--memory needs a size}"; shift 2 ;;
        --timeout) timeout_s="${2:?--timeout needs seconds}"; shift 2 ;;
        --allow-cpu) allow_cpu=1; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        --) shift; positional+=("$@"); break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) positional+=("$1"); shift ;;
    esac
done
[[ ${#positional[@]} -le 2 ]] || die "too many arguments (see --help)"
[[ -z "${max_cases}" || "${max_cases}" =~ ^[0-9]+$ ]] || die "--max-cases must be a whole number"
[[ "${timeout_s}" =~ ^[0-9]+$ ]] || die "--timeout must be whole seconds"
[[ "${min_score}" =~ ^-?[0-9]*\.?[0-9]+$ ]] || die "--min-score must be a number"

if [[ ${#positional[@]} -eq 0 ]]; then
    input_dir="test/fixtures/jobs"
    gt_dir=""
    [[ -d test/fixtures/ground-truth ]] && gt_dir="test/fixtures/ground-truth"
else
    input_dir="${positional[0]}"
    gt_dir="${positional[1]:-}"
fi
[[ -d "${input_dir}" ]] || die "no such input folder: ${input_dir}"
input_dir="$(cd "${input_dir}" && pwd -P)"
if [[ -n "${gt_dir}" ]]; then
    [[ -d "${gt_dir}" ]] || die "no such ground-truth folder: ${gt_dir}"
    gt_dir="$(cd "${gt_dir}" && pwd -P)"
elif [[ ${min_score_set} -eq 1 ]]; then
    die "--min-score needs ground truth to score against"
fi

jobs=()
while IFS= read -r -d '' cfg; do
    jobs+=("$(basename "$(dirname "${cfg}")")")
done < <(find "${input_dir}" -mindepth 2 -maxdepth 2 -name nlp-task-configuration.json -print0 | sort -z)
[[ ${#jobs[@]} -gt 0 ]] ||
    die "no job folders (with nlp-task-configuration.json) in ${input_dir}"

# The Python that runs the evaluation (and process.py without Docker), as an absolute path:
# the sandbox has a plain system PATH.
py="${PYTHON:-.venv/bin/python}"
if ! command -v "${py}" >/dev/null 2>&1; then
    [[ -z "${PYTHON:-}" ]] || die "PYTHON=${PYTHON} is not executable"
    py=python3
fi
py="$("${py}" -c 'import sys; print(sys.executable)')" || die "cannot run ${py}"

if [[ -z "${out_root}" ]]; then
    out_root="runs/test-$(date +%Y%m%d-%H%M%S)-$$"
fi
mkdir -p "${out_root}/predictions" "${out_root}/logs"
out_root="$(cd "${out_root}" && pwd -P)"
pred_root="${out_root}/predictions"

proc_args=()
[[ -n "${max_cases}" ]] && proc_args+=(--max-cases "${max_cases}")
[[ ${allow_cpu} -eq 1 ]] && proc_args+=(--allow-cpu)

dragon_vars=()
while IFS= read -r name; do
    [[ "${name}" == DRAGON_* ]] || continue
    case "${name}" in DRAGON_INPUT | DRAGON_OUTPUT) continue ;; esac
    dragon_vars+=("${name}")
done < <(compgen -e)

if [[ ${use_docker} -eq 1 ]]; then
    docker="$(docker_cli)"
    command -v "${docker}" >/dev/null 2>&1 ||
        die "docker is not installed; use --no-docker to run without it"
    "${docker}" info >/dev/null 2>&1 ||
        die "no Docker engine answers; use --no-docker to run without it"
    if [[ -z "${tag}" ]]; then
        [[ -n "${flavour}" ]] || flavour="$(auto_flavour)"
        tag="$(default_tag "${flavour}")"
    fi
    "${docker}" image inspect "${tag}" >/dev/null 2>&1 ||
        die "no image ${tag}: build it with ./build.sh${flavour:+ --${flavour}}"
    image_flavour="$("${docker}" image inspect --format \
        '{{index .Config.Labels "org.dragon-llm-extractor.flavour"}}' "${tag}" 2>/dev/null || true)"
    gpus="${DOCKER_GPUS:-}"
    if [[ -z "${gpus}" ]]; then
        gpus=none
        if [[ "${image_flavour}" != cpu ]] && nvidia_runtime_present; then
            gpus=all
        fi
    fi
    # DRAGON's test script's flags (dragon_baseline's test.sh), --gpus=all where there is a GPU.
    docker_flags=(--memory="${memory}" --memory-swap="${memory}" --network=none --cap-drop=ALL
        --security-opt=no-new-privileges --shm-size=128m --pids-limit=256)
    if [[ "${gpus}" == all ]]; then
        docker_flags=(--gpus=all "${docker_flags[@]}")
    elif [[ "${image_flavour}" != cpu ]]; then
        # The CUDA image without an NVIDIA runtime needs the CUDA forward-compat libcuda (in the
        # base image) to load at all; llama.cpp then finds no device and runs on the CPU.
        echo "test.sh: no NVIDIA container runtime found: running the CUDA image without a GPU" >&2
        docker_flags+=(-e "LD_LIBRARY_PATH=${DOCKER_CPU_LD_LIBRARY_PATH:-/usr/local/cuda-12.4/compat}")
    fi
    for name in "${dragon_vars[@]}"; do
        [[ "${name}" == DRAGON_MODEL ]] || docker_flags+=(-e "${name}")
    done
    echo "test.sh: ${#jobs[@]} job(s) from ${input_dir} in image ${tag} (${image_flavour:-unlabelled}), GPUs: ${gpus}"
else
    echo "test.sh: ${#jobs[@]} job(s) from ${input_dir} without Docker (scripts/sandbox_run.sh), python ${py}"
fi

run_job_docker() {
    local job="$1" dest="$2" name vol cid rc=0
    name="dragon-test-$$-${job}"
    vol="${name}-output"
    "${docker}" volume create "${vol}" >/dev/null
    local -a timer=()
    [[ "${timeout_s}" != 0 ]] && timer=(timeout "${timeout_s}")
    "${timer[@]}" "${docker}" run --rm --name "${name}" "${docker_flags[@]}" \
        -v "${input_dir}/${job}:/input:ro" -v "${vol}:/output" \
        "${tag}" "${proc_args[@]}" || rc=$?
    if [[ ${rc} -eq 124 ]]; then
        echo "test.sh: ${job} ran past ${timeout_s}s" >&2
        "${docker}" rm -f "${name}" >/dev/null 2>&1 || true
    fi
    # Copy the volume out through a container that never starts (docker cp reads volumes too).
    cid="$("${docker}" create -v "${vol}:/output" "${tag}")"
    if ! "${docker}" cp "${cid}:/output/." "${dest}/" && [[ ${rc} -eq 0 ]]; then
        rc=1
    fi
    "${docker}" rm "${cid}" >/dev/null
    "${docker}" volume rm "${vol}" >/dev/null
    return "${rc}"
}

run_job_sandbox() {
    local job="$1" dest="$2"
    local pass="${dragon_vars[*]}"
    SANDBOX_PASS_ENV="${pass}" "${repo_root}/scripts/sandbox_run.sh" \
        --input "${input_dir}/${job}" --output "${dest}" --memory "${memory}" \
        --timeout "${timeout_s}" --chdir "${repo_root}" -- \
        "${py}" process.py --input '{input}' --output '{output}' "${proc_args[@]}"
}

failed=()
for job in "${jobs[@]}"; do
    dest="${pred_root}/${job}"
    rm -rf "${dest}"
    mkdir -p "${dest}"
    log="${out_root}/logs/${job}.log"
    echo "=== ${job}"
    start=${SECONDS}
    if [[ ${use_docker} -eq 1 ]]; then
        run_job_docker "${job}" "${dest}" 2>&1 | tee "${log}" || failed+=("${job}")
    else
        run_job_sandbox "${job}" "${dest}" 2>&1 | tee "${log}" || failed+=("${job}")
    fi
    echo "=== ${job}: $((SECONDS - start)) s, log ${log}"
done

if [[ ${#failed[@]} -gt 0 ]]; then
    die "${#failed[@]} job(s) failed: ${failed[*]} (logs in ${out_root}/logs)"
fi

eval_args=(-m extractor.evaluate --predictions "${pred_root}" --jobs "${input_dir}")
[[ -n "${gt_dir}" ]] && eval_args+=(--ground-truth "${gt_dir}")
[[ -n "${max_cases}" ]] && eval_args+=(--max-cases "${max_cases}")
report="${out_root}/evaluate.txt"
rc=0
"${py}" "${eval_args[@]}" >"${report}" 2>&1 || rc=$?
if [[ ${rc} -ne 0 ]]; then
    cat "${report}"
    die "evaluation failed (exit ${rc}); predictions in ${pred_root}"
fi

# Print the report without its closing line, which this script prints last, once checked.
last_no="$(grep -n -v '^[[:space:]]*$' "${report}" | tail -n 1 | cut -d: -f1)"
last_no="${last_no:-1}"
head -n "$((last_no - 1))" "${report}"
last="$(sed -n "${last_no}p" "${report}")"
if [[ -n "${gt_dir}" ]]; then
    [[ "${last}" =~ ^overall[[:space:]]+([^[:space:]]+)$ ]] ||
        die "the evaluation did not end with 'overall <score>': ${last}"
    score="${BASH_REMATCH[1]}"
    if ! awk -v s="${score}" -v m="${min_score}" 'BEGIN { exit !(s + 0 >= m + 0 && s == s + 0) }'; then
        echo "test.sh: overall score ${score} is below --min-score ${min_score}" >&2
        echo "overall ${score}"
        exit 1
    fi
    echo "overall ${score}"
else
    [[ "${last}" =~ ^verified[[:space:]]+[0-9]+[[:space:]]+jobs$ ]] ||
        die "the evaluation did not end with 'verified <n> jobs': ${last}"
    echo "${last}"
fi
