"""Side-by-side markdown table of several `extractor.evaluate` runs (for the README).

    python scripts/results_table.py NAME=runs/DIR[+runs/DIR2 ...] [NAME=... ...]

Each DIR is an evaluate `--out` folder (it holds metrics.json); columns appear in the order given.
`DIR+DIR2` joins runs made on different jobs into one column (a later folder wins for a job both
hold); its overall score is then the mean over the joined tasks, as `evaluate` computes it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson


def load_column(spec: str) -> list[dict[str, Any]]:
    """The job rows of one column: every folder's metrics.json, joined by job name."""
    jobs: dict[str, dict[str, Any]] = {}
    for folder in spec.split("+"):
        for job in orjson.loads((Path(folder) / "metrics.json").read_bytes())["jobs"]:
            jobs[job["job"]] = job
    return list(jobs.values())


def task_of(job: dict[str, Any]) -> str:
    return job["job"].rsplit("-fold", 1)[0]


def task_scores(jobs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean score over a task's folds; a job without a score counts as 0, as in `evaluate`."""
    by_task: dict[str, list[float]] = {}
    for job in jobs:
        by_task.setdefault(task_of(job), []).append(job["score"] if job["score"] is not None else 0.0)
    return {task: sum(s) / len(s) for task, s in by_task.items()}


def main(argv: list[str]) -> None:
    runs = [(name, load_column(spec)) for name, spec in (a.rsplit("=", 1) for a in argv)]
    scores = [task_scores(jobs) for _, jobs in runs]
    tasks = sorted({t for s in scores for t in s})
    print("| task | " + " | ".join(name for name, _ in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for task in tasks:
        print(f"| {task} | " + " | ".join(f"{s[task]:.3f}" if task in s else "-" for s in scores) + " |")
    print("| **overall** | " + " | ".join(f"**{sum(s.values()) / len(s):.3f}**" for s in scores) + " |")
    seconds = [sum(j["seconds"] for j in jobs) for _, jobs in runs]
    print("| seconds (all jobs) | " + " | ".join(f"{s:.0f}" for s in seconds) + " |")
    # Answers resumed from a checkpoint journal cost nothing in this run: only generated reports count.
    cases = [sum((j.get("cases") or 0) - (j.get("resumed") or 0) for j in jobs) for _, jobs in runs]
    if all(cases):
        per_report = (f"{s / n:.2f}" for s, n in zip(seconds, cases, strict=True))
        print("| seconds per generated report | " + " | ".join(per_report) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
