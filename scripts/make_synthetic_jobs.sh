#!/usr/bin/env bash
# Write DRAGON's nine synthetic example jobs (Task101-Task109, fold 0) and their ground truth with
# DRAGON's own generators (the dragon-prep package), for users without a copy of the data.
#
# Usage: scripts/make_synthetic_jobs.sh OUT
# Writes OUT/input/<Task>-fold0/ (the four files a Grand Challenge job mounts as /input) and
# OUT/ground-truth/<Task>.json (dragon-eval's format): the layout test.sh and extractor.evaluate read.
# Env: PREP_VENV  the generators' own environment [default ~/.cache/dragon-llm-extractor/dragon-prep-0.2.9]
#      PYTHON     interpreter for that environment [default python3]
#
# dragon-prep 0.2.9 needs pandas<3 while the product pins pandas 3, so the generators get their own
# pinned environment, made once (PyPI is needed only then). It is installed --no-deps with the
# packages the synthetic generators import: its declared spaCy and openpyxl serve only the
# real-data preparation scripts, which are not run here.
set -euo pipefail

die() {
    echo "make_synthetic_jobs: $*" >&2
    exit 1
}

[[ $# -eq 1 && "$1" != -* ]] || {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    [[ "${1:-}" == -h || "${1:-}" == --help ]] && exit 0
    exit 2
}
out="$1"

# The generators' environment; every package pinned (numpy's legacy RandomState and scikit-learn's
# KFold make the data; pandas writes the JSON).
pins=(dragon-prep==0.2.9 pandas==2.3.3 numpy==2.4.6 scikit-learn==1.9.1 scipy==1.17.1
    joblib==1.6.0 threadpoolctl==3.8.0 narwhals==2.29.0 cloudpickle==3.1.3 tqdm==4.70.1
    python-dateutil==4.0.0 pytz==2026.6 tzdata==2026.6)
venv="${PREP_VENV:-${XDG_CACHE_HOME:-${HOME}/.cache}/dragon-llm-extractor/dragon-prep-0.2.9}"
stamp="${venv}/.pins"
if [[ ! -x "${venv}/bin/python" || "$(cat "${stamp}" 2>/dev/null)" != "${pins[*]}" ]]; then
    echo "make_synthetic_jobs: creating ${venv} (dragon-prep 0.2.9 and its pinned packages)"
    rm -rf "${venv}"
    "${PYTHON:-python3}" -m venv "${venv}"
    "${venv}/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "${pins[@]}" ||
        die "installing the generators failed (PyPI is needed once, for ${venv})"
    printf '%s' "${pins[*]}" >"${stamp}"
fi

mkdir -p "${out}"
out="$(cd "${out}" && pwd -P)"
work="$(mktemp -d "${out}/.make.XXXXXX")"
trap 'rm -rf "${work}"' EXIT

# Each generator's main() with its own defaults (case counts, seeds); tqdm's progress bars and
# the optional-anonymiser notice go to the log.
(cd "${work}" && "${venv}/bin/python" - "${work}/prep" >"${work}/log" 2>&1) <<'EOF' ||
import importlib
import inspect
import sys

import dragon_prep.utils

# The published files (dragon_baseline's test-input) keep each generator's own uids
# ("Task101_case0"); dragon-prep 0.2.9 renames them to "<task_name>_case<i>" by default.
# Everything else is the same, so turning the renaming off reproduces them byte for byte.
split = dragon_prep.utils.split_and_save_data
names = [p.name for p in inspect.signature(split).parameters.values() if p.default is not p.empty]
defaults = list(split.__defaults__)
defaults[names.index("anonymize_uid")] = False
split.__defaults__ = tuple(defaults)

TASKS = [
    "Task101_Example_sl_bin_clf", "Task102_Example_sl_mc_clf", "Task103_Example_mednli",
    "Task104_Example_ml_bin_clf", "Task105_Example_ml_mc_clf", "Task106_Example_sl_reg",
    "Task107_Example_ml_reg", "Task108_Example_sl_ner", "Task109_Example_ml_ner",
]
for task in TASKS:
    importlib.import_module(f"dragon_prep.{task}").main(output_dir=sys.argv[1])
EOF
    {
        tail -n 20 "${work}/log" >&2
        die "a generator failed"
    }

mkdir -p "${out}/input" "${out}/ground-truth"
count=0
for job in "${work}"/prep/algorithm-input/*-fold0; do
    task="$(basename "${job}" -fold0)"
    rm -rf "${out}/input/${task}-fold0"
    mv "${job}" "${out}/input/${task}-fold0"
    mv "${work}/prep/test-set/${task}.json" "${out}/ground-truth/${task}.json"
    count=$((count + 1))
done
[[ ${count} -eq 9 ]] || die "expected 9 jobs, the generators wrote ${count}"
echo "make_synthetic_jobs: wrote ${count} jobs to ${out}/input and their ground truth to ${out}/ground-truth"
