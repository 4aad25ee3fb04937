"""Run the worked example (a report plus an image in, a JSON answer out) through the pipeline.

    python examples/report_image/run.py --input DIR --output DIR [--model PATH]
    python examples/report_image/run.py --input DIR --output DIR --backend oracle --ground-truth FILE

DIR holds what Grand Challenge puts in /input: inputs.json, radiology-report.json and
images/ct/<one image>. The answer lands in <output>/findings.json. Every other process.py flag
(--threads, --gpu, --n-ctx, --log-level, ...) works here too; --taskfiles defaults to this folder.

`run_adapter` is process.run_job with the DRAGON-specific loading, verifying and writing replaced
by an adapter's (and no checkpoint journal); it is built from process.py's own stage functions,
stage for stage, so the example runs the same pipeline as the DRAGON container.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import process  # noqa: E402
from extractor.adapters.base import Adapter  # noqa: E402
from extractor.adapters.report_image import ReportImageAdapter  # noqa: E402
from extractor.dragon_io import JobError, PredictionError  # noqa: E402
from extractor.engine import EngineError  # noqa: E402
from extractor.gc_io import SocketError  # noqa: E402
from extractor.settings import ModelNotFound, Settings, parse_settings  # noqa: E402
from extractor.summary import RunSummary  # noqa: E402
from extractor.taskfiles import TaskfileError  # noqa: E402

log = logging.getLogger("report_image")


def run_adapter(
    adapter: Adapter,
    settings: Settings,
    *,
    backend: str = "llama",
    ground_truth: Path | None = None,
    started: float | None = None,
) -> RunSummary:
    """One job end to end through an adapter: the very pipeline of process.py, with this
    challenge's inputs and outputs."""
    return process.run_job(settings, backend=backend, ground_truth=ground_truth, started=started, adapter=adapter)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--backend", choices=("llama", "oracle", "prior", "knn"), default="llama")
    parser.add_argument("--ground-truth", type=Path, default=None, help="uid -> label file, for --backend oracle")
    args, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
    # The example's Taskfile folder, no journal; flags given on the command line come later and win.
    settings = parse_settings(["--taskfiles", str(HERE), "--no-journal", *rest])
    return args, settings


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    started = time.monotonic()
    previous = process.install_signal_handlers()
    try:
        summary = run_adapter(
            ReportImageAdapter(), settings, backend=args.backend, ground_truth=args.ground_truth, started=started
        )
    except (JobError, SocketError, TaskfileError, ModelNotFound, EngineError) as err:
        log.error("%s", err)
        return 1
    except PredictionError as err:
        log.error("nothing written: %s", err)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for line in summary.log_lines():
        log.info("summary: %s", line)
    if settings.summary:
        settings.summary.parent.mkdir(parents=True, exist_ok=True)
        settings.summary.write_bytes(summary.to_json())
    return process.EXIT_INTERRUPTED if summary.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
