"""Ollama's HTTP API, the parts deploy and rollback use (facts: Ollama's api/types.go, server/routes.go).

- `GET /api/version` first: the JSON `/api/create` (files/template/system/parameters) exists since 0.5.5.
- Blobs: `HEAD /api/blobs/<digest>`, and only when missing `POST` the bytes (the server answers 200 early
  when it has them, which would cut a large upload short).
- `POST /api/create` and `/api/push` stream NDJSON progress; a stream failed unless its last line is
  `{"status": "success"}`. An error arrives as HTTP >= 400 before the first line, or as a line with
  "error" after it (HTTP 200).
- `/api/tags` lists local models with the sha256 of each manifest file; `/api/copy` duplicates a manifest,
  `/api/delete` removes a name.
- Every operation (all its attempts, every line of a stream) ends by one deadline (pipeline/http_body.py),
  and an answer that is not the JSON object we expect is one clear error.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests

from pipeline.common import PipelineError, file_sha256_hex, get_logger
from pipeline.http_body import DEFAULT_DEADLINE_S, Deadline, field, json_object, lines, read_body
from pipeline.http_retry import RetryPolicy, TransientError, check_status, server_message
from pipeline.model_names import check_digest

log = get_logger("ollama_client")  # shared by deploy and rollback: logs under its own name

DEFAULT_PORT = 11434
# Landmarks from Ollama's release history that change what deploy may rely on.
JSON_CREATE_API = (0, 5, 5)  # before: /api/create took a Modelfile text ("path or Modelfile are required")
GGUF_REWRITTEN = (0, 30, 0)  # from: GGUF imports go through llama-quantize COPY, the model layer's digest changes
# The releases deploy and rollback are tested against (README "Ollama versions"); the supported range is
# JSON_CREATE_API and later, a release newer than the newest tested is used with a warning.
TESTED = ((0, 11, 4), (0, 17, 4))
PROGRESS_EVERY_S = 5.0
T = TypeVar("T")


def hosts_from_env(environ: Mapping[str, str]) -> list[str]:
    """OLLAMA_HOST as deploy and the doctor read it: comma-separated hosts, blanks ignored."""
    return [host.strip() for host in environ.get("OLLAMA_HOST", "").split(",") if host.strip()]


def host_url(host: str) -> str:
    """OLLAMA_HOST forms (`host`, `host:port`, `http://host:port`) as a base URL; port 11434 by default."""
    host = host.strip().rstrip("/")
    if not host:
        raise PipelineError("empty Ollama host")
    parts = urlsplit(host if "://" in host else f"http://{host}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PipelineError(f"Ollama host {host!r}: expected host, host:port or http(s)://host:port")
    return f"{parts.scheme}://{parts.hostname}:{parts.port or DEFAULT_PORT}"


def parse_version(text: str) -> tuple[int, int, int] | None:
    match = re.match(r"v?(\d+)\.(\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def supported_range() -> str:
    return f"{dotted(JSON_CREATE_API)} and later (tested: {', '.join(dotted(v) for v in TESTED)})"


def file_sha256(path: Path) -> str:
    """A file's digest as Ollama and the registry name blobs: sha256:<hex>."""
    return "sha256:" + file_sha256_hex(path)


@dataclass(frozen=True)
class LocalModel:
    name: str
    digest: str  # sha256 hex of the local manifest file (= registry manifest bytes + "\n" after a push)


class OllamaClient:
    def __init__(self, host: str, retry: RetryPolicy, deadline_s: float = DEFAULT_DEADLINE_S):
        self.url = host_url(host)
        self.retry = retry
        self.deadline_s = deadline_s  # overall, per operation: every attempt and every streamed line
        self.session = requests.Session()
        self.version: tuple[int, int, int] | None = None

    def __repr__(self) -> str:
        return f"Ollama at {self.url}"

    def _run(self, what: str, call: Callable[[Deadline], T]) -> T:
        """`call` retried as the policy says, all attempts within one deadline."""
        deadline = Deadline(self.deadline_s, f"{self} {what}")
        return self.retry.run(f"{self}: {what}", lambda: call(deadline))

    def _request(self, method: str, path: str, what: str, deadline: Deadline, **kwargs: Any) -> requests.Response:
        timeout = deadline.timeout(self.retry.timeout_s)
        response = self.session.request(method, self.url + path, timeout=timeout, stream=True, **kwargs)
        try:
            check_status(response, f"{self} {what}")
        except PipelineError:
            response.close()
            raise
        return response

    def _json(self, method: str, path: str, what: str, **kwargs: Any) -> dict[str, Any]:
        """One request whose answer is a JSON object, read whole within the deadline."""

        def call(deadline: Deadline) -> dict[str, Any]:
            response = self._request(method, path, what, deadline, **kwargs)
            try:
                return json_object(read_body(response, deadline, f"{self} {what}"), f"{self} {what}")
            finally:
                response.close()

        return self._run(what, call)

    # --- version ---

    def check_version(self) -> tuple[int, int, int]:
        """The server's version; a PipelineError for one below the supported range (or unknown)."""
        text = field(self._json("GET", "/api/version", "version"), "version", str, f"{self} GET /api/version")
        version = parse_version(text)
        if version is None or version == (0, 0, 0):
            raise PipelineError(
                f"{self} reports version {text!r}: cannot tell whether it has the JSON /api/create API "
                f"({dotted(JSON_CREATE_API)}+). A source build needs "
                "-ldflags '-X github.com/ollama/ollama/version.Version=<version>'"
            )
        if version < JSON_CREATE_API:
            raise PipelineError(
                f"{self} runs Ollama {text}, below the supported range {supported_range()}: "
                f"{dotted(JSON_CREATE_API)} is the first with the JSON /api/create API deploy uses; upgrade Ollama "
                "on that host"
            )
        if version > TESTED[-1]:
            log.warning("%s runs Ollama %s, newer than the newest tested (%s)", self, text, dotted(TESTED[-1]))
        self.version = version
        return version

    @property
    def stores_gguf_as_uploaded(self) -> bool:
        """Whether the model layer's digest is the uploaded GGUF's (before 0.30 it is; later it is rewritten)."""
        return self.version is not None and self.version < GGUF_REWRITTEN

    # --- blobs ---

    def has_blob(self, digest: str) -> bool:
        def head(deadline: Deadline) -> bool:
            response = self.session.head(
                f"{self.url}/api/blobs/{check_digest(digest, str(self))}",
                timeout=deadline.timeout(self.retry.timeout_s),
            )
            if response.status_code == 404:
                return False
            check_status(response, f"{self} HEAD blob {digest}")
            return True

        return self._run(f"HEAD /api/blobs/{digest}", head)

    def upload_blob(self, path: Path, digest: str) -> bool:
        """Make the blob present; True when bytes were sent, False when Ollama already had them."""
        if self.has_blob(digest):
            log.info("%s already has %s (%s): nothing to upload", self, path.name, digest[:19])
            return False

        def post(deadline: Deadline) -> None:
            with open(path, "rb") as body:
                response = self.session.post(
                    f"{self.url}/api/blobs/{digest}", data=body, timeout=deadline.timeout(self.retry.timeout_s)
                )
            if response.status_code == 400 and "digest mismatch" in response.text:
                # the bytes arrived altered: a transport fault worth another try, the blob is content-addressed
                raise TransientError(f"{self} upload of {path.name}: {server_message(response)}")
            check_status(response, f"{self} upload of {path.name}")

        size_mb = path.stat().st_size / 1e6
        log.info("%s: uploading %s (%.1f MB) as %s", self, path.name, size_mb, digest[:19])
        self._run(f"upload {path.name}", post)
        if not self.has_blob(digest):
            raise PipelineError(f"{self}: blob {digest} still missing after the upload")
        return True

    # --- streamed operations ---

    def _stream(self, path: str, payload: dict, what: str, deadline: Deadline) -> None:
        """POST a streaming request and follow it to `success` before the deadline; errors are PipelineErrors."""
        response = self._request("POST", path, what, deadline, json={**payload, "stream": True})
        last_status, last_log = None, 0.0
        try:
            for line in _lines(response, deadline, f"{self} {what}"):
                if "error" in line:
                    raise PipelineError(f"{self} {what}: {line['error']}")
                status = str(line.get("status", ""))
                if status == "success":
                    return
                now = time.monotonic()
                if status != last_status or now - last_log > PROGRESS_EVERY_S:
                    total, completed = line.get("total"), line.get("completed")
                    numbers = isinstance(total, int | float) and isinstance(completed, int | float) and total
                    done = f" {100 * completed / total:.0f}%" if numbers else ""
                    log.info("%s %s: %s%s", self, what, status, done)
                    last_status, last_log = status, now
        finally:
            response.close()
        raise TransientError(f"{self} {what}: stream ended without 'success' (last status: {last_status!r})")

    def create(self, name: str, request: dict) -> None:
        """POST /api/create (JSON form) for `name`; `request` holds files/template/system/parameters/..."""
        payload = {**request, "model": name}
        self._run(f"create {name}", lambda deadline: self._stream("/api/create", payload, f"create {name}", deadline))

    def push(self, name: str, insecure: bool) -> None:
        def push_once(deadline: Deadline) -> None:
            try:
                self._stream("/api/push", {"model": name, "insecure": insecure}, f"push {name}", deadline)
            except TransientError:
                raise
            except PipelineError as error:
                if deadline.remaining() <= 0:
                    raise
                # an error line from a push is the registry's trouble (down, 5xx): worth another try
                raise TransientError(str(error)) from None

        self._run(f"push {name}", push_once)

    # --- local models ---

    def local_models(self) -> dict[str, LocalModel]:
        what = f"{self} GET /api/tags"
        models = self._json("GET", "/api/tags", "list models").get("models") or []
        if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
            raise PipelineError(f"{what}: the answer's 'models' is not a list of objects")
        found = {}
        for model in models:
            name, digest = field(model, "name", str, what), field(model, "digest", str, what)
            found[name] = LocalModel(name, digest)
        return found

    def local_digest(self, name: str) -> str | None:
        """The local manifest's sha256 (hex) for `name`, None when the host does not have it."""
        model = self.local_models().get(name)
        return model.digest if model else None

    def copy(self, source: str, destination: str) -> None:
        payload = {"source": source, "destination": destination}

        def call(deadline: Deadline) -> None:
            self._request("POST", "/api/copy", f"copy {source} -> {destination}", deadline, json=payload).close()

        self._run(f"copy {source} -> {destination}", call)

    def delete(self, name: str) -> None:
        """Remove the local name (Ollama keeps the blobs other names still use)."""

        def call(deadline: Deadline) -> None:
            self._request("DELETE", "/api/delete", f"delete {name}", deadline, json={"model": name}).close()

        self._run(f"delete {name}", call)

    def chat(self, name: str, messages: list[dict], options: dict) -> str:
        payload = {"model": name, "messages": messages, "stream": False, "options": options}
        what = f"{self} chat with {name}"
        message = field(self._json("POST", "/api/chat", f"chat with {name}", json=payload), "message", dict, what)
        return field(message, "content", str, what)

    def load(self, name: str) -> None:
        """Load the model without generating (a smoke test that it runs here)."""
        body = self._json("POST", "/api/generate", f"load {name}", json={"model": name, "stream": False})
        if body.get("done") is not True:
            raise PipelineError(f"{self}: {name} did not load: {json.dumps(body)[:200]}")


def _lines(response: requests.Response, deadline: Deadline, what: str) -> Iterator[dict]:
    for raw in lines(response, deadline, what):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            raise TransientError(f"{what}: unreadable progress line {raw[:80]!r}") from None
        if isinstance(line, dict):
            yield line
