"""Size benchmark: one job of 20,000 training and 5,000 test reports, with a time limit.

Writes a synthetic job (made-up Dutch-like reports, a lesion size that decides the label) into a
temporary folder and runs the pipeline on it in a child process, once per mode:

- `knn`: the neighbour-vote backend (`backend="knn"`, no model, no heads);
- `heads`: the default backend with `--validation-cases 0`, so the trained lexical heads, the
  neighbour vote and the prior compete on the validation set and the winner answers the test set,
  without loading a model.

For each run it prints the seconds per stage (from the run summary), the wall time, the child's
peak RSS and how often the retrieval index, the heads and the journal were built, then checks
peak RSS < 4 GiB, wall time < --time-limit and "built at most once per job". Exit status 1 when a
check fails. A benchmark, not a test: it takes minutes.

    flock /tmp/dragon-heavy.lock .venv/bin/python bench/size.py [--train 20000] [--test 5000]
        [--validation 500] [--time-limit 1200] [--modes knn,heads] [--task binary|regression]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PEAK_RSS_LIMIT = 4 * 2**30
LABELS = {"binary": "single_label_binary_classification_target", "regression": "single_label_regression_target"}

# Made-up filler vocabulary (not taken from any report set).
WORDS = (
    "patiënt onderzoek beeld nier lever links rechts cyste contrast echo controle verdenking geen "
    "afwijking normaal groot klein weefsel vorm rand scherp onscherp vocht vet kalk vaat wand dik dun "
    "bovenpool onderpool schors merg hilus lymfklier milt pancreas galblaas blaas prostaat aspect "
    "bekend eerder vergeleken stabiel toegenomen afgenomen advies follow-up jaar maanden aanvullend"
).split()


def report(rng: random.Random) -> tuple[str, float]:
    """One report and its lesion size in mm (the label's source)."""
    size = round(rng.uniform(1, 40), 1)
    unit_mm = rng.random() < 0.7
    size_text = f"{size:g} mm" if unit_mm else f"{size / 10:g} cm"
    filler = [rng.choice(WORDS) for _ in range(rng.randint(30, 90))]
    at = rng.randint(0, len(filler))
    sentence = ["Laesie", rng.choice(["links", "rechts"]), "van", size_text + "."]
    return " ".join(filler[:at] + sentence + filler[at:]), size


def write_job(folder: Path, n_train: int, n_test: int, n_val: int, task: str, seed: int = 0) -> Path:
    rng = random.Random(seed)
    label = LABELS[task]

    def records(prefix: str, n: int, labelled: bool) -> list[dict[str, Any]]:
        out = []
        for i in range(n):
            text, size = report(rng)
            rec: dict[str, Any] = {"uid": f"{prefix}{i}", "text": text}
            if labelled:
                rec[label] = size >= 10 if task == "binary" else size
            out.append(rec)
        return out

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "jobid": 9900,
        "task_name": f"Task990_size_{task}",
        "input_name": "text",
        "label_name": label,
        "recommended_truncation_side": "left",
        "version": "1.0",
    }
    files = {
        "nlp-task-configuration.json": config,
        "nlp-training-dataset.json": records("t", n_train, True),
        "nlp-validation-dataset.json": records("v", n_val, True),
        "nlp-test-dataset.json": records("q", n_test, False),
    }
    for name, content in files.items():
        (folder / name).write_bytes(orjson.dumps(content))
    return folder


def child(argv: list[str], counts_file: Path, backend: str) -> int:
    """Run the pipeline in this process, counting how often the per-job structures are built."""
    from extractor import fewshot, journal

    counts = {"retrieval index": 0, "heads": 0, "journal": 0}

    def counting(cls: type, name: str) -> None:
        original = cls.__init__

        def init(self, *args: Any, **kwargs: Any) -> None:
            counts[name] += 1
            original(self, *args, **kwargs)

        cls.__init__ = init

    counting(fewshot.Retriever, "retrieval index")
    counting(journal.Journal, "journal")
    try:
        from extractor import heads, pipeline

        trained = heads.train_heads

        def train_heads(*args: Any, **kwargs: Any) -> Any:
            counts["heads"] += 1
            return trained(*args, **kwargs)

        heads.train_heads = train_heads
        if hasattr(pipeline, "train_heads"):
            pipeline.train_heads = train_heads
    except ImportError:
        counts["heads"] = -1  # no heads in this version
    import process

    code = process.main(argv, backend=backend)
    counts_file.write_bytes(orjson.dumps(counts))
    return code


def run_mode(mode: str, job: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    out, summary_file, counts_file = work / f"out-{mode}", work / f"summary-{mode}.json", work / f"counts-{mode}.json"
    argv = ["--input", str(job), "--output", str(out), "--work-dir", str(work / f"journal-{mode}")]
    argv += ["--time-limit", str(args.time_limit), "--summary", str(summary_file), "--log-level", "WARNING"]
    backend = "knn"
    if mode == "heads":
        backend = "llama"
        argv += ["--validation-cases", "0", "--heads", "on"]
    cmd = [sys.executable, __file__, "--child", mode, "--counts", str(counts_file), "--backend", backend, "--", *argv]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    code = os.waitstatus_to_exitcode(status)
    result: dict[str, Any] = {"mode": mode, "exit": code, "wall_s": wall, "peak_rss": usage.ru_maxrss * 1024}
    if code == 0:
        result["summary"] = orjson.loads(summary_file.read_bytes())
        result["counts"] = orjson.loads(counts_file.read_bytes())
        result["predictions"] = len(orjson.loads((out / "nlp-predictions-dataset.json").read_bytes()))
    return result


def report_mode(r: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Print one run's figures; returns the checks that failed."""
    print(f"\n== {r['mode']}: exit {r['exit']}, wall {r['wall_s']:.1f} s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB")
    failed = []
    if r["exit"] != 0:
        return [f"{r['mode']}: exit {r['exit']}"]
    s = r["summary"]
    for stage, seconds in s["stage_seconds"].items():
        print(f"   {stage:<40} {seconds:8.2f} s")
    chosen = (s.get("choice") or {}).get("chosen", "")
    print(f"   predictions {r['predictions']} of {s['cases']} cases; answered by {chosen or 'the backend'}")
    print(f"   built per job: {r['counts']}")
    if r["peak_rss"] >= PEAK_RSS_LIMIT:
        failed.append(f"{r['mode']}: peak RSS {r['peak_rss'] / 2**30:.2f} GiB >= 4 GiB")
    if r["wall_s"] >= args.time_limit:
        failed.append(f"{r['mode']}: {r['wall_s']:.0f} s >= the time limit {args.time_limit:.0f} s")
    if r["predictions"] != args.test:
        failed.append(f"{r['mode']}: {r['predictions']} predictions for {args.test} test reports")
    for name, n in r["counts"].items():
        if n > 1:
            failed.append(f"{r['mode']}: the {name} was built {n} times")
    if r["mode"] == "heads" and r["counts"]["heads"] == 0:
        failed.append("heads: no heads were trained")
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=20_000)
    parser.add_argument("--test", type=int, default=5_000)
    parser.add_argument("--validation", type=int, default=500)
    parser.add_argument("--time-limit", type=float, default=1200.0)
    parser.add_argument("--modes", default="knn,heads")
    parser.add_argument("--task", choices=sorted(LABELS), default="binary")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--counts", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        return child([a for a in rest if a != "--"], args.counts, args.backend)

    with tempfile.TemporaryDirectory(prefix="dragon-size-") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        job = write_job(work / "job", args.train, args.test, args.validation, args.task)
        size = sum(f.stat().st_size for f in job.iterdir())
        print(
            f"job: {args.train} training, {args.validation} validation, {args.test} test reports "
            f"({size / 2**20:.1f} MiB, written in {time.monotonic() - t0:.1f} s); time limit {args.time_limit:.0f} s"
        )
        failed: list[str] = []
        for mode in args.modes.split(","):
            failed += report_mode(run_mode(mode, job, work, args), args)
    print()
    for line in failed:
        print(f"FAIL {line}")
    if not failed:
        print("PASS peak RSS < 4 GiB, inside the time limit, complete predictions, each structure built once")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
