#!/usr/bin/env bash
# Every check the project has, as CI runs it: lint, the test suite, and the docker-free runtime
# check (test.sh --no-docker) on the example jobs and, when present, on the synthetic DRAGON jobs.
#
# Usage: scripts/check.sh        (after scripts/setup.sh)
# Env:   CHECK_SYNTHETIC_CASES   test cases per synthetic job for the runtime check [default 2]
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

echo "=== runtime check: example jobs"
./test.sh --no-docker --max-cases 2 --output runs/check-examples

synthetic="${repo_root}/../shared/data/dragon-synthetic"
if [[ -d "${synthetic}/input" ]]; then
    echo "=== runtime check: synthetic DRAGON jobs"
    ./test.sh --no-docker --max-cases "${CHECK_SYNTHETIC_CASES:-2}" --output runs/check-synthetic \
        "${synthetic}/input" "${synthetic}/ground-truth"
else
    echo "=== runtime check: ${synthetic} not present, skipped"
fi
echo "check: all passed"
