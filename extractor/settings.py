"""Run settings: command-line flags, each with an environment variable, and model lookup.

Precedence: a flag beats its environment variable, which beats the default.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PLATFORM_MODEL_DIR = Path("/opt/ml/model")
BUNDLED_MODEL_DIR = REPO_ROOT / "models"
SPLIT_PART = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<total>\d{5})\.gguf$")


class ModelNotFound(Exception):
    pass


@dataclass(frozen=True)
class Settings:
    input: Path
    output: Path
    model: Path | None
    taskfiles: Path
    max_cases: int | None
    n_ctx: int | None
    threads: int
    parallel: int
    gpu: str
    allow_cpu: bool
    reasoning: str
    examples: str
    k: int | None
    max_output_tokens: int | None
    vote_k: int
    translate: bool
    validation_cases: int
    try_examples: tuple[str, ...]
    heads: bool
    embedding_head: str
    time_limit: float | None
    work_dir: Path
    journal: bool
    summary: Path | None
    log_level: str
    seed: int | None


# (flag, environment variable, default, help); the table is also what the README documents.
OPTIONS: tuple[tuple[str, str, str | None, str], ...] = (
    ("--input", "DRAGON_INPUT", "/input", "job folder with the four DRAGON JSON files"),
    ("--output", "DRAGON_OUTPUT", "/output", "folder for nlp-predictions-dataset.json"),
    (
        "--model",
        "DRAGON_MODEL",
        None,
        "GGUF file (default: *.gguf in /opt/ml/model, then models/)",
    ),
    (
        "--taskfiles",
        "DRAGON_TASKFILES",
        str(REPO_ROOT / "taskfiles"),
        "folder of Taskfile JSON files",
    ),
    (
        "--max-cases",
        "DRAGON_MAX_CASES",
        None,
        "predict only the first N test cases (quick checks)",
    ),
    (
        "--n-ctx",
        "DRAGON_N_CTX",
        None,
        "upper bound on the context size (default: sized per job)",
    ),
    ("--threads", "DRAGON_THREADS", "0", "CPU threads (0: all cores)"),
    (
        "--parallel",
        "DRAGON_PARALLEL",
        "0",
        "reports decoded together (0: 8 on a CPU, 16 on a GPU, fewer if memory is short; 1: one at a time)",
    ),
    ("--gpu", "DRAGON_GPU", "auto", "auto | on | off: offload layers to the GPU"),
    (
        "--reasoning",
        "DRAGON_REASONING",
        "auto",
        "auto (as the Taskfile says) | on | off",
    ),
    ("--examples", "DRAGON_EXAMPLES", "auto", "auto (as the Taskfile says) | none | retrieved | fixed"),
    ("--k", "DRAGON_K", None, "number of solved examples (default: the Taskfile's)"),
    ("--max-output-tokens", "DRAGON_MAX_OUTPUT_TOKENS", None, "cap on every Taskfile's output budget (tokens)"),
    ("--vote-k", "DRAGON_VOTE_K", "8", "neighbours in the nearest-neighbour vote"),
    (
        "--validation-cases",
        "DRAGON_VALIDATION_CASES",
        "32",
        "validation cases the model answers to compete with the trained heads (0: heads and vote only, no model)",
    ),
    (
        "--try-examples",
        "DRAGON_TRY_EXAMPLES",
        "",
        "other example strategies to try on validation, comma list of none, fixed, retrieved (each costs N more)",
    ),
    ("--heads", "DRAGON_HEADS", "on", "on | off: train the lexical heads on the training set"),
    (
        "--embedding-head",
        "DRAGON_EMBEDDING_HEAD",
        "auto",
        "auto (on with a GPU) | on | off: a linear head on the model's report embeddings",
    ),
    ("--time-limit", "DRAGON_TIME_LIMIT", None, "seconds the job may take; it degrades to finish inside them"),
    ("--work-dir", "DRAGON_WORK_DIR", None, "folder for the checkpoint journal (default: <temp dir>/dragon-extractor)"),
    ("--summary", "DRAGON_SUMMARY", None, "also write the run summary as JSON here"),
    ("--log-level", "DRAGON_LOG_LEVEL", "INFO", "DEBUG | INFO | WARNING"),
    ("--seed", "DRAGON_SEED", None, "random seed (default: the job id)"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Extract DRAGON answers from clinical reports with a local GGUF model.",
        epilog="Every flag can also be set by the environment variable shown; a flag wins over its variable.",
    )
    for flag, env, default, help_text in OPTIONS:
        parser.add_argument(
            flag,
            default=os.environ.get(env, default),
            help=f"{help_text} [{env}; default {default}]",
        )
    translate = os.environ.get("DRAGON_TRANSLATE", "").lower() in ("1", "true", "yes")
    parser.add_argument(
        "--translate",
        action="store_true",
        default=translate,
        help="ablation: have the model translate each report to English first (not for NER) [DRAGON_TRANSLATE]",
    )
    no_journal = os.environ.get("DRAGON_NO_JOURNAL", "").lower() in ("1", "true", "yes")
    parser.add_argument(
        "--no-journal",
        action="store_true",
        default=no_journal,
        help="do not keep or reuse the checkpoint journal [DRAGON_NO_JOURNAL]",
    )
    allow = os.environ.get("DRAGON_ALLOW_CPU", "").lower() in ("1", "true", "yes")
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        default=allow,
        help="run on the CPU even when an NVIDIA GPU is visible but unusable [DRAGON_ALLOW_CPU]",
    )
    return parser


def _int_or_none(value: str | None, name: str) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"{name}: expected a whole number, got {value!r}") from None


def _positive_int(value: str | None, name: str) -> int:
    number = _int_or_none(value, name)
    if number is None or number < 1:
        raise SystemExit(f"{name}: expected a positive whole number, got {value!r}")
    return number


def _float_or_none(value: str | None, name: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except ValueError:
        raise SystemExit(f"{name}: expected a number of seconds, got {value!r}") from None
    if number <= 0:
        raise SystemExit(f"{name}: expected a positive number of seconds, got {value!r}")
    return number


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    args = build_parser().parse_args(argv)
    if args.gpu not in ("auto", "on", "off"):
        raise SystemExit(f"--gpu: expected auto, on or off, got {args.gpu!r}")
    if args.reasoning not in ("auto", "on", "off"):
        raise SystemExit(f"--reasoning: expected auto, on or off, got {args.reasoning!r}")
    if args.examples not in ("auto", "none", "retrieved", "fixed"):
        raise SystemExit(f"--examples: expected auto, none, retrieved or fixed, got {args.examples!r}")
    if args.heads not in ("on", "off"):
        raise SystemExit(f"--heads: expected on or off, got {args.heads!r}")
    if args.embedding_head not in ("auto", "on", "off"):
        raise SystemExit(f"--embedding-head: expected auto, on or off, got {args.embedding_head!r}")
    try_examples = tuple(x.strip() for x in str(args.try_examples or "").split(",") if x.strip())
    if unknown := [x for x in try_examples if x not in ("none", "fixed", "retrieved")]:
        raise SystemExit(f"--try-examples: expected none, fixed or retrieved, got {', '.join(unknown)}")
    validation_cases = _int_or_none(args.validation_cases, "--validation-cases")
    if validation_cases is None or validation_cases < 0:
        raise SystemExit(f"--validation-cases: expected 0 or a positive number, got {args.validation_cases!r}")
    parallel = _int_or_none(args.parallel, "--parallel") or 0
    if parallel < 0:
        raise SystemExit(f"--parallel: expected 0 (automatic) or a positive number, got {args.parallel!r}")
    return Settings(
        input=Path(args.input),
        output=Path(args.output),
        model=Path(args.model) if args.model else None,
        taskfiles=Path(args.taskfiles),
        max_cases=_int_or_none(args.max_cases, "--max-cases"),
        n_ctx=_int_or_none(args.n_ctx, "--n-ctx"),
        threads=_int_or_none(args.threads, "--threads") or 0,
        parallel=parallel,
        gpu=args.gpu,
        allow_cpu=bool(args.allow_cpu),
        reasoning=args.reasoning,
        examples=args.examples,
        k=_int_or_none(args.k, "--k"),
        max_output_tokens=_int_or_none(args.max_output_tokens, "--max-output-tokens"),
        vote_k=_positive_int(args.vote_k, "--vote-k"),
        translate=bool(args.translate),
        validation_cases=validation_cases,
        try_examples=try_examples,
        heads=args.heads == "on",
        embedding_head=args.embedding_head,
        time_limit=_float_or_none(args.time_limit, "--time-limit"),
        work_dir=Path(args.work_dir) if args.work_dir else Path(tempfile.gettempdir()) / "dragon-extractor",
        journal=not args.no_journal,
        summary=Path(args.summary) if args.summary else None,
        log_level=str(args.log_level).upper(),
        seed=_int_or_none(args.seed, "--seed"),
    )


def _models_in(folder: Path) -> list[Path]:
    """The loadable models of a folder: every *.gguf, a split model counted once by its first part."""
    found = []
    for path in sorted(folder.glob("*.gguf")):
        m = SPLIT_PART.match(path.name)
        if m and int(m.group("part")) != 1:
            continue
        found.append(path)
    return found


def find_model(
    explicit: Path | None,
    places: Sequence[Path] = (PLATFORM_MODEL_DIR, BUNDLED_MODEL_DIR),
) -> Path:
    """`--model`, else the one *.gguf of the platform's model folder, else the bundled one."""
    if explicit is not None:
        if explicit.is_file():
            return explicit
        if explicit.is_dir():
            places = (explicit,)
        else:
            raise ModelNotFound(f"--model {explicit}: no such file")
    looked = []
    for folder in places:
        looked.append(str(folder))
        if not folder.is_dir():
            continue
        models = _models_in(folder)
        if len(models) > 1:
            listing = ", ".join(p.name for p in models)
            raise ModelNotFound(f"{folder} holds several models ({listing}); choose one with --model")
        if models:
            return models[0]
    raise ModelNotFound(
        "no GGUF model found; looked in: --model (not given), "
        + ", ".join(looked)
        + ". Run scripts/fetch_default_model.sh or pass --model PATH."
    )
