"""Challenge adapters: how one challenge's Grand Challenge sockets become a job of cases and back.

The pipeline (Taskfile, prompts, generation, post-processing) works on `extractor.dragon_io.Job`;
an adapter loads a challenge's inputs into such a job and writes the predictions to the
challenge's output sockets. `dragon` is the DRAGON benchmark, `report_image` a worked example of
a report-plus-image challenge (docs/new-challenge.md).
"""

from extractor.adapters.base import Adapter
from extractor.adapters.dragon import DragonAdapter

__all__ = ["Adapter", "DragonAdapter"]
