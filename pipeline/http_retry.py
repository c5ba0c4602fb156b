"""Retries for the deploy's HTTP calls: transient failures are retried with backoff, the rest fail at once.

Every call deploy and rollback make is idempotent (content-addressed blobs, create/copy/push of the same
name and content, manifest PUTs of the same bytes), so retrying one is safe; what decides is whether the
failure can go away by itself (unreachable, 5xx, a cut stream) or not (4xx, a rejected request).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import requests

from pipeline.common import PipelineError, get_logger

log = get_logger("http_retry")  # shared by deploy and rollback: logs under its own name
T = TypeVar("T")


class TransientError(PipelineError):
    """A failure that may go away by itself: retried."""


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 3
    backoff_s: float = 2.0
    timeout_s: float = 600.0

    def run(self, what: str, call: Callable[[], T]) -> T:
        """`call()`, retried on TransientError and connection-level failures; then one clear PipelineError."""
        for attempt in range(self.retries + 1):
            try:
                return call()
            except TransientError as error:
                message = str(error)  # it names the server and the operation
            except (requests.ConnectionError, requests.Timeout) as error:
                message = f"{what}: {error_text(error)}"
            if attempt == self.retries:
                tries = f"{self.retries + 1} attempt{'s' if self.retries else ''}"
                raise PipelineError(f"{message} (gave up after {tries})")
            wait = self.backoff_s * 2**attempt
            log.warning("%s; retrying in %.1fs", message, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")


def error_text(error: Exception) -> str:
    """One line for a requests failure (its repr nests urllib3 objects several levels deep)."""
    if isinstance(error, requests.ConnectionError):
        return f"unreachable ({type(error.__context__ or error).__name__}: connection failed or was cut)"
    if isinstance(error, requests.Timeout):
        return "no answer within the timeout"
    return str(error)


def check_status(response: requests.Response, what: str) -> None:
    """5xx -> TransientError, other >= 400 -> PipelineError; both carry the server's own message."""
    if response.status_code < 400:
        return
    message = server_message(response)
    if response.status_code >= 500:
        raise TransientError(f"{what}: HTTP {response.status_code}: {message}")
    raise PipelineError(f"{what}: HTTP {response.status_code}: {message}")


def server_message(response: requests.Response) -> str:
    """Ollama's {"error": "..."} or the registry's {"errors": [{"code", "message"}]}, else the body's start."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200] or response.reason
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"]
    if isinstance(body, dict) and isinstance(body.get("errors"), list):
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in body["errors"] if isinstance(e, dict))
    return response.text.strip()[:200]
