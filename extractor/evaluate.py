"""Local evaluation: run the pipeline over DRAGON job folders and score with `dragon-eval`.

    python -m extractor.evaluate --jobs DIR --ground-truth DIR --out DIR \\
        [--backend llama|oracle|prior] [--max-cases N] [process.py options ...]

Any other option (`--model`, `--taskfiles`, `--reasoning`, ...) goes to the pipeline as in
`process.py`, so one command compares models, prompts and settings. With `--predictions ROOT`
nothing runs: existing predictions are verified (and scored when ground truth is given).
The last line printed is `overall <score>` (or `verified <n> jobs`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from extractor.dragon_io import CONFIG_FILE, PREDICTIONS_FILE, JobError, PredictionError, load_job, verify_predictions
from extractor.settings import REPO_ROOT, parse_settings
from extractor.tasktypes import ValueKind

log = logging.getLogger("evaluate")
FOLD_SUFFIX = re.compile(r"-fold(\d+)$")


@dataclass
class JobRow:
    task_name: str
    fold: int
    job_dir: Path
    label_name: str = ""
    seconds: float = 0.0
    failures: int = 0
    cases: int = 0
    resumed: int = 0  # answers taken from a checkpoint journal: they cost no time in this run
    error: str | None = None
    score: float | None = None
    note: str = ""


@dataclass
class EvalReport:
    rows: list[JobRow] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def task_scores(self) -> dict[str, float]:
        by_task: dict[str, list[float]] = {}
        for row in self.rows:
            by_task.setdefault(row.task_name, []).append(row.score if row.score is not None else 0.0)
        return {task: sum(v) / len(v) for task, v in by_task.items()}

    @property
    def overall(self) -> float:
        scores = self.task_scores()
        return sum(scores.values()) / len(scores) if scores else 0.0


def find_jobs(root: Path) -> list[JobRow]:
    """Every DRAGON job folder under `root` (or `root` itself), with task name and fold."""
    dirs = [root] if (root / CONFIG_FILE).is_file() else sorted(p.parent for p in root.glob(f"*/{CONFIG_FILE}"))
    rows = []
    for job_dir in dirs:
        config = orjson.loads((job_dir / CONFIG_FILE).read_bytes())
        task = str(config.get("task_name", job_dir.name))
        m = FOLD_SUFFIX.search(job_dir.name)
        fold = int(m.group(1)) if m else int(config.get("jobid", 0)) % 10
        rows.append(JobRow(task_name=task, fold=fold, job_dir=job_dir, label_name=str(config.get("label_name", ""))))
    if not rows:
        raise SystemExit(f"no DRAGON job folders (with {CONFIG_FILE}) under {root}")
    return rows


def job_name(row: JobRow) -> str:
    return f"{row.task_name}-fold{row.fold}"


def run_jobs(rows: list[JobRow], pred_root: Path, backend: str, gt_dir: Path | None, pipeline_args: list[str]) -> None:
    """Run process.py's pipeline on each job, in this process."""
    sys.path.insert(0, str(REPO_ROOT))
    import process  # the entry point at the repository root

    for row in rows:
        out = pred_root / job_name(row)
        settings = parse_settings(["--input", str(row.job_dir), "--output", str(out), *pipeline_args])
        truth = gt_dir / f"{row.task_name}.json" if gt_dir else None
        start = time.perf_counter()
        try:
            summary = process.run_job(settings, backend=backend, ground_truth=truth)
            row.failures, row.cases, row.resumed = summary.failures, summary.cases, summary.resumed
        except (JobError, PredictionError, ValueError, RuntimeError) as err:
            row.error = str(err)
            log.error("%s: %s", job_name(row), err)
        row.seconds = time.perf_counter() - start
        log.info("%s: %.1fs, %d failures", job_name(row), row.seconds, row.failures)


def verify_existing(rows: list[JobRow], pred_root: Path, max_cases: int | None) -> None:
    import dataclasses

    for row in rows:
        path = pred_root / job_name(row) / PREDICTIONS_FILE
        if row.error:
            continue
        try:
            job = load_job(row.job_dir)
            test = job.test[:max_cases] if max_cases is not None else job.test
            job = dataclasses.replace(job, test=test)
            records = orjson.loads(path.read_bytes()) if path.is_file() else None
            if records is None:
                raise PredictionError(f"{path}: missing")
            verify_predictions(records, job)
            row.cases = len(test)
        except (JobError, PredictionError, orjson.JSONDecodeError) as err:
            row.error = str(err)


def _dragon_eval_tasks() -> dict[str, Any]:
    from dragon_eval.evaluation import TASK_TYPE

    return TASK_TYPE


def metric_name(task_name: str) -> str:
    known = _dragon_eval_tasks()
    return known[task_name].value if task_name in known else "per-case agreement (not a DRAGON task name)"


def score(rows: list[JobRow], pred_root: Path, gt_dir: Path, work: Path) -> dict[str, Any]:
    """Score with dragon-eval where it knows the task; per-case agreement elsewhere."""
    from dragon_eval import DragonEval

    known = _dragon_eval_tasks()
    metrics: dict[str, Any] = {"case": {}, "aggregates": {}}
    for task in sorted({r.task_name for r in rows}):
        task_rows = [r for r in rows if r.task_name == task and not r.error]
        if not task_rows:
            continue
        truth_path = gt_dir / f"{task}.json"
        if not truth_path.is_file():
            for r in task_rows:
                r.error = f"no ground truth {truth_path}"
            continue
        truth = orjson.loads(truth_path.read_bytes())
        predicted = set()
        for r in task_rows:
            records = orjson.loads((pred_root / job_name(r) / PREDICTIONS_FILE).read_bytes())
            predicted |= {str(rec["uid"]) for rec in records}
        subset = [t for t in truth if str(t["uid"]) in predicted]
        if task not in known:
            log.warning("dragon-eval does not know %s; reporting per-case agreement instead", task)
            for r in task_rows:
                r.score = agreement(r, pred_root, subset)
            continue
        gt_sub = work / "ground-truth"
        gt_sub.mkdir(parents=True, exist_ok=True)
        (gt_sub / f"{task}.json").write_bytes(orjson.dumps(subset))
        out_file = work / f"metrics-{task}.json"
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            DragonEval(
                ground_truth_path=gt_sub,
                predictions_path=pred_root,
                output_file=out_file,
                folds=sorted({r.fold for r in task_rows}),
                tasks=[task],
            ).evaluate()
        result = json.loads(out_file.read_text())  # dragon-eval writes NaN for undefined metrics
        (work / f"dragon-eval-{task}.log").write_text(captured.getvalue())
        for r in task_rows:
            r.score = float(result["case"][task][job_name(r)])
            if math.isnan(r.score):
                log.warning("%s: the metric is undefined on these cases (NaN); counted as 0", job_name(r))
                r.score, r.note = 0.0, "NaN (undefined on these cases), counted as 0"
        metrics["case"][task] = result["case"][task]
        metrics["aggregates"][task] = result["aggregates"][task]
    return metrics


def agreement(row: JobRow, pred_root: Path, truth: list[dict[str, Any]]) -> float:
    """Share of cases whose prediction equals the truth (probabilities rounded, numbers within 5%)."""
    from extractor.tasktypes import task_type

    ttype = task_type(row.label_name)
    records = {
        str(r["uid"]): r[ttype.prediction_key]
        for r in orjson.loads((pred_root / job_name(row) / PREDICTIONS_FILE).read_bytes())
    }

    def same(p: Any, t: Any) -> bool:
        if isinstance(t, list):
            return isinstance(p, list) and len(p) == len(t) and all(same(a, b) for a, b in zip(p, t, strict=True))
        if ttype.kind is ValueKind.BINARY:
            return (float(p) >= 0.5) == bool(t)
        if ttype.kind is ValueKind.NUMBER:
            return t is None or math.isclose(float(p), float(t), rel_tol=0.05, abs_tol=1e-9)
        return p == t

    pairs = [(records.get(str(t["uid"])), t[row.label_name]) for t in truth]
    return sum(same(p, t) for p, t in pairs if p is not None) / len(pairs) if pairs else 0.0


def render_table(report: EvalReport) -> list[str]:
    lines = [
        "| task | fold | type | metric | score | seconds | failures |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        shown = f"{r.score:.3f}" if r.score is not None else f"error: {r.error}"
        shown += f" ({r.note})" if r.note else ""
        kind = r.label_name.removesuffix("_target")
        cells = [r.task_name, str(r.fold), kind, metric_name(r.task_name), shown, f"{r.seconds:.1f}", str(r.failures)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"| **overall** | | | mean over {len(report.task_scores())} tasks | **{report.overall:.3f}** | | |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=Path, required=True, help="folder of DRAGON job folders (or one job folder)")
    parser.add_argument("--ground-truth", type=Path, help="folder of <task_name>.json ground-truth files")
    parser.add_argument("--out", type=Path, default=Path("runs/latest"), help="where predictions and metrics go")
    parser.add_argument("--backend", choices=("llama", "oracle", "prior", "knn"), default="llama")
    parser.add_argument("--max-cases", type=int, help="only the first N test cases of each job")
    parser.add_argument("--predictions", type=Path, help="score these existing predictions instead of running")
    parser.add_argument("--min-score", type=float, default=None, help="exit 1 when the overall score is lower")
    args, pipeline_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    rows = find_jobs(args.jobs)
    if args.predictions:
        pred_root = args.predictions
    else:
        pred_root = args.out / "predictions"
        if args.backend == "oracle" and not args.ground_truth:
            raise SystemExit("--backend oracle needs --ground-truth")
        if args.max_cases is not None:
            pipeline_args += ["--max-cases", str(args.max_cases)]
        run_jobs(rows, pred_root, args.backend, args.ground_truth, pipeline_args)
    verify_existing(rows, pred_root, args.max_cases)
    failed = [r for r in rows if r.error]
    for r in failed:
        print(f"FAILED {job_name(r)}: {r.error}", file=sys.stderr)

    if not args.ground_truth:
        for r in rows:
            print(f"{job_name(r)}: {'ok' if not r.error else 'FAILED'} ({r.cases} cases)")
        print(f"verified {len(rows) - len(failed)} jobs")
        return 1 if failed else 0

    work = args.out if not args.predictions else args.out
    work.mkdir(parents=True, exist_ok=True)
    report = EvalReport(rows=rows, metrics=score(rows, pred_root, args.ground_truth, work))
    report.metrics["overall"] = report.overall
    report.metrics["jobs"] = [
        {
            "job": job_name(r),
            "score": r.score,
            "seconds": round(r.seconds, 2),
            "cases": r.cases,
            "resumed": r.resumed,
            "failures": r.failures,
            "error": r.error,
        }
        for r in rows
    ]
    table = render_table(report)
    (work / "metrics.json").write_bytes(orjson.dumps(report.metrics, option=orjson.OPT_INDENT_2))
    (work / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"overall {report.overall:.4f}")
    if failed:
        return 1
    if args.min_score is not None and report.overall < args.min_score:
        print(f"overall score {report.overall:.4f} is below --min-score {args.min_score}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
