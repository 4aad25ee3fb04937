"""Score the trained heads, the training prior and the neighbour vote on DRAGON jobs (no LLM).

    .venv/bin/python scripts/heads_eval.py --jobs ../shared/data/dragon-synthetic/input \\
        --ground-truth ../shared/data/dragon-synthetic/ground-truth [--first 30] [--check-dragon-eval]

Every candidate is trained on the job's training set only. The validation set only chooses
("chosen": the candidate with the best validation score, ties to the earlier candidate); test
scores use DRAGON's metric for the task (`extractor.metrics`, equal to dragon-eval's; with
`--check-dragon-eval` the chosen predictions are scored by dragon-eval itself as well).
Prints a markdown table per job and one summary table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extractor.dragon_io import load_job  # noqa: E402
from extractor.fewshot import NeighbourVote, Retriever  # noqa: E402
from extractor.heads import train_heads  # noqa: E402
from extractor.metrics import metric_for, task_score  # noqa: E402
from extractor.prior import TrainingPrior  # noqa: E402


def evaluate_job(job_dir: Path, gt_dir: Path, first: int, seed: int) -> dict[str, Any]:
    job = load_job(job_dir)
    ttype, task = job.task_type, job.config.task_name
    truth = {str(r["uid"]): r[job.config.label_name] for r in orjson.loads((gt_dir / f"{task}.json").read_bytes())}
    test = list(job.test)
    t_truth = [truth[c.uid] for c in test]
    v_truth = [c.label for c in job.validation]

    start = time.perf_counter()
    heads = train_heads(job.train, ttype, seed=seed)
    train_s = time.perf_counter() - start
    prior = TrainingPrior(job.train, ttype)
    vote = NeighbourVote(job.train, ttype, Retriever(job.train), k=8)
    candidates: list[tuple[str, Any]] = [
        ("prior", lambda cases: [prior(c) for c in cases]),
        ("vote-k8", lambda cases: [vote(c) for c in cases]),
    ] + [(h.name, h.predict) for h in heads]

    rows = []
    predict_s = 0.0
    for name, predict in candidates:
        t0 = time.perf_counter()
        v_pred = predict(job.validation)
        t_pred = predict(test)
        if name not in ("prior", "vote-k8"):
            predict_s += time.perf_counter() - t0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows.append(
                {
                    "candidate": name,
                    "validation": task_score(ttype, v_truth, v_pred, task_name=task) if v_truth else None,
                    "test": task_score(ttype, t_truth, t_pred, task_name=task),
                    "test_first": task_score(ttype, t_truth[:first], t_pred[:first], task_name=task),
                    "predictions": t_pred,
                }
            )
    val = [r["validation"] if r["validation"] is not None else -1.0 for r in rows]
    chosen = rows[max(range(len(rows)), key=lambda i: (round(val[i], 6), -i))]
    return {
        "task": task,
        "metric": metric_for(task, ttype).kind.value,
        "rows": rows,
        "chosen": chosen,
        "train_s": train_s,
        "predict_s": predict_s,
        "n": (len(job.train), len(job.validation), len(test)),
        "label_name": job.config.label_name,
        "uids": [c.uid for c in test],
    }


def check_with_dragon_eval(results: list[dict[str, Any]], gt_dir: Path) -> dict[str, float]:
    """The chosen predictions on the full test sets, scored by dragon-eval itself."""
    from dragon_eval import DragonEval

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for res in results:
            key = res["label_name"].removesuffix("_target")
            out = root / "pred" / f"{res['task']}-fold0"
            out.mkdir(parents=True)
            records = [{"uid": u, key: p} for u, p in zip(res["uids"], res["chosen"]["predictions"], strict=True)]
            (out / "nlp-predictions-dataset.json").write_bytes(orjson.dumps(records))
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            DragonEval(
                ground_truth_path=gt_dir,
                predictions_path=root / "pred",
                output_file=root / "metrics.json",
                folds=[0],
                tasks=[r["task"] for r in results],
            ).evaluate()
        metrics = json.loads((root / "metrics.json").read_text())
    return {r["task"]: float(metrics["case"][r["task"]][f"{r['task']}-fold0"]) for r in results}


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=Path, required=True)
    parser.add_argument("--ground-truth", type=Path, required=True)
    parser.add_argument("--first", type=int, default=30, help="also score the first N test cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="substring of the task names to run")
    parser.add_argument("--check-dragon-eval", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    dirs = sorted(p.parent for p in args.jobs.glob("*/nlp-task-configuration.json") if args.only in p.parent.name)
    results = []
    for job_dir in dirs:
        res = evaluate_job(job_dir, args.ground_truth, args.first, args.seed)
        results.append(res)
        print(f"\n### {res['task']} ({res['metric']}; train/val/test {res['n']})\n")
        print(f"| candidate | validation | test (all) | test (first {args.first}) |")
        print("|---|---|---|---|")
        for r in res["rows"]:
            mark = " **(chosen)**" if r is res["chosen"] else ""
            print(f"| {r['candidate']}{mark} | {fmt(r['validation'])} | {fmt(r['test'])} | {fmt(r['test_first'])} |")
        print(f"\nheads: training {res['train_s']:.1f}s, predicting validation+test {res['predict_s']:.1f}s")
        sys.stdout.flush()

    official = check_with_dragon_eval(results, args.ground_truth) if args.check_dragon_eval else {}
    print(
        "\n| task | prior | vote k8 | best head on test | chosen on validation | test (all) "
        f"| test (first {args.first}) | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    sums = {"prior": [0.0, 0.0], "vote": [0.0, 0.0], "chosen": [0.0, 0.0]}
    for res in results:
        by = {r["candidate"]: r for r in res["rows"]}
        heads = [r for r in res["rows"] if r["candidate"] not in ("prior", "vote-k8")]
        best = max(heads, key=lambda r: r["test"]) if heads else None
        c = res["chosen"]
        for key, row in (("prior", by["prior"]), ("vote", by["vote-k8"]), ("chosen", c)):
            sums[key][0] += row["test"]
            sums[key][1] += row["test_first"]
        check = f" (dragon-eval {official[res['task']]:.3f})" if res["task"] in official else ""
        best_s = f"{best['candidate']} {best['test']:.3f}" if best else "-"
        print(
            f"| {res['task']} | {fmt(by['prior']['test'])} | {fmt(by['vote-k8']['test'])} | {best_s} | "
            f"{c['candidate']} | {c['test']:.3f}{check} | {c['test_first']:.3f} | "
            f"{res['train_s'] + res['predict_s']:.1f} |"
        )
    n = max(len(results), 1)
    print(
        f"| **overall** | {sums['prior'][0] / n:.3f} | {sums['vote'][0] / n:.3f} | | | "
        f"**{sums['chosen'][0] / n:.3f}** | **{sums['chosen'][1] / n:.3f}** | |"
    )
    print(
        f"\nfirst {args.first}: prior {sums['prior'][1] / n:.3f}, vote {sums['vote'][1] / n:.3f}, "
        f"chosen {sums['chosen'][1] / n:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
