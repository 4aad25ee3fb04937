"""Checkpoint journal: finished answers appended as they come, so a rerun resumes.

One JSON line per finished case, in a file named by a key over everything that decides the
answers (model file, Taskfile, input files, settings), so a changed model, Taskfile or input
starts a fresh journal instead of reusing stale answers. A torn last line (killed mid-write) is
ignored. Every finished case is written with its outcome and degradation level, but only
full-quality successes are resumed: a failure or an answer cut short by the time budget is asked
again when a rerun has the time.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from extractor.generation import CaseAnswer

log = logging.getLogger(__name__)


def journal_key(*parts: Any, files: Iterable[Path] = ()) -> str:
    """SHA-256 over the given values and the bytes of the given files."""
    h = hashlib.sha256()
    for part in parts:
        h.update(orjson.dumps(part, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str))
        h.update(b"\x00")
    for path in files:
        if Path(path).is_file():
            h.update(Path(path).read_bytes())
        h.update(b"\x01")
    return h.hexdigest()


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fh = None

    def load(self) -> dict[str, CaseAnswer]:
        """Answers of an earlier run with the same key."""
        if not self.path.is_file():
            return {}
        answers: dict[str, CaseAnswer] = {}
        skipped = 0
        with open(self.path, "rb") as fh:
            for line in fh:
                try:
                    answer = CaseAnswer(**orjson.loads(line))
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    continue  # a line torn by a kill
                if answer.full_quality:
                    answers[answer.uid] = answer
                else:
                    skipped += 1
                    answers.pop(answer.uid, None)
        log.info("journal %s: %d finished answers to reuse, %d to ask again", self.path, len(answers), skipped)
        return answers

    def append(self, answer: CaseAnswer) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "ab")  # noqa: SIM115 - kept open for the whole run
        record = {
            "uid": answer.uid,
            "answer": answer.answer,
            "likelihoods": answer.likelihoods,
            "attempts": answer.attempts,
            "error": answer.error,
            "prompt_tokens": answer.prompt_tokens,
            "output_tokens": answer.output_tokens,
            "level": answer.level,
        }
        self._fh.write(orjson.dumps(record) + b"\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
