"""The one GPU check: throughput, grammar cost, embedding pass and plan drift in one short command.

    bash bench/device_check.sh [--rehearse]          (the wrapper: installs the kit, then runs this)
    python bench/device_check.py run --kit device-kit --out OUT [--rehearse] [--deadline EPOCH]

A GPU machine is lent for minutes, without network, so everything it needs travels in a kit
(scripts/make_device_kit.sh: wheels, tokenizer-only GGUFs, a synthetic job) and this command
measures everything at once, most important first, rewriting its tables in OUT after every
measurement so a timeout still returns what was measured:

1. random-weight GGUFs of 14B and 7B shape (bench/random_gguf.py, the kit's tokenizers);
2. bench/throughput.py per setting (the naive high-level loop, the engine at N = 1 and its GPU
   plan at N = 8, 16, 32, 64) with chain of thought on: reports/s, prefill/decode/scoring/grammar
   shares, decode steps per answer and peak GPU memory (nvidia-smi polled from here);
3. the grammar's cost with Gemma 3's real 262k vocabulary (a 14B-shaped model with that tokenizer;
   the padded 152k vocabulary of step 2 is mostly unused tokens, which the grammar rejects cheaply);
4. the embedding pass (`Engine.embed`): reports/s, or "not implemented";
5. the drift of the GPU plan from N = 1: the largest label log-likelihood difference and the number
   of parsed answers that differ, on the reports both ran.

`--rehearse` runs the same code on the CPU with tiny shapes and few reports (the CPU build in the
current interpreter), so the device itself is the only untried thing. Subcommands `kit-tokenizer`,
`kit-job` and `kit-wheel` are the kit's parts (called by scripts/make_device_kit.sh).
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"

SMOLLM_TOKENIZER = "smollm2-135m.tokenizer.gguf"
GEMMA_TOKENIZER = "gemma3-270m.tokenizer.gguf"
JOB_NAME = "Task102_Example_sl_mc_clf-fold0"  # chain of thought on in its Taskfile; a label field
# Distributions the device image lacks (KINDS.md's package list against requirements.txt), plus the
# GGUF writer; typing-extensions travels too since pydantic-core needs a recent one. numpy,
# scikit-learn, scipy, joblib, threadpoolctl, tqdm, jinja2 and MarkupSafe are there already
# (numpy 2.5 there against the 2.4 pin here: the image's scipy and scikit-learn are built for it).
# SimpleITK is left out: only extractor/gc_io.py imports it, lazily, for image sockets.
DEVICE_LACKS = (
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "orjson",
    "bm25s",
    "diskcache",
    "gguf",
)
KIT_LIMIT_BYTES = 64 * 2**20


# -- the kit's parts ------------------------------------------------------------------------------


def tokenizer_gguf(src: Path, out: Path) -> Path:
    """A GGUF holding only src's tokenizer.* fields (vocabulary, merges, chat template): what
    random_gguf.py copies, without the weights (the default model's 98 MB cannot travel)."""
    from gguf import GGUFWriter

    sys.path.insert(0, str(BENCH))
    from random_gguf import tokenizer_fields

    fields = tokenizer_fields(src)
    if not any(name == "tokenizer.ggml.tokens" for name, *_ in fields):
        raise SystemExit(f"{src}: no tokenizer.ggml.tokens field: not a GGUF with a tokenizer")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(out), "llama")
    writer.add_name(f"tokenizer of {src.name}")
    for name, value, vtype, sub in fields:
        writer.add_key_value(name, value, vtype, sub_type=sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return out


SYMPTOMS = ("abdominal pain", "weight loss", "fever", "a palpable mass", "haematuria", "back pain", "fatigue")
DIAGNOSES = ("a cyst", "a tumour", "an abscess", "metastases", "an infection", "stones", "no abnormality")
ORGANS = ("left kidney", "right kidney", "liver", "spleen", "pancreas", "adrenal gland", "bladder", "lung")
KINDS = ("lesion", "normal structure", "other structure")


def synthetic_report(rng: random.Random) -> tuple[str, str]:
    """A made-up report in the example tasks' style (template sentences, sizes in mm or cm) and its
    Task102 label: the number of lesions measured in cm, '4' for four or more."""
    parts = [f"Patient presents with {rng.choice(SYMPTOMS)}; suspected {rng.choice(DIAGNOSES)}."]
    count = 0
    for _ in range(rng.randint(2, 7)):
        kind, organ = rng.choice(KINDS), rng.choice(ORGANS)
        unit = rng.choice(("mm", "cm"))
        size = rng.uniform(0.5, 9.9) if unit == "cm" else rng.uniform(2, 95)
        space = rng.choice((" ", ""))
        count += kind == "lesion" and unit == "cm"
        parts.append(f"{kind.capitalize()} of the {organ} of {size:.1f}{space}{unit}.")
    parts.append(f"Advice: follow-up in {rng.randint(2, 12)} months, compare with earlier imaging.")
    return " ".join(parts), str(min(count, 4))


def synthetic_job(folder: Path, n_test: int, n_train: int = 32, seed: int = 0) -> Path:
    """A DRAGON job folder shaped like Task102 (the shipped Taskfile serves it) with made-up reports."""
    rng = random.Random(seed)
    label_name = "single_label_multi_class_classification_target"

    def records(prefix: str, n: int, labelled: bool) -> list[dict[str, Any]]:
        out = []
        for i in range(n):
            text, label = synthetic_report(rng)
            rec: dict[str, Any] = {"uid": f"{prefix}{i}", "text": text}
            if labelled:
                rec[label_name] = label
            out.append(rec)
        return out

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "jobid": 1020,
        "task_name": JOB_NAME.rsplit("-", 1)[0],
        "input_name": "text",
        "label_name": label_name,
        "recommended_truncation_side": "left",
        "version": "1.0",
    }
    files = {
        "nlp-task-configuration.json": config,
        "nlp-training-dataset.json": records("train", n_train, True),
        "nlp-validation-dataset.json": [],
        "nlp-test-dataset.json": records("case", n_test, False),
    }
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=1))
    return folder


def fix_cuda_library(data: bytes, patchelf: Path) -> bytes:
    """libggml-cuda as the device must load it: linked against an empty driver stub, the linker
    dropped libcuda.so.1 from its DT_NEEDED (no symbol came from it), so loading failed with
    'undefined symbol: cuMemCreate'; and its RUNPATH named this machine's cache folders. patchelf
    adds the driver back and keeps only $ORIGIN (the device's nvidia-* libraries come in through
    LD_LIBRARY_PATH, bench/device_check.sh)."""
    with tempfile.TemporaryDirectory() as tmp:
        lib = Path(tmp) / "libggml-cuda.so.0"
        lib.write_bytes(data)
        needed = subprocess.run([str(patchelf), "--print-needed", str(lib)], capture_output=True, text=True, check=True)
        if "libcuda.so.1" not in needed.stdout.split():
            subprocess.run([str(patchelf), "--add-needed", "libcuda.so.1", str(lib)], check=True)
        subprocess.run([str(patchelf), "--set-rpath", "$ORIGIN", str(lib)], check=True)
        return lib.read_bytes()


def slim_wheel(src: Path, out_dir: Path, patchelf: Path | None = None) -> Path:
    """The llama-cpp-python wheel with each shared library once.

    A zip cannot hold symbolic links, so the wheel stores every library three times in llama_cpp/lib
    (libX.so, libX.so.0, libX.so.0.N) and again in lib/, which only a C build against it would use;
    with the CUDA library that is several times the travel limit. Kept: the Python package, the
    names Python loads (libllama.so, libggml.so, libmtmd.so, libllava.so) and the SONAMEs the
    libraries ask each other for (libX.so.0). With `patchelf`, libggml-cuda is fixed up
    (fix_cuda_library). RECORD is rewritten for what is kept."""
    loaded = {"libllama.so", "libggml.so", "libmtmd.so", "libllava.so"}
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / src.name
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        record_name = f"{dist_info}/RECORD"
        keep = []
        for name in names:
            top, base = name.split("/")[0], name.rsplit("/", 1)[-1]
            if name == record_name:
                continue
            if top == "llama_cpp" and "/lib/" in name and ".so" in base:
                if base not in loaded and not base.endswith(".so.0"):
                    continue
            elif top not in ("llama_cpp", dist_info):
                continue
            keep.append(name)
        rows = io.StringIO()
        record = csv.writer(rows, lineterminator="\n")
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zout:
            for name in keep:
                data = zin.read(name)
                info = zin.getinfo(name)
                if patchelf is not None and name.rsplit("/", 1)[-1].startswith("libggml-cuda.so"):
                    data = fix_cuda_library(data, patchelf)
                zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                record.writerow([name, f"sha256={digest}", len(data)])
            record.writerow([record_name, "", ""])
            zout.writestr(record_name, rows.getvalue())
    return out


# -- measuring ------------------------------------------------------------------------------------


class GpuMemoryPoll:
    """Peak GPU memory while a measurement runs, from `nvidia-smi --loop-ms` (no engine changes)."""

    def __init__(self, interval_ms: int = 200) -> None:
        self.peak_mib: int | None = None
        self.proc: subprocess.Popen[str] | None = None
        self.thread: threading.Thread | None = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", f"--loop-ms={interval_ms}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                used = int(line.strip().split(",")[0])
            except ValueError:
                continue
            self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)

    def stop(self) -> int | None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.peak_mib


def gpu_memory_used_mib() -> int | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return int(out.stdout.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


@dataclass
class Phase:
    """One model and the throughput settings run on it: (setting, reports)."""

    name: str
    preset: str
    tokenizer: str
    own_vocab: bool
    settings: list[tuple[str, int]]
    embed: int = 0  # reports for the embedding pass on this model (0: none)


# Most important first: a timeout cuts the tail. The drift reference N=1 runs on fewer reports
# (chain of thought at one sequence is the slow part); the drift compares the reports both ran.
DEVICE_PHASES = [
    Phase(
        "14B", "qwen2.5-14b", SMOLLM_TOKENIZER, False,
        [("naive", 4), ("1", 16), ("8m", 32), ("16m", 32), ("32m", 64), ("64m", 128)], embed=128,
    ),
    Phase("14B, Gemma 3 vocabulary (262k)", "qwen2.5-14b", GEMMA_TOKENIZER, True, [("16m", 32), ("64m", 128)]),
    Phase("7B", "qwen2.5-7b", SMOLLM_TOKENIZER, False, [("naive", 4), ("1", 16), ("16m", 32), ("64m", 128)]),
]  # fmt: skip
REHEARSAL_PHASES = [
    Phase("tiny", "tiny", SMOLLM_TOKENIZER, False, [("naive", 2), ("1", 4), ("8m", 8), ("16m", 16)], embed=8),
    Phase("tiny, Gemma 3 vocabulary (262k)", "tiny", GEMMA_TOKENIZER, True, [("8m", 8)]),
]


@dataclass
class Check:
    """The command's state: what was measured so far, written out after every step."""

    out: Path
    work: Path  # never under out: what is left there comes back from the device, 8 GiB models too
    deadline: float
    rehearse: bool
    facts: dict[str, Any] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    embeds: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def left(self) -> float:
        return self.deadline - time.time()

    def log(self, msg: str) -> None:
        print(f"[device_check {time.time() - self.started:6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        data = {
            "facts": self.facts,
            "models": self.models,
            "runs": self.runs,
            "embeds": self.embeds,
            "drift": drift_rows(self.runs),
            "notes": self.notes,
            "elapsed_s": round(time.time() - self.started, 1),
        }
        for name, text in (("device_check.json", json.dumps(data, indent=1)), ("device_check.md", render(data))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.out / name)


def run_throughput(check: Check, phase: Phase, model: Path, job: Path, setting: str, cases: int) -> None:
    """One bench/throughput.py setting in its own process, GPU memory polled around it."""
    row: dict[str, Any] = {"phase": phase.name, "setting": setting, "cases": cases}
    budget = check.left() - 5
    if budget < 15:
        row["status"] = "skipped (time)"
        check.runs.append(row)
        check.save()
        return
    json_out = check.work / f"tp-{len(check.runs)}.json"
    cmd = [sys.executable, str(BENCH / "throughput.py"), "--job", str(job), "--model", str(model)]
    cmd += ["--settings", setting, "--max-cases", str(cases), "--reasoning", "on", "--json", str(json_out)]
    cmd += ["--gpu", "off" if check.rehearse else "on"]
    before = gpu_memory_used_mib()
    poll = GpuMemoryPoll()
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, check=False)
        status = "ok" if proc.returncode == 0 and json_out.exists() else f"failed (exit {proc.returncode})"
        tail = (proc.stdout + proc.stderr)[-1500:]
    except subprocess.TimeoutExpired as err:
        status, tail = f"timed out after {budget:.0f} s", str(err.stderr or "")[-1500:]
    peak = poll.stop()
    row["wall_s"] = round(time.time() - start, 1)
    row["gpu_mib_before"], row["gpu_mib_peak"] = before, peak
    result = None
    if json_out.exists():
        result = json.loads(json_out.read_text())["results"].get(setting)
        json_out.unlink()
    if result is None and status == "ok":
        status = "failed (no result)"
    row["status"] = status
    if result is not None:
        row.update(summarise(result))
        row["answers"] = {uid: slim_answer(a) for uid, a in result.get("answers", {}).items()}
    else:
        row["log_tail"] = tail
    check.runs.append(row)
    check.log(
        f"{phase.name} {setting} x{cases}: {status}" + (f", {row.get('reports_per_s')} reports/s" if result else "")
    )
    check.save()


def summarise(r: dict[str, Any]) -> dict[str, Any]:
    """The table's figures from one throughput.py result."""
    el = max(r["elapsed_s"], 1e-9)
    extra = r.get("extra", {})
    decode = r["decode_s"] + r["scoring_s"]
    answers = extra.get("answers", 0)
    return {
        "reports": r["reports"],
        "elapsed_s": round(r["elapsed_s"], 2),
        "reports_per_s": round(r["reports"] / el, 3),
        "prompt_tok_per_s": round(r["prompt_tokens"] / el, 1),
        "output_tok_per_s": round(r["output_tokens"] / el, 1),
        "output_tokens": r["output_tokens"],
        "prefill_share": round(r["prefill_s"] / el, 3),
        "decode_share": round(r["decode_s"] / el, 3),
        "scoring_share": round(r["scoring_s"] / el, 3),
        "grammar_share": round(r["sampling_s"] / el, 3),
        "grammar_of_decode": round(r["sampling_s"] / decode, 3) if decode > 0 else None,
        "steps_per_answer": round(extra["answer_steps"] / answers, 1) if answers else None,
        "forced_tokens": extra.get("forced_tokens"),
        "full_grammar_applies": r.get("full_grammar_applies"),
        "peak_rss_mib": round(r.get("peak_rss_mib", 0)),
        "n_ctx": r.get("n_ctx"),
    }


def slim_answer(a: dict[str, Any]) -> dict[str, Any]:
    return {"answer": a.get("answer"), "likelihoods": a.get("likelihoods") or {}}


def drift_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per GPU-plan run: its drift from the same phase's N = 1 run, on the reports both answered."""
    rows = []
    for ref in (r for r in runs if r.get("setting") == "1" and "answers" in r):
        for run in runs:
            if run["phase"] != ref["phase"] or not run["setting"].endswith("m") or "answers" not in run:
                continue
            common = [uid for uid in ref["answers"] if uid in run["answers"]]
            differ, worst, compared = 0, 0.0, 0
            for uid in common:
                a, b = ref["answers"][uid], run["answers"][uid]
                differ += a["answer"] != b["answer"]
                for name, lik in a["likelihoods"].items():
                    for literal, value in lik.items():
                        other = b["likelihoods"].get(name, {}).get(literal)
                        if other is not None:
                            compared += 1
                            worst = max(worst, abs(value - other))
            rows.append(
                {
                    "phase": ref["phase"],
                    "setting": run["setting"],
                    "reports": len(common),
                    "answers_differ": differ,
                    "likelihoods_compared": compared,
                    "max_abs_dlogl": worst if compared else None,
                }
            )
    return rows


def run_embed(check: Check, phase: Phase, model: Path, job: Path) -> None:
    row: dict[str, Any] = {"phase": phase.name, "reports": phase.embed}
    budget = min(check.left() - 5, 120)
    if budget < 15:
        row["status"] = "skipped (time)"
    else:
        cmd = [sys.executable, __file__, "embed-worker", "--model", str(model), "--job", str(job)]
        cmd += ["--cases", str(phase.embed), "--gpu", "off" if check.rehearse else "on"]
        poll = GpuMemoryPoll()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, check=False)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("EMBED ")), None)
            if line is not None:
                row.update(json.loads(line[len("EMBED ") :]))
            else:
                row["status"] = f"failed (exit {proc.returncode})"
                row["log_tail"] = proc.stderr[-1500:]
        except subprocess.TimeoutExpired:
            row["status"] = f"timed out after {budget:.0f} s"
        row["gpu_mib_peak"] = poll.stop()
    check.embeds.append(row)
    check.log(f"embedding pass on {phase.name}: {row.get('status')}")
    check.save()


def embed_worker(args: argparse.Namespace) -> int:
    """Engine.embed over the job's first reports, in its own process (a llama.cpp abort stays here)."""
    sys.path.insert(0, str(REPO))
    from extractor.dragon_io import load_job
    from extractor.engine import Engine, EngineOptions

    texts = [c.text for c in load_job(args.job).test if not c.is_blank][: args.cases]
    engine = Engine(args.model, EngineOptions(n_ctx=1024, gpu=args.gpu, allow_cpu=True))
    try:
        start = time.perf_counter()
        try:
            vectors = engine.embed(texts)
        except NotImplementedError as err:
            print("EMBED " + json.dumps({"status": "not implemented", "detail": str(err)}), flush=True)
            return 0
        elapsed = time.perf_counter() - start
    finally:
        engine.close()
    shape = list(getattr(vectors, "shape", ()))
    out = {"status": "ok", "elapsed_s": round(elapsed, 3), "reports_per_s": round(len(texts) / elapsed, 2)}
    out["shape"] = shape
    print("EMBED " + json.dumps(out), flush=True)
    return 0


def write_model(check: Check, phase: Phase, kit: Path, work: Path) -> Path | None:
    """The phase's random GGUF (one at a time on disk: a 14B file is 8 GiB)."""
    if check.left() < 30:
        check.notes.append(f"{phase.name}: not started (time)")
        check.save()
        return None
    sys.path.insert(0, str(BENCH))
    import random_gguf

    preset = random_gguf.PRESETS[phase.preset]
    if phase.own_vocab:
        from dataclasses import replace

        preset = replace(preset, n_vocab=0)
    for old in work.glob("random-*.gguf"):
        old.unlink()
    path = work / f"random-{phase.preset}-{Path(phase.tokenizer).stem.split('.')[0]}.gguf"
    start = time.time()
    random_gguf.write(path, preset, kit / "tokenizers" / phase.tokenizer)
    info = {
        "phase": phase.name,
        "preset": phase.preset,
        "tokenizer": phase.tokenizer,
        "gib": round(path.stat().st_size / 2**30, 2),
        "write_s": round(time.time() - start, 1),
    }
    check.models.append(info)
    check.log(f"wrote {path.name}: {info['gib']} GiB in {info['write_s']} s")
    check.save()
    return path


def environment(check: Check, kit: Path) -> None:
    import platform

    facts: dict[str, Any] = {"python": platform.python_version(), "rehearsal": check.rehearse}
    facts["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    try:
        import llama_cpp

        facts["llama_cpp_python"] = llama_cpp.__version__
        facts["gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception as err:  # noqa: BLE001 - reported, the check goes on without the model parts
        facts["llama_cpp_python"] = f"import failed: {err}"
    if shutil.which("nvidia-smi"):
        q = "--query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.memory"
        out = subprocess.run(["nvidia-smi", q, "--format=csv,noheader"], capture_output=True, text=True, check=False)
        facts["gpu"] = out.stdout.strip()
    facts["cpus"] = os.cpu_count()
    missing = missing_wheels(kit)
    facts["kit_wheels_missing"] = missing
    check.facts = facts
    check.save()


def missing_wheels(kit: Path) -> list[str]:
    """The distributions the device lacks that have no wheel in the kit (names normalised)."""
    have = {p.name.split("-")[0].lower().replace("_", "-") for p in (kit / "wheels").glob("*.whl")}
    need = [*DEVICE_LACKS, "llama-cpp-python"]
    return [n for n in need if n not in have]


def run(args: argparse.Namespace) -> int:
    kit, out = args.kit.resolve(), args.out.resolve()
    deadline = args.deadline or time.time() + (170 if args.rehearse else 290)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="dragon-device-check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(out=out, work=work, deadline=deadline, rehearse=args.rehearse)
    environment(check, kit)
    check.log(f"environment: {check.facts}")
    if not args.rehearse and not check.facts.get("gpu_offload"):
        check.notes.append("this llama-cpp-python has no GPU offload: the CUDA wheel did not load")
        check.save()
        return 1
    job = kit / "job" / JOB_NAME
    phases = REHEARSAL_PHASES if args.rehearse else DEVICE_PHASES
    for phase in phases:
        model = write_model(check, phase, kit, work)
        if model is None:
            continue
        for setting, cases in phase.settings:
            run_throughput(check, phase, model, job, setting, cases)
        if phase.embed:
            run_embed(check, phase, model, job)
        model.unlink()
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    check.log(f"done in {time.time() - check.started:.0f} s")
    check.save()
    failed = [r for r in check.runs if not r["status"].startswith(("ok", "skipped"))]
    return 1 if failed else 0


# -- the tables -----------------------------------------------------------------------------------


def _f(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def render(data: dict[str, Any]) -> str:
    """The Markdown tables of device_check.json."""
    f = data["facts"]
    lines = ["# Device check" + (" (CPU rehearsal)" if f.get("rehearsal") else ""), ""]
    lines += [f"- {k}: {v}" for k, v in f.items()]
    lines += [f"- elapsed: {data['elapsed_s']} s", ""]
    if data["models"]:
        lines += ["## Models", "", "| phase | preset | tokenizer | GiB | written in s |", "|---|---|---|---|---|"]
        lines += [
            f"| {m['phase']} | {m['preset']} | {m['tokenizer']} | {m['gib']} | {m['write_s']} |" for m in data["models"]
        ]
        lines.append("")
    lines += ["## Throughput (chain of thought on)", ""]
    lines += [
        "| phase | setting | reports | status | rep/s | x naive | prompt tok/s | out tok/s | prefill | decode | "
        "scoring | grammar | grammar/decode | steps/answer | peak GPU MiB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    naive = {r["phase"]: r.get("reports_per_s") for r in data["runs"] if r["setting"] == "naive"}
    for r in data["runs"]:
        base = naive.get(r["phase"])
        rate = r.get("reports_per_s")
        speed = f"{rate / base:.1f}" if rate and base and r["setting"] != "naive" else "-"
        name = r["setting"] if r["setting"] == "naive" else f"N={r['setting']}"
        lines.append(
            f"| {r['phase']} | {name} | {r.get('reports', r['cases'])} | {r['status']} | {_f(rate)} | {speed} | "
            f"{_f(r.get('prompt_tok_per_s'))} | {_f(r.get('output_tok_per_s'))} | "
            + " | ".join(
                _f(r.get(k), "{:.1%}")
                for k in ("prefill_share", "decode_share", "scoring_share", "grammar_share", "grammar_of_decode")
            )
            + f" | {_f(r.get('steps_per_answer'))} | {_f(r.get('gpu_mib_peak'))} | {_f(r.get('peak_rss_mib'))} |"
        )
    lines += [
        "",
        "Shares are of the run's wall time; grammar/decode is grammar sampling over decode + scoring time.",
        "",
    ]
    lines += ["## Drift of the GPU plan from N = 1", ""]
    lines += ["| phase | setting | reports compared | parsed answers differ | likelihoods compared | max abs dlogL |"]
    lines += ["|---|---|---|---|---|---|"]
    for d in data["drift"]:
        lines.append(
            f"| {d['phase']} | N={d['setting']} | {d['reports']} | {d['answers_differ']} | "
            f"{d['likelihoods_compared']} | {_f(d['max_abs_dlogl'], '{:.3g}')} |"
        )
    lines += ["", "## Embedding pass (Engine.embed)", ""]
    lines += ["| phase | reports | status | reports/s | peak GPU MiB |", "|---|---|---|---|---|"]
    for e in data["embeds"]:
        lines.append(
            f"| {e['phase']} | {e['reports']} | {e.get('status')} | {_f(e.get('reports_per_s'))} | "
            f"{_f(e.get('gpu_mib_peak'))} |"
        )
    failed = [r for r in data["runs"] if "log_tail" in r] + [e for e in data["embeds"] if "log_tail" in e]
    if data["notes"] or failed:
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in data["notes"]]
        for r in failed:
            tail = r["log_tail"].strip().replace("\n", "\n    ")
            lines.append(f"- {r['phase']} {r.get('setting', 'embed')}: {r.get('status')}\n\n    {tail}\n")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="measure (the device command)")
    p.add_argument("--kit", type=Path, default=REPO / "device-kit")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", default=None, help="where the random GGUFs go (default: a new temporary folder)")
    p.add_argument("--rehearse", action="store_true", help="CPU build, tiny shapes, few reports")
    p.add_argument("--deadline", type=float, default=None, help="epoch seconds by which to stop")
    p = sub.add_parser("kit-tokenizer", help="a tokenizer-only GGUF")
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p = sub.add_parser("kit-job", help="a synthetic Task102-shaped job")
    p.add_argument("out", type=Path)
    p.add_argument("--cases", type=int, default=128)
    p = sub.add_parser("kit-wheel", help="the llama-cpp-python wheel with each library once")
    p.add_argument("src", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--patchelf", type=Path, default=None, help="fix libggml-cuda's DT_NEEDED and RUNPATH with it")
    p = sub.add_parser("embed-worker", help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--job", type=Path, required=True)
    p.add_argument("--cases", type=int, required=True)
    p.add_argument("--gpu", default="off")
    args = parser.parse_args(argv)
    if args.cmd == "run":
        return run(args)
    if args.cmd == "kit-tokenizer":
        print(tokenizer_gguf(args.src, args.out))
    elif args.cmd == "kit-job":
        print(synthetic_job(args.out, args.cases))
    elif args.cmd == "kit-wheel":
        print(slim_wheel(args.src, args.out_dir, args.patchelf))
    elif args.cmd == "embed-worker":
        return embed_worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
