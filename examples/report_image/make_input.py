"""Write an input folder for the worked example, as Grand Challenge would provision it.

    python examples/report_image/make_input.py DIR [--report TEXT] [--body-part CHEST] [--format mha|nii.gz]

DIR gets inputs.json, radiology-report.json and images/ct/<uid>.<format>: a small synthetic CT
volume (no patient data) with modality and body-part tags. The tests build their inputs with
`make_input` too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import orjson

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from extractor.adapters.report_image import IMAGE_SOCKET, REPORT_SOCKET  # noqa: E402
from extractor.gc_io import INPUTS_JSON, inputs_json  # noqa: E402

DEFAULT_REPORT = (
    "CT thorax with contrast. In the right upper lobe a solid nodule of 14 mm, unchanged. "
    "No pleural effusion. Conclusion: stable pulmonary nodule right upper lobe."
)


def make_input(
    folder: Path,
    *,
    report: str = DEFAULT_REPORT,
    uid: str = "case-0001",
    body_part: str = "CHEST",
    modality: str = "CT",
    size: tuple[int, int, int] = (48, 40, 24),
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5),
    suffix: str = ".mha",
) -> Path:
    """Write one job's input folder; returns the image file."""
    import SimpleITK as sitk

    folder = Path(folder)
    image_dir = folder / IMAGE_SOCKET.relative_path
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 400, size=tuple(reversed(size)), dtype=np.int16)  # numpy: z, y, x
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-0.5 * size[0] * spacing[0], -0.5 * size[1] * spacing[1], 0.0))
    image.SetMetaData("0008|0060", modality)
    image.SetMetaData("0018|0015", body_part)
    image_path = image_dir / f"{uid}{suffix}"
    sitk.WriteImage(image, str(image_path), useCompression=True)
    (folder / REPORT_SOCKET.relative_path).write_bytes(orjson.dumps(report))
    manifest = inputs_json([(REPORT_SOCKET, report), (IMAGE_SOCKET, image_path.name)])
    (folder / INPUTS_JSON).write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return image_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--report", default=DEFAULT_REPORT)
    parser.add_argument("--uid", default="case-0001")
    parser.add_argument("--body-part", default="CHEST")
    parser.add_argument("--format", choices=("mha", "nii.gz"), default="mha")
    args = parser.parse_args(argv)
    path = make_input(args.folder, report=args.report, uid=args.uid, body_part=args.body_part, suffix=f".{args.format}")
    print(f"wrote {args.folder / INPUTS_JSON}, {args.folder / REPORT_SOCKET.relative_path} and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
