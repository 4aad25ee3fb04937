"""The one interface every model backend implements.

A backend takes a batch of requests and yields one result per request as it finishes. The
llama.cpp engine, the perfect-answer oracle and the scripted test backends all sit behind it,
so retries, fallbacks and post-processing are written once and tested without a model.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

_stop = threading.Event()


class StopRequested(BaseException):
    """A signal asked the job to finish now with what is answered (BaseException, so that no
    generic error handler swallows it)."""


def request_stop(reason: str) -> NoReturn:
    """Called by the signal handler: remember the stop, then raise. The flag outlives an exception
    that cannot travel: a signal landing in a C callback (llama.cpp's log hook) is raised inside
    ctypes, which prints and drops it."""
    _stop.set()
    raise StopRequested(reason)


def check_stop() -> None:
    """Raise StopRequested if a stop was requested; backends call it between decode steps."""
    if _stop.is_set():
        raise StopRequested("stop requested")


def clear_stop() -> None:
    _stop.clear()


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Request:
    """One generation: the rendered prompt, the answer schema and what to score.

    `choices` maps a field name to the JSON literals whose log-likelihood the backend reports at
    the point where that field's value starts.
    """

    uid: str
    messages: tuple[Message, ...]
    prompt: str
    prompt_tokens: int
    schema: Mapping[str, Any]
    max_tokens: int
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    attempt: int = 1


@dataclass(frozen=True)
class Result:
    """What came back for one request.

    `likelihoods[field][literal]` is a log-probability; `finished` is False when generation
    stopped at the token budget rather than at the end of the JSON.
    """

    uid: str
    text: str
    likelihoods: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    prompt_tokens: int = 0
    output_tokens: int = 0
    finished: bool = True
    error: str | None = None


class ChatTokenizer(Protocol):
    """What prompt building needs from a model: its chat template and token counts."""

    @property
    def context_limit(self) -> int: ...

    def render(self, messages: Sequence[Message]) -> str: ...

    def encode(self, messages: Sequence[Message]) -> list[int]:
        """The rendered prompt's tokens: the template's markers special, the contents as text."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """Tokens of plain text (text that reads like a control token stays text)."""
        ...

    def detokenize(self, tokens: Sequence[int]) -> str: ...


class Generator(Protocol):
    """What the generation loop needs: requests in, one result per request out."""

    name: str

    def generate(self, requests: Sequence[Request]) -> Iterator[Result]: ...


class Backend(Generator, Protocol):
    """A generator the pipeline starts and stops: what every backend declares it offers."""

    n_ctx: int | None  # the context it settled for (None: no model, no limit)
    n_seq: int  # requests decoded together, for sizing chunks
    closed: bool

    def close(self) -> None:
        """Free the model's memory; a closed backend is started anew when needed."""

    def figures(self) -> dict[str, Any]:
        """Counters for the run summary (engine timings); empty for backends without a model."""


class ModelFree:
    """The Backend capabilities of a backend that runs no model."""

    n_ctx: int | None = None
    n_seq: int = 1
    closed: bool = False

    def close(self) -> None:
        self.closed = True

    def figures(self) -> dict[str, Any]:
        return {}


class PlainTokenizer:
    """A model-free stand-in for backends without a tokenizer (oracle, prior, scripted tests).

    One token per character, so truncation and counting stay exact and reversible.
    """

    def __init__(self, context_limit: int = 1 << 24) -> None:
        self._limit = context_limit

    @property
    def context_limit(self) -> int:
        return self._limit

    def render(self, messages: Sequence[Message]) -> str:
        return "".join(f"<{m.role}>\n{m.content}\n" for m in messages) + "<assistant>\n"

    def encode(self, messages: Sequence[Message]) -> list[int]:
        return self.tokenize(self.render(messages))

    def tokenize(self, text: str) -> list[int]:
        return [ord(ch) for ch in text]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return "".join(chr(t) for t in tokens)
