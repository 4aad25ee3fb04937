"""How far a few-shot run follows its nearest solved example (why few-shot can trail the vote).

    python scripts/example_copying.py --jobs DIR --ground-truth DIR --predictions ROOT [--max-cases N]

For each single-label classification job (probabilities cut at 0.5): the share of test reports
whose prediction equals the truth, equals the label of the most similar training report (the
example shown last, next to the report), and how often that nearest label is itself right.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extractor.dragon_io import load_job  # noqa: E402
from extractor.fewshot import Retriever  # noqa: E402
from extractor.reference_backends import load_ground_truth  # noqa: E402

SINGLE = ("single_label_binary_classification", "single_label_multi_class_classification")


def as_label(value: object) -> object:
    return value >= 0.5 if isinstance(value, float) else value


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=Path, required=True)
    parser.add_argument("--ground-truth", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--max-cases", type=int, default=None)
    args = parser.parse_args(argv)
    print("| job | cases | model = truth | model = nearest example | nearest example = truth |")
    print("|---|---|---|---|---|")
    for job_dir in sorted(p for p in args.jobs.iterdir() if p.is_dir()):
        job = load_job(job_dir)
        label_name = job.config.label_name
        key = label_name.removesuffix("_target")
        if key not in SINGLE:
            continue
        pred_file = args.predictions / job_dir.name / "nlp-predictions-dataset.json"
        if not pred_file.is_file():
            continue
        preds = {str(r["uid"]): as_label(r[key]) for r in orjson.loads(pred_file.read_bytes())}
        truth = load_ground_truth(args.ground_truth / f"{job.config.task_name}.json", label_name)
        retriever = Retriever(job.train)
        cases = [c for c in job.test[: args.max_cases] if c.uid in preds]
        nearest = {c.uid: as_label(job.train[retriever.nearest(c, 1)[0]].label) for c in cases}
        n = len(cases)
        right = sum(preds[c.uid] == as_label(truth[c.uid]) for c in cases) / n
        copied = sum(preds[c.uid] == nearest[c.uid] for c in cases) / n
        near_right = sum(nearest[c.uid] == as_label(truth[c.uid]) for c in cases) / n
        print(f"| {job_dir.name} | {n} | {right:.2f} | {copied:.2f} | {near_right:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
