#!/usr/bin/env bash
# The docker-mode runtime check (scripts/check.sh runs it when a Docker engine answers): build the
# image, run jobs through it with DRAGON's flags, check what the platform relies on, export it,
# load the export back and run it again.
#
# Usage: scripts/docker_check.sh [--cuda | --cpu] [--synthetic DIR] [--out DIR]
#   --cuda, --cpu    flavour [default: as build.sh, cuda where an NVIDIA runtime is present]
#   --synthetic DIR  also run the synthetic jobs in DIR/input, scored against DIR/ground-truth
#   --out DIR        logs, predictions and the export [default runs/docker-check]
# Env: CHECK_CASES (test cases per example job, default 2), CHECK_SYNTHETIC_CASES (per synthetic
#      job, default 2), DRAGON_* as for test.sh.
#
# Steps (each must pass):
#   1. ./build.sh (the CPU flavour reuses scripts/setup.sh's cached llama-cpp-python wheel)
#   2. the image runs as `user`
#   3. ./test.sh on the example jobs (and the synthetic ones): DRAGON's docker run flags, verified
#      and scored predictions
#   4. one job once more, kept after it ends: `docker diff` shows no write outside /tmp (/output
#      is a volume), the model tarball that export.sh writes, extracted to /opt/ml/model/, is the
#      model the job loads, and the time from `docker run` to the first answered report is printed
#   5. ./export.sh; the image is removed, `docker load` brings it back with the same id, and
#      ./test.sh runs one example job on it again (its predictions are compared with step 3's)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"
# shellcheck source=scripts/docker_common.sh
source "${repo_root}/scripts/docker_common.sh"

flavour=""
synthetic=""
out="runs/docker-check"

die() {
    echo "docker_check: FAILED: $*" >&2
    exit 1
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --cuda) flavour=cuda; shift ;;
        --cpu) flavour=cpu; shift ;;
        --synthetic) synthetic="${2:?--synthetic needs a directory}"; shift 2 ;;
        --out) out="${2:?--out needs a directory}"; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

docker="$(docker_cli)"
"${docker}" info >/dev/null 2>&1 || die "no Docker engine answers"
[[ -n "${flavour}" ]] || flavour="$(auto_flavour)"
tag="$(default_tag "${flavour}")"
cases="${CHECK_CASES:-2}"
rm -rf "${out}"
mkdir -p "${out}"
out="$(cd "${out}" && pwd -P)"

step() {
    echo "--- docker_check: $*"
}

step "1. build (${flavour}, ${tag})"
start=${SECONDS}
if ! BUILD_PROGRESS=plain ./build.sh "--${flavour}" --tag "${tag}" >"${out}/build.log" 2>&1; then
    tail -n 40 "${out}/build.log" >&2
    die "./build.sh (log ${out}/build.log)"
fi
tail -n 1 "${out}/build.log"
echo "docker_check: build took $((SECONDS - start)) s"

step "2. the image runs as user"
config_user="$("${docker}" image inspect --format '{{.Config.User}}' "${tag}")"
[[ "${config_user}" == user ]] || die "the image's USER is '${config_user}', not user"
who="$("${docker}" run --rm --network=none --entrypoint id "${tag}" -un)"
[[ "${who}" == user ]] || die "a container of ${tag} runs as '${who}', not user"
echo "docker_check: USER user; id -un in the container: ${who}"

step "3. ./test.sh on the example jobs (${cases} cases each)"
test_args=("--${flavour}" --tag "${tag}" --max-cases "${cases}")
./test.sh "${test_args[@]}" --output "${out}/examples" | tail -n 3
if [[ -n "${synthetic}" ]]; then
    step "3. ./test.sh on the synthetic jobs in ${synthetic} (${CHECK_SYNTHETIC_CASES:-2} cases each)"
    ./test.sh "--${flavour}" --tag "${tag}" --max-cases "${CHECK_SYNTHETIC_CASES:-2}" \
        --output "${out}/synthetic" "${synthetic}/input" "${synthetic}/ground-truth" | tail -n 12
fi

step "4. export.sh's model tarball at /opt/ml/model/, no write outside /tmp, time to the first report"
./export.sh --tag "${tag}" --out "${out}/export" --no-image --model-tarball >/dev/null
mkdir -p "${out}/opt-ml-model"
tar -xzf "${out}/export/model.tar.gz" -C "${out}/opt-ml-model"
chmod -R a+rX "${out}/opt-ml-model"
tarball_model="$(cd "${out}/opt-ml-model" && ls -- *.gguf)"
job="$(find test/fixtures/jobs -mindepth 1 -maxdepth 1 -type d | sort | head -n 1)"
name="dragon-check-$$"
vol="${name}-output"
"${docker}" volume create "${vol}" >/dev/null
gpu_flags=()
if [[ "${flavour}" == cuda ]] && nvidia_runtime_present; then
    gpu_flags=(--gpus=all)
fi
t0="${EPOCHREALTIME}"
rc=0
"${docker}" run --name "${name}" "${gpu_flags[@]}" --network=none --memory=15g --memory-swap=15g \
    --cap-drop=ALL --security-opt=no-new-privileges --shm-size=128m --pids-limit=256 \
    -v "${repo_root}/${job}:/input:ro" -v "${vol}:/output" \
    -v "${out}/opt-ml-model:/opt/ml/model:ro" -e DRAGON_LOG_LEVEL=INFO \
    "${tag}" --max-cases 1 2>&1 |
    while IFS= read -r line; do
        printf '%7.2f %s\n' "$(awk -v a="${t0}" -v b="${EPOCHREALTIME}" 'BEGIN { print b - a }')" "${line}"
    done >"${out}/isolation.log" || rc=$?
diff_out="$("${docker}" diff "${name}")"
"${docker}" rm "${name}" >/dev/null
"${docker}" volume rm "${vol}" >/dev/null
[[ ${rc} -eq 0 ]] || { tail -n 20 "${out}/isolation.log" >&2; die "the job with the model tarball (log ${out}/isolation.log)"; }
grep -q "model /opt/ml/model/${tarball_model} " "${out}/isolation.log" ||
    die "the job did not load /opt/ml/model/${tarball_model} (log ${out}/isolation.log)"
echo "docker_check: the job loaded /opt/ml/model/${tarball_model} over the baked-in model"
# The runtime creates the mount point /opt/ml/model (and /opt/ml); every other change must be
# under /tmp.
outside="$(printf '%s\n' "${diff_out}" | awk 'NF == 2 && $2 != "/tmp" && $2 !~ "^/tmp/" && $2 != "/opt" && $2 != "/opt/ml" && $2 != "/opt/ml/model"' || true)"
[[ -z "${outside}" ]] || die "the container wrote outside /tmp and /output: ${outside}"
echo "docker_check: docker diff, all under /tmp or the /opt/ml/model mount point: $(printf '%s\n' "${diff_out}" | head -n 12 | tr '\n' ' ')"
first="$(grep -m 1 -E 'reports/s|1/1 ' "${out}/isolation.log" | cut -c1-7 | tr -d ' ' || true)"
total="$(tail -n 1 "${out}/isolation.log" | cut -c1-7 | tr -d ' ')"
echo "docker_check: docker run to the first answered report: ${first:-?} s (whole one-case job: ${total} s)"

step "5. export, remove, docker load, run again"
id_before="$("${docker}" image inspect --format '{{.Id}}' "${tag}")"
./export.sh --tag "${tag}" --out "${out}/export" | grep -E 'wrote' || die "./export.sh"
# export.sh's name for it: the tag with / : @ replaced.
tarball="${out}/export/$(printf '%s' "${tag}" | tr '/:@' '__-').tar.gz"
[[ -f "${tarball}" ]] || die "./export.sh did not write ${tarball}"
"${docker}" image rm "${tag}" >/dev/null
gunzip -c "${tarball}" | "${docker}" load | tail -n 1
id_after="$("${docker}" image inspect --format '{{.Id}}' "${tag}")"
[[ "${id_after}" == "${id_before}" ]] || die "the loaded image ${id_after} is not the exported ${id_before}"
echo "docker_check: loaded ${tag} from $(basename "${tarball}") ($(du -h "${tarball}" | cut -f1)), same id ${id_after:7:12}"
# One job is enough to show the loaded image runs; its predictions are compared with step 3's.
one="${out}/one-job"
mkdir -p "${one}"
cp -R "${job}" "${one}/"
./test.sh "${test_args[@]}" --output "${out}/reloaded" "${one}" | tail -n 1
job_name="$(basename "${job}")"
if cmp -s "${out}/examples/predictions/${job_name}/nlp-predictions-dataset.json" \
    "${out}/reloaded/predictions/${job_name}/nlp-predictions-dataset.json"; then
    echo "docker_check: the reloaded image wrote the same predictions for ${job_name}, byte for byte"
else
    echo "docker_check: note: the reloaded image's predictions for ${job_name} differ from step 3's"
fi
size="$("${docker}" image inspect --format '{{.Size}}' "${tag}")"
echo "docker_check: all passed (${tag}: $((size / 1000 / 1000)) MB)"
