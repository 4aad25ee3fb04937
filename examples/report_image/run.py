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
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import process  # noqa: E402
from extractor.adapters.base import Adapter  # noqa: E402
from extractor.adapters.report_image import ReportImageAdapter  # noqa: E402
from extractor.settings import Settings, parse_settings  # noqa: E402
from extractor.summary import RunSummary  # noqa: E402

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
    return process.main(
        settings=settings, adapter=ReportImageAdapter(), backend=args.backend, ground_truth=args.ground_truth
    )


if __name__ == "__main__":
    sys.exit(main())
