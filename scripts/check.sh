#!/usr/bin/env bash
# Every check the project has, as CI runs it: lint, the test suite, and the runtime check on the
# example jobs and the nine synthetic DRAGON jobs. The runtime check runs the image
# (scripts/docker_check.sh: build, DRAGON's docker flags, export and load) when a Docker engine
# answers, and process.py in scripts/sandbox_run.sh (test.sh --no-docker) otherwise.
#
# Usage: scripts/check.sh        (after scripts/setup.sh)
# Env:   CHECK_SYNTHETIC_CASES   test cases per synthetic job for the runtime check [default 2]
#        CHECK_DOCKER            auto (default), 1 (fail without an engine) or 0 (sandbox only)
#        CHECK_SYNTHETIC_DIR     the synthetic jobs [default ../shared/data/dragon-synthetic when
#                                present, else written by scripts/make_synthetic_jobs.sh into
#                                runs/dragon-synthetic]
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"
py=.venv/bin/python
[[ -x "${py}" ]] || { echo "check: no .venv: run scripts/setup.sh first" >&2; exit 1; }

echo "=== lint"
bash scripts/lint.sh

echo "=== tests"
"${py}" -m pytest

# The runtime check proves the platform's constraints are honoured, not accuracy: a capped output
# budget keeps the small model's NER answers from running to the Taskfiles' full budgets.
export DRAGON_MAX_OUTPUT_TOKENS="${DRAGON_MAX_OUTPUT_TOKENS:-256}"
# One solved example instead of the Taskfiles' four: the synthetic NER prompts shrink from about
# 8k tokens to a third, which keeps CI's CPU time down without skipping any job.
export DRAGON_K="${DRAGON_K:-1}"
# Four validation cases for the model's side of the validation choice instead of 32: the choice
# still runs with the model, and the nine synthetic jobs take minutes, not twenty (the NER ones
# answer 32 validation cases at about 30 s each on 2 cores).
export DRAGON_VALIDATION_CASES="${DRAGON_VALIDATION_CASES:-4}"

synthetic="${CHECK_SYNTHETIC_DIR:-}"
if [[ -z "${synthetic}" ]]; then
    synthetic="${repo_root}/../shared/data/dragon-synthetic"
    if [[ ! -d "${synthetic}/input" ]]; then
        synthetic="${repo_root}/runs/dragon-synthetic"
        if [[ ! -d "${synthetic}/input" ]]; then
            echo "=== synthetic DRAGON jobs: scripts/make_synthetic_jobs.sh ${synthetic}"
            bash scripts/make_synthetic_jobs.sh "${synthetic}"
        fi
    fi
fi
[[ -d "${synthetic}/input" ]] || { echo "check: no synthetic jobs in ${synthetic}/input" >&2; exit 1; }

docker_mode="${CHECK_DOCKER:-auto}"
if [[ "${docker_mode}" == auto ]]; then
    docker_mode=0
    if command -v "${DOCKER:-docker}" >/dev/null 2>&1 && "${DOCKER:-docker}" info >/dev/null 2>&1; then
        docker_mode=1
    fi
fi

if [[ "${docker_mode}" == 1 ]]; then
    echo "=== runtime check (docker): the image, on the example jobs and ${synthetic}"
    bash scripts/docker_check.sh --synthetic "${synthetic}"
else
    echo "=== runtime check (no Docker engine: sandbox): example jobs"
    ./test.sh --no-docker --max-cases 2 --output runs/check-examples
    echo "=== runtime check (sandbox): synthetic DRAGON jobs in ${synthetic}"
    ./test.sh --no-docker --max-cases "${CHECK_SYNTHETIC_CASES:-2}" --output runs/check-synthetic \
        "${synthetic}/input" "${synthetic}/ground-truth"
fi
echo "check: all passed"
