"""Reading the answers of Ollama and the registry: within an overall deadline, bounded in size, and as JSON
objects with the fields we use. A malformed answer is one clear error naming the server and the operation,
never a KeyError; a server that stalls or streams progress forever is cut when the deadline passes.

`requests`' own timeout is per socket read: a server sending one byte (or one progress line) every few
seconds never trips it. The deadline covers every attempt of one operation, so retries cannot extend it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, TypeVar

import requests

from pipeline.common import PipelineError
from pipeline.http_retry import TransientError, error_text

T = TypeVar("T")

MAX_JSON_BYTES = 16 << 20  # an API answer (model list, manifest, version): far below this
BLOCK = 1 << 16
DEFAULT_DEADLINE_S = 3600.0  # params.yaml deploy.deadline_s


class Deadline:
    """The end of one operation: `check()` raises once it has passed (not retried: the same server would
    do it again); `read_timeout` caps each socket read so a stall ends no later than the deadline."""

    def __init__(self, seconds: float, what: str):
        self.seconds, self.what = seconds, what
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def check(self) -> None:
        if self.remaining() <= 0:
            raise PipelineError(f"{self.what}: not done within its deadline of {self.seconds:g}s; cut")

    def timeout(self, read_timeout_s: float) -> tuple[float, float]:
        """(connect, read) timeouts for one request: neither outlives the deadline."""
        self.check()
        left = max(self.remaining(), 0.05)
        return min(10.0, left), min(read_timeout_s, left)


def blocks(response: requests.Response, deadline: Deadline, what: str) -> Iterator[bytes]:
    """The body in blocks, the deadline checked between them; a cut body is a TransientError."""
    try:
        for block in response.iter_content(BLOCK):
            deadline.check()
            yield block
    except (requests.exceptions.ChunkedEncodingError, requests.ConnectionError) as error:
        if "timed out" in str(error):  # requests reports a read timeout inside a body as a ConnectionError
            raise TransientError(f"{what}: stream stalled (no byte within the read timeout)") from None
        raise TransientError(f"{what}: stream cut ({error_text(error)})") from None


def lines(response: requests.Response, deadline: Deadline, what: str) -> Iterator[bytes]:
    """The body's lines (NDJSON), the deadline checked at each; no line may exceed MAX_JSON_BYTES."""
    pending = b""
    for block in blocks(response, deadline, what):
        pending += block
        *complete, pending = pending.split(b"\n")
        yield from complete
        if len(pending) > MAX_JSON_BYTES:
            raise PipelineError(f"{what}: a line longer than {MAX_JSON_BYTES} bytes: not an answer we read")
    if pending:
        yield pending


def read_body(response: requests.Response, deadline: Deadline, what: str, limit: int = MAX_JSON_BYTES) -> bytes:
    """The whole body, at most `limit` bytes, read before the deadline."""
    data = bytearray()
    for block in blocks(response, deadline, what):
        data += block
        if len(data) > limit:
            raise PipelineError(f"{what}: answer larger than {limit} bytes: not an answer we read")
    return bytes(data)


def json_object(data: bytes, what: str) -> dict[str, Any]:
    """The body as a JSON object; anything else is one PipelineError."""
    try:
        body = json.loads(data)
    except ValueError:
        raise PipelineError(f"{what}: the answer is not JSON: {data[:80]!r}") from None
    if not isinstance(body, dict):
        raise PipelineError(f"{what}: the answer is JSON {type(body).__name__}, not an object")
    return body


def field(body: dict[str, Any], key: str, kind: type[T], what: str) -> T:
    """body[key], which must be a `kind`; a missing or mistyped field is one PipelineError."""
    value = body.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        found = "missing" if key not in body else f"a {type(value).__name__}"
        raise PipelineError(f"{what}: the answer's {key!r} is {found}, expected a {kind.__name__}")
    return value
