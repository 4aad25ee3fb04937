"""Raw engine goldens: the engine's text and label likelihoods for fixed requests.

    python scripts/engine_goldens.py record   # build the requests, run the engine, write the goldens
    python scripts/engine_goldens.py check    # run the engine on the stored requests, compare

Why: a refactor of the engine must not move a single answer on the CPU. The requests are built
once, as the pipeline builds them (validation choice off, output capped at 256 tokens, k=1 solved
example, as scripts/check.sh runs), and stored, so a later check compares the engine alone, not
the prompt building. Each request set runs twice: one sequence at a time (`--parallel 1`) and
eight sequences together (the CPU plan); both must reproduce the goldens exactly (6 decimals).

* Example fixture jobs (`test/fixtures/jobs/*`, every test case): requests and results in
  `test/goldens/fixtures.json` (the test suite compares them, see test/test_goldens.py).
* Synthetic DRAGON jobs (`../shared/data/dragon-synthetic/input/*`, first 8 test cases),
  measurement only, skipped when absent: results in `test/goldens/synthetic.json`, the requests
  (their text comes from ../shared, which is not ours to copy) in `runs/engine-goldens/`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from extractor.backend import Message, Request, Result  # noqa: E402

GOLDENS = REPO / "test" / "goldens"
CACHE = REPO / "runs" / "engine-goldens"
FIXTURES = REPO / "test" / "fixtures" / "jobs"
SYNTHETIC = REPO.parent / "shared" / "data" / "dragon-synthetic" / "input"
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SYNTHETIC_CASES = 8
SETTINGS_ENV = {"DRAGON_MAX_OUTPUT_TOKENS": "256", "DRAGON_K": "1", "DRAGON_CHOOSE_EXAMPLES": "0"}


def build_job_requests(job_dir: Path, model: Path, max_cases: int | None) -> dict[str, Any]:
    """One job's first-attempt requests as the pipeline builds them, and the job's context size."""
    for key, value in SETTINGS_ENV.items():
        os.environ[key] = value
    from extractor.dragon_io import load_job
    from extractor.fewshot import Retriever
    from extractor.settings import parse_settings
    from extractor.summary import RunSummary
    from extractor.taskfiles import load_taskfiles, taskfile_for_job

    try:
        from extractor.pipeline import apply_settings, prompt_builder  # type: ignore[attr-defined]
    except ImportError:
        from process import apply_settings, prompt_builder  # type: ignore[no-redef]
    from extractor.engine import LlamaChat

    settings = parse_settings(["--input", str(job_dir), "--output", str(CACHE / "unused")])
    job = load_job(job_dir)
    tf = apply_settings(taskfile_for_job(job.config, job.train, load_taskfiles(settings.taskfiles)), settings)
    cases = [c for c in job.test if not c.is_blank][:max_cases]
    import dataclasses

    job = dataclasses.replace(job, test=tuple(cases))
    summary = RunSummary(backend="llama")
    builder = prompt_builder(tf, LlamaChat.open(model), job, settings, Retriever(job.train), summary)
    requests = [
        builder.build(c, reasoning=tf.reasoning.enabled, max_tokens=tf.max_output_tokens).request for c in cases
    ]
    return {"job": job_dir.name, "n_ctx": summary.n_ctx, "requests": [request_to_json(r) for r in requests]}


def request_to_json(req: Request) -> dict[str, Any]:
    return {
        "uid": req.uid,
        "messages": [[m.role, m.content] for m in req.messages],
        "prompt": req.prompt,
        "prompt_tokens": req.prompt_tokens,
        "schema": req.schema,
        "max_tokens": req.max_tokens,
        "choices": {k: list(v) for k, v in req.choices.items()},
    }


def request_from_json(d: dict[str, Any]) -> Request:
    return Request(
        uid=d["uid"],
        messages=tuple(Message(role, content) for role, content in d["messages"]),
        prompt=d["prompt"],
        prompt_tokens=d["prompt_tokens"],
        schema=d["schema"],
        max_tokens=d["max_tokens"],
        choices={k: tuple(v) for k, v in d["choices"].items()},
    )


def result_to_json(r: Result) -> dict[str, Any]:
    return {
        "text": r.text,
        "likelihoods": {f: {lit: round(v, 6) for lit, v in lik.items()} for f, lik in r.likelihoods.items()},
        "finished": r.finished,
        "output_tokens": r.output_tokens,
        "error": r.error,
    }


def prompt_digest(req: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps([req["messages"], req["schema"], req["max_tokens"]])).hexdigest()[:16]


def open_engine(model: Path, n_ctx: int, n_seq: int, threads: int) -> Any:
    """The engine for one setting: one sequence at a time (--parallel 1) or n_seq together (CPU plan)."""
    from extractor.engine import Engine, EngineOptions

    return Engine(model, EngineOptions(n_ctx=n_ctx, n_threads=threads, gpu="off", n_seq=n_seq))


def run_jobs(jobs: Sequence[dict[str, Any]], model: Path, n_seq: int, threads: int) -> dict[str, dict[str, Any]]:
    """Every job's results (uid -> result json), one engine per job (its context is the job's)."""
    out: dict[str, dict[str, Any]] = {}
    for job in jobs:
        engine = open_engine(model, job["n_ctx"], n_seq, threads)
        try:
            requests = [request_from_json(r) for r in job["requests"]]
            engine.check_schema(requests[0].schema)
            out[job["job"]] = {r.uid: result_to_json(r) for r in engine.generate(requests)}
        finally:
            engine.close()
    return out


def compare(want: dict[str, dict[str, Any]], got: dict[str, dict[str, Any]]) -> list[str]:
    """Every difference, as lines naming job, uid and what moved."""
    diffs = []
    for job, results in want.items():
        for uid, w in results.items():
            g = got.get(job, {}).get(uid)
            if g != w:
                what = "missing" if g is None else ", ".join(k for k in w if w[k] != g.get(k))
                diffs.append(f"{job} {uid}: {what}")
    return diffs


def job_dirs(root: Path) -> Iterable[Path]:
    return sorted(p for p in root.iterdir() if (p / "nlp-task-configuration.json").is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("record", "check"))
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sets", default="fixtures,synthetic", help="comma list: fixtures, synthetic")
    parser.add_argument("--parallel", default="1,8", help="comma list of sequence counts to run")
    parser.add_argument(
        "--write", action="store_true", help="with check: store the first setting's results as the new goldens"
    )
    args = parser.parse_args(argv)
    GOLDENS.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    failed = False
    for name in [s for s in args.sets.split(",") if s]:
        root = FIXTURES if name == "fixtures" else SYNTHETIC
        golden_file = GOLDENS / f"{name}.json"
        request_file = golden_file if name == "fixtures" else CACHE / f"{name}-requests.json"
        if name == "synthetic" and not SYNTHETIC.is_dir():
            print(f"{name}: {SYNTHETIC} not present, skipped")
            continue
        if args.mode == "record":
            limit = None if name == "fixtures" else SYNTHETIC_CASES
            jobs = [build_job_requests(d, args.model, limit) for d in job_dirs(root)]
            if name != "fixtures":
                request_file.write_bytes(orjson.dumps({"jobs": jobs}))
        else:
            jobs = orjson.loads(request_file.read_bytes())["jobs"]
        runs = {}
        for n_seq in [int(p) for p in args.parallel.split(",")]:
            t0 = time.perf_counter()
            runs[n_seq] = run_jobs(jobs, args.model, n_seq, args.threads)
            n = sum(len(v) for v in runs[n_seq].values())
            print(f"{name}: N={n_seq}: {n} results in {time.perf_counter() - t0:.0f} s", flush=True)
        if args.mode == "record":
            first, *others = runs.values()
            for n_seq, other in list(runs.items())[1:]:
                diffs = compare(first, other)
                print(f"{name}: N={n_seq} against N={next(iter(runs))}: {len(diffs)} differences", *diffs, sep="\n  ")
                failed |= bool(diffs)
            record: dict[str, Any] = {
                "settings": SETTINGS_ENV,
                "results": first,
                "prompts": {j["job"]: {r["uid"]: prompt_digest(r) for r in j["requests"]} for j in jobs},
            }
            if name == "fixtures":
                record["jobs"] = jobs
            # No key sorting: a schema's property order is the order its fields are written in.
            golden_file.write_bytes(orjson.dumps(record, option=orjson.OPT_INDENT_2) + b"\n")
            print(f"{name}: wrote {golden_file.relative_to(REPO)}")
        else:
            stored = orjson.loads(golden_file.read_bytes())
            want = stored["results"]
            for n_seq, got in runs.items():
                diffs = compare(want, got)
                total = sum(len(v) for v in want.values())
                print(f"{name}: N={n_seq}: {total - len(diffs)} of {total} identical", *diffs, sep="\n  ")
                failed |= bool(diffs) and not args.write
            if args.write:
                first, *others = runs.values()
                if any(compare(first, other) for other in others):
                    print(f"{name}: the settings disagree with each other: nothing written")
                    failed = True
                else:
                    stored["results"] = first
                    golden_file.write_bytes(orjson.dumps(stored, option=orjson.OPT_INDENT_2) + b"\n")
                    print(f"{name}: wrote the new results to {golden_file.relative_to(REPO)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
