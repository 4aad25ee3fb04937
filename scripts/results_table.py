"""Side-by-side markdown table of several `extractor.evaluate` runs (for the README).

    python scripts/results_table.py NAME=runs/DIR [NAME=runs/DIR ...]

Each DIR is an evaluate `--out` folder (it holds metrics.json); columns appear in the order given.
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson


def main(argv: list[str]) -> None:
    runs = [
        (name, orjson.loads((Path(path) / "metrics.json").read_bytes()))
        for name, path in (a.rsplit("=", 1) for a in argv)
    ]
    tasks = sorted({job["job"].rsplit("-fold", 1)[0] for _, m in runs for job in m["jobs"]})
    print("| task | " + " | ".join(name for name, _ in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for task in tasks:
        cells = []
        for _, m in runs:
            scores = [j["score"] for j in m["jobs"] if j["job"].startswith(task + "-fold") and j["score"] is not None]
            cells.append(f"{sum(scores) / len(scores):.3f}" if scores else "-")
        print(f"| {task} | " + " | ".join(cells) + " |")
    print("| **overall** | " + " | ".join(f"**{m['overall']:.3f}**" for _, m in runs) + " |")
    seconds = [sum(j["seconds"] for j in m["jobs"]) for _, m in runs]
    print("| seconds (all jobs) | " + " | ".join(f"{s:.0f}" for s in seconds) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
