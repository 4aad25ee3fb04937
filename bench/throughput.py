"""Throughput: the naive high-level loop against the batched engine at N = 1, 4, 8, 16.

    python bench/throughput.py --job DIR [--model PATH] [--max-cases N] [--settings naive,1,4,8,16]
    python bench/throughput.py --replay test/goldens/fixtures.json   # forced steps, no weights

The job's requests are built as process.py builds them, without solved examples (load_job, the
model's tokenizer and chat template, PromptBuilder; context sized as process.py sizes it). Then,
each setting in its own subprocess so peak memory (ru_maxrss) is its own:

* `naive`: what a user of the high-level API writes: one `Llama`, and per report one
  `create_chat_completion(messages, grammar=<from the same schema>, temperature=0, max_tokens)`
  in a loop (its automatic reuse of the shared prompt prefix left on). Same threads as the engine.
  Time split measured by wrapping `Llama.eval` (several tokens: prefill, one: decode) and
  `Llama.sample` (sampling, grammar included).
* `N`: the engine (`extractor.engine.Engine`) with N parallel sequences and its CPU plan (the
  same logits whatever N is, so `same answer` against N=1 should read 100%); `Nm`: its GPU plan
  (one llama_decode per step), for comparison; `llama`: the engine with one sequence; a trailing
  `t` (`8t`, `1mt`): the same, fed token by token (`Engine(forced_runs=False)`), the steps before
  forced runs.
  Time split from the engine's stats: prefill, decode, scoring (evaluating candidate labels),
  sampling (grammar checks); other = Python bookkeeping.

Decode steps per answer: the evaluations of a sequence after its prompt (each step that carries
its chosen token with the run the grammar forces after it, or a candidate label being scored).
With `--json`, every setting's answers per request: parsed answer, label likelihoods, text.
Rates count every report from the first request to the last result, model loading excluded.
The table ends with `speedup <x>`: the best engine setting's reports/s over the naive loop's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_requests(job_dir: Path, model: Path, max_cases: int | None, reasoning_setting: str) -> tuple[list[Any], int]:
    """The job's first-attempt requests as process.py builds them (without solved examples), and
    the per-sequence context."""
    from extractor.dragon_io import load_job
    from extractor.engine import LlamaChat
    from extractor.pipeline import apply_settings, context_for
    from extractor.prompts import PromptBuilder
    from extractor.settings import parse_settings
    from extractor.taskfiles import load_taskfiles, taskfile_for_job

    job = load_job(job_dir)
    tf = taskfile_for_job(job.config, job.train, load_taskfiles(REPO / "taskfiles"))
    tf = apply_settings(tf, parse_settings(["--reasoning", reasoning_setting]))  # process.py's override and budget
    chat = LlamaChat.open(model)
    builder = PromptBuilder(
        tf,
        chat,
        truncation_side=job.config.recommended_truncation_side,
        context_limit=chat.context_limit,
    )
    cases = [c for c in job.test if not c.is_blank]
    if max_cases is not None:
        cases = cases[:max_cases]
    reasoning = tf.reasoning.enabled
    longest = max(
        (builder.build(c, reasoning=reasoning, max_tokens=tf.max_output_tokens).request.prompt_tokens for c in cases),
        default=0,
    )
    n_ctx = min(context_for(longest, tf), builder.context_limit)
    builder.context_limit = n_ctx
    requests = [builder.build(c, reasoning=reasoning, max_tokens=tf.max_output_tokens).request for c in cases]
    return requests, n_ctx


def parse(text: str) -> Any:
    import orjson

    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def run_naive(requests: list[Any], model: Path, n_ctx: int, threads: int, gpu: str) -> dict[str, Any]:
    from llama_cpp import Llama, LlamaGrammar

    from extractor.engine import EngineOptions, gpu_layers, schema_to_grammar

    llm = Llama(
        str(model),
        n_gpu_layers=gpu_layers(EngineOptions(gpu=gpu, allow_cpu=True)),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    grammars: dict[str, Any] = {}
    times = {"prefill_s": 0.0, "decode_s": 0.0, "sampling_s": 0.0}
    counts = {"prompt_eval": 0}
    eval_orig, sample_orig = llm.eval, llm.sample

    def timed_eval(tokens: Any) -> None:
        t0 = time.perf_counter()
        eval_orig(tokens)
        key = "prefill_s" if len(tokens) > 1 else "decode_s"
        times[key] += time.perf_counter() - t0
        if len(tokens) > 1:
            counts["prompt_eval"] += len(tokens)

    def timed_sample(*args: Any, **kwargs: Any) -> int:
        t0 = time.perf_counter()
        token = sample_orig(*args, **kwargs)
        times["sampling_s"] += time.perf_counter() - t0
        return token

    llm.eval = timed_eval  # type: ignore[method-assign]
    llm.sample = timed_sample  # type: ignore[method-assign]
    answers: dict[str, Any] = {}
    prompt_tokens = output_tokens = 0
    start = time.perf_counter()
    for req in requests:
        gbnf = schema_to_grammar(req.schema)
        grammar = grammars.get(gbnf)
        if grammar is None:
            grammar = grammars[gbnf] = LlamaGrammar.from_string(gbnf, verbose=False)
        out = llm.create_chat_completion(
            messages=[{"role": m.role, "content": m.content} for m in req.messages],
            grammar=grammar,
            temperature=0.0,
            max_tokens=req.max_tokens,
        )
        prompt_tokens += out["usage"]["prompt_tokens"]
        output_tokens += out["usage"]["completion_tokens"]
        answers[req.uid] = {"answer": parse(out["choices"][0]["message"]["content"] or ""), "best": None}
    elapsed = time.perf_counter() - start
    llm.close()
    return {
        "elapsed_s": elapsed,
        "reports": len(requests),
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_evaluated": counts["prompt_eval"],
        "output_tokens": output_tokens,
        "scoring_s": 0.0,
        **times,
        "answers": answers,
    }


def run_llama(requests: list[Any], model: Path, n_ctx: int, threads: int, gpu: str) -> dict[str, Any]:
    """The engine with one sequence (--parallel 1): the reference the batched answers are compared to."""
    from extractor.engine import Engine, EngineOptions

    engine = Engine(model, EngineOptions(n_ctx=n_ctx, n_threads=threads, gpu=gpu, allow_cpu=True), n_seq=1)
    return _drive(engine, requests)


def run_engine(
    requests: list[Any], model: Path, n_ctx: int, threads: int, gpu: str, n_seq: int, exact: bool, forced_runs: bool
) -> dict[str, Any]:
    from extractor.engine import Engine, EngineOptions

    options = EngineOptions(n_ctx=n_ctx, n_threads=threads, gpu=gpu, allow_cpu=True, n_seq=n_seq)
    engine = Engine(model, options, exact=exact, forced_runs=forced_runs)
    return _drive(engine, requests)


def _drive(engine: Any, requests: list[Any]) -> dict[str, Any]:
    engine.check_schema(requests[0].schema)
    answers: dict[str, Any] = {}
    prompt_tokens = output_tokens = 0
    start = time.perf_counter()
    for result in engine.generate(requests):
        prompt_tokens += result.prompt_tokens
        output_tokens += result.output_tokens
        best = {name: max(lik, key=lik.get) for name, lik in result.likelihoods.items() if lik}
        answers[result.uid] = {
            "answer": parse(result.text) if result.finished else None,
            "best": best,
            "likelihoods": {k: dict(v) for k, v in result.likelihoods.items()},
            "text": result.text,
            "error": result.error,
        }
    elapsed = time.perf_counter() - start
    st = engine.stats
    engine.close()
    return {
        "elapsed_s": elapsed,
        "reports": len(requests),
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_evaluated": st.prompt_tokens_evaluated,
        "output_tokens": output_tokens,
        "prefill_s": st.prefill_s,
        "decode_s": st.decode_s,
        "scoring_s": st.scoring_s,
        "sampling_s": st.sampling_s,
        "full_grammar_applies": st.full_grammar_applies,
        "greedy_accepted": st.greedy_accepted,
        "extra": st.extra,
        "steps_per_answer": st.extra.get("answer_steps", 0) / max(st.extra.get("answers", 0), 1),
        "answers": answers,  # per request: parsed answer, most likely label, label likelihoods, text
    }


def worker(args: argparse.Namespace) -> None:
    requests, n_ctx = build_requests(args.job, args.model, args.max_cases, args.reasoning)
    if args.worker == "naive":
        out = run_naive(requests, args.model, n_ctx, args.threads, args.gpu)
    elif args.worker == "llama":
        out = run_llama(requests, args.model, n_ctx, args.threads, args.gpu)
    else:
        setting = args.worker.removesuffix("t")
        token_by_token = setting != args.worker
        mixed = setting.endswith("m")
        n_seq = int(setting.removesuffix("m"))
        out = run_engine(requests, args.model, n_ctx, args.threads, args.gpu, n_seq, not mixed, not token_by_token)
    out["n_ctx"] = n_ctx
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def agreement(ref: dict[str, Any], other: dict[str, Any]) -> tuple[float, float, float, float]:
    """Shares of reports with the same text, the same parsed answer and the same most likely label
    per field, and the largest likelihood difference."""
    same_text = same_answer = same_best = n = 0
    worst = 0.0
    for uid, a in ref["answers"].items():
        b = other["answers"].get(uid)
        if b is None:
            continue
        n += 1
        same_text += a.get("text") == b.get("text")
        same_answer += a["answer"] == b["answer"]
        same_best += a.get("best") == b.get("best")
        for name, lik in (a.get("likelihoods") or {}).items():
            for literal, value in lik.items():
                other_value = (b.get("likelihoods") or {}).get(name, {}).get(literal)
                if other_value is not None:
                    worst = max(worst, abs(value - other_value))
    if not n:
        return (float("nan"),) * 4
    return same_text / n, same_answer / n, same_best / n, worst


def replay_steps(goldens: Path, model: Path) -> list[tuple[str, int, float, float]]:
    """Decode steps per answer, token by token against forced runs, on the same answers: each
    stored answer (scripts/engine_goldens.py's file) is replayed through the real grammar and
    vocabulary (no weights) with logits that make the model write that text's tokens. Per job:
    (job, answers, steps token by token, steps with forced runs)."""
    import numpy as np
    import orjson

    from extractor.backend import Request
    from extractor.decoder import Decoder, EngineStats, Phase, byte_probe
    from extractor.engine import Grammars
    from extractor.llama_api import Model

    vocab = Model(model, vocab_only=True)
    grammars = Grammars(vocab)
    probe = byte_probe(vocab, vocab.n_vocab, [vocab.eos])

    def play(req: Request, target: bytes, forced: bool) -> int:
        def logits(text: bytes) -> np.ndarray:
            v = np.zeros(vocab.n_vocab, dtype=np.float32)
            if text == target:
                v[vocab.eos] = 10.0
            elif target.startswith(text):
                v[vocab.text_tokens(target[len(text) :].decode("utf-8", "ignore"))[0]] = 10.0
            return v

        dec = Decoder(
            req, [1, 2], req.max_tokens, grammars.compiled(req.schema).clone(), vocab, EngineStats(),
            n_ctx=1 << 16, batch_room=512, probe=probe if forced else None,
        )  # fmt: skip
        cache = [1, 2]
        while dec.result is None:
            feed = dec.feed()
            toks = list(feed.tokens)

            def row(j: int, seen: list[int] = cache + toks, at: int = len(cache)) -> np.ndarray:
                return logits(b"".join(vocab.piece(t) for t in seen[2 : at + j + 1]))

            dec.evaluated(len(toks), row)
            if feed.phase is not Phase.SCORE:
                cache += toks
        dec.close()
        if dec.result is None or dec.result.text.encode() != target:
            raise RuntimeError(f"{req.uid}: the replay did not write the stored answer")
        return dec.steps

    record = orjson.loads(goldens.read_bytes())
    out = []
    for job in record["jobs"]:
        steps = {False: 0, True: 0}
        for r in job["requests"]:
            req = Request(
                r["uid"], (), "", 0, r["schema"], r["max_tokens"], {k: tuple(v) for k, v in r["choices"].items()}
            )
            text = record["results"][job["job"]][r["uid"]]["text"].encode()
            for forced in steps:
                steps[forced] += play(req, text, forced)
        n = len(job["requests"])
        out.append((job["job"], n, steps[False] / n, steps[True] / n))
    grammars.close()
    vocab.close()
    return out


def steps_per_answer(r: dict[str, Any]) -> float:
    """Evaluations of a sequence after its prompt (decode steps and candidate-literal scoring), per answer."""
    extra = r.get("extra", {})
    return extra.get("answer_steps", 0) / max(extra.get("answers", 0), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", type=Path, default=None, help="DRAGON job folder")
    parser.add_argument(
        "--replay",
        type=Path,
        default=None,
        help="instead: steps per answer token by token vs forced runs on a goldens file's answers (no weights)",
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--max-cases", type=int, default=None)
    parser.add_argument(
        "--settings",
        default="naive,1,4,8,16",
        help="comma list: naive, llama (one sequence), N (N sequences, CPU plan), Nm (N, the one-call GPU plan); "
        "a trailing t (8t, 1mt) feeds token by token instead of with forced runs",
    )
    parser.add_argument(
        "--gpu", default="off", choices=("auto", "on", "off"), help="offload to the GPU (as process.py)"
    )
    parser.add_argument("--reasoning", default="auto", choices=("auto", "on", "off"), help="as process.py's flag")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: the cores this process may use)")
    parser.add_argument("--json", type=Path, default=None, help="also write all measurements here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads <= 0:
        from extractor.engine import available_cores

        args.threads = available_cores()
    if args.replay:
        rows = replay_steps(args.replay, args.model)
        for job, n, old, new in rows:
            print(f"{job:40} {n:4} answers: {old:6.1f} -> {new:6.1f} steps per answer ({1 - new / old:.1%} fewer)")
        n_all = sum(r[1] for r in rows)
        old_all, new_all = (sum(r[1] * r[k] for r in rows) / n_all for k in (2, 3))
        print(f"{'all':40} {n_all:4} answers: {old_all:6.1f} -> {new_all:6.1f} ({1 - new_all / old_all:.1%} fewer)")
        return 0
    if args.job is None:
        parser.error("--job is required")
    if args.worker:
        worker(args)
        return 0

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    load_before = os.getloadavg()
    print(
        f"job {args.job.name}, model {args.model.name}, {args.max_cases or 'all'} cases, reasoning {args.reasoning}, "
        f"{args.threads} threads, {os.cpu_count()} CPUs, GPU {args.gpu}, load average before {load_before[0]:.2f}",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    for setting in settings:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", setting, "--job", str(args.job)]
        cmd += ["--model", str(args.model), "--threads", str(args.threads), "--reasoning", args.reasoning]
        cmd += ["--gpu", args.gpu]
        if args.max_cases is not None:
            cmd += ["--max-cases", str(args.max_cases)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"setting {setting} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results[setting] = json.loads(line[len("RESULT ") :])
        r = results[setting]
        print(f"  {setting}: {r['reports'] / r['elapsed_s']:.3f} reports/s ({r['elapsed_s']:.1f} s)", flush=True)
    load_after = os.getloadavg()

    ref_name = "llama" if "llama" in results else "1"
    ref = results.get(ref_name)
    header = (
        f"{'setting':>8} {'rep/s':>7} {'prompt tok/s':>12} {'out tok/s':>9} {'prefill':>7} {'decode':>7} "
        f"{'scoring':>7} {'sampling':>8} {'other':>6} {'peak RSS':>9} {'same text':>9} {'same answer':>11} "
        f"{'same argmax':>11} {'max |dlogL|':>11}"
    )
    print()
    print(header)
    print("-" * len(header))
    for setting, r in results.items():
        el = r["elapsed_s"]
        shares = [r[k] / el for k in ("prefill_s", "decode_s", "scoring_s", "sampling_s")]
        other = max(0.0, 1.0 - sum(shares))
        if ref is not None and setting not in (ref_name, "naive"):
            same_text, same_answer, same_best, worst = agreement(ref, r)
            agree = f"{same_text:>9.1%} {same_answer:>11.1%} {same_best:>11.1%} {worst:>11.2g}"
        else:
            mark = "ref" if setting == ref_name else "-"
            agree = f"{mark:>9} {mark:>11} {mark:>11} {mark:>11}"
        name = setting if setting in ("naive", "llama") else "N=" + setting
        print(
            f"{name:>8} {r['reports'] / el:>7.3f} "
            f"{r['prompt_tokens'] / el:>12.1f} {r['output_tokens'] / el:>9.1f} "
            + " ".join(f"{s:>7.1%}" for s in shares[:3])
            + f" {shares[3]:>8.1%} {other:>6.1%} {r['peak_rss_mib']:>7.0f} M {agree}"
        )
    print()
    for setting, r in results.items():
        if setting in ("naive", "llama"):
            continue
        decode = r["decode_s"] + r["scoring_s"]
        print(
            f"N={setting}: grammar sampling {r['sampling_s'] / max(decode, 1e-9):.1%} of decode time; "
            f"{r['greedy_accepted']} greedy tokens accepted, {r['extra'].get('topk_grammar_applies', 0)} top-k and "
            f"{r['full_grammar_applies']} full-vocabulary grammar applies; {r['extra'].get('steps', 0)} steps; "
            f"{steps_per_answer(r):.1f} decode steps per answer, {r['extra'].get('forced_tokens', 0)} forced tokens "
            f"in {r['extra'].get('forced_runs', 0)} runs"
        )
    print(f"load average after {load_after[0]:.2f} (1 min), {load_after[1]:.2f} (5 min)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"load": [load_before, load_after], "results": results}))
    naive = results.get("naive")
    engines = [r["reports"] / r["elapsed_s"] for s, r in results.items() if s not in ("naive", "llama")]
    if naive and engines:
        print(f"speedup {max(engines) / (naive['reports'] / naive['elapsed_s']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
