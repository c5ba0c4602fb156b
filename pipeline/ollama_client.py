"""Ollama's HTTP API, the parts deploy and rollback use (facts: Ollama's api/types.go, server/routes.go).

- `GET /api/version` first: the JSON `/api/create` (files/template/system/parameters) exists since 0.5.5.
- Blobs: `HEAD /api/blobs/<digest>`, and only when missing `POST` the bytes (the server answers 200 early
  when it has them, which would cut a large upload short).
- `POST /api/create` and `/api/push` stream NDJSON progress; a stream failed unless its last line is
  `{"status": "success"}`. An error arrives as HTTP >= 400 before the first line, or as a line with
  "error" after it (HTTP 200).
- `/api/tags` lists local models with the sha256 of each manifest file; `/api/copy` duplicates a manifest.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from pipeline.common import PipelineError, file_sha256_hex, get_logger
from pipeline.http_retry import RetryPolicy, TransientError, check_status, error_text

log = get_logger("ollama_client")  # shared by deploy and rollback: logs under its own name

DEFAULT_PORT = 11434
# Landmarks from Ollama's release history that change what deploy may rely on.
JSON_CREATE_API = (0, 5, 5)  # before: /api/create took a Modelfile text ("path or Modelfile are required")
GGUF_REWRITTEN = (0, 30, 0)  # from: GGUF imports go through llama-quantize COPY, the model layer's digest changes
PROGRESS_EVERY_S = 5.0


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


def file_sha256(path: Path) -> str:
    """A file's digest as Ollama and the registry name blobs: sha256:<hex>."""
    return "sha256:" + file_sha256_hex(path)


@dataclass(frozen=True)
class LocalModel:
    name: str
    digest: str  # sha256 hex of the local manifest file (= registry manifest bytes + "\n" after a push)


class OllamaClient:
    def __init__(self, host: str, retry: RetryPolicy):
        self.url = host_url(host)
        self.retry = retry
        self.session = requests.Session()
        self.version: tuple[int, int, int] | None = None

    def __repr__(self) -> str:
        return f"Ollama at {self.url}"

    def _request(self, method: str, path: str, what: str, **kwargs: Any) -> requests.Response:
        timeout = (10, self.retry.timeout_s)
        response = self.session.request(method, self.url + path, timeout=timeout, **kwargs)
        check_status(response, f"{self} {what}")
        return response

    # --- version ---

    def check_version(self) -> tuple[int, int, int]:
        """The server's version; a PipelineError for one older than the JSON create API (or unknown)."""
        body = self.retry.run(f"{self}: GET /api/version", lambda: self._request("GET", "/api/version", "version"))
        text = str(body.json().get("version", ""))
        version = parse_version(text)
        if version is None or version == (0, 0, 0):
            raise PipelineError(
                f"{self} reports version {text!r}: cannot tell whether it has the JSON /api/create API "
                f"({'.'.join(map(str, JSON_CREATE_API))}+). A source build needs "
                "-ldflags '-X github.com/ollama/ollama/version.Version=<version>'"
            )
        if version < JSON_CREATE_API:
            raise PipelineError(
                f"{self} runs Ollama {text}, older than {'.'.join(map(str, JSON_CREATE_API))}, the first with the "
                "JSON /api/create API deploy uses; upgrade Ollama on that host"
            )
        self.version = version
        return version

    @property
    def stores_gguf_as_uploaded(self) -> bool:
        """Whether the model layer's digest is the uploaded GGUF's (before 0.30 it is; later it is rewritten)."""
        return self.version is not None and self.version < GGUF_REWRITTEN

    # --- blobs ---

    def has_blob(self, digest: str) -> bool:
        def head() -> bool:
            response = self.session.head(f"{self.url}/api/blobs/{digest}", timeout=(10, self.retry.timeout_s))
            if response.status_code == 404:
                return False
            check_status(response, f"{self} HEAD blob {digest}")
            return True

        return self.retry.run(f"{self}: HEAD /api/blobs/{digest}", head)

    def upload_blob(self, path: Path, digest: str) -> bool:
        """Make the blob present; True when bytes were sent, False when Ollama already had them."""
        if self.has_blob(digest):
            log.info("%s already has %s (%s): nothing to upload", self, path.name, digest[:19])
            return False

        def post() -> None:
            with open(path, "rb") as body:
                response = self.session.post(
                    f"{self.url}/api/blobs/{digest}", data=body, timeout=(10, self.retry.timeout_s)
                )
            if response.status_code == 400 and "digest mismatch" in response.text:
                # the bytes arrived altered: a transport fault worth another try, the blob is content-addressed
                raise TransientError(f"{self} upload of {path.name}: {response.json().get('error')}")
            check_status(response, f"{self} upload of {path.name}")

        size_mb = path.stat().st_size / 1e6
        log.info("%s: uploading %s (%.1f MB) as %s", self, path.name, size_mb, digest[:19])
        self.retry.run(f"{self}: upload {path.name}", post)
        if not self.has_blob(digest):
            raise PipelineError(f"{self}: blob {digest} still missing after the upload")
        return True

    # --- streamed operations ---

    def _stream(self, path: str, payload: dict, what: str) -> None:
        """POST a streaming request and follow it to `success`; errors surface as PipelineError."""
        response = self._request("POST", path, what, json={**payload, "stream": True}, stream=True)
        last_status, last_log = None, 0.0
        try:
            for line in _lines(response):
                if "error" in line:
                    raise PipelineError(f"{self} {what}: {line['error']}")
                status = line.get("status", "")
                if status == "success":
                    return
                now = time.monotonic()
                if status != last_status or now - last_log > PROGRESS_EVERY_S:
                    done = f" {100 * line['completed'] / line['total']:.0f}%" if line.get("total") else ""
                    log.info("%s %s: %s%s", self, what, status, done)
                    last_status, last_log = status, now
        except (requests.exceptions.ChunkedEncodingError, requests.ConnectionError) as error:
            raise TransientError(f"{self} {what}: stream cut ({error_text(error)})") from None
        finally:
            response.close()
        raise TransientError(f"{self} {what}: stream ended without 'success' (last status: {last_status!r})")

    def create(self, name: str, request: dict) -> None:
        """POST /api/create (JSON form) for `name`; `request` holds files/template/system/parameters/..."""
        self.retry.run(
            f"{self}: create {name}", lambda: self._stream("/api/create", {**request, "model": name}, f"create {name}")
        )

    def push(self, name: str, insecure: bool) -> None:
        def push_once() -> None:
            try:
                self._stream("/api/push", {"model": name, "insecure": insecure}, f"push {name}")
            except TransientError:
                raise
            except PipelineError as error:
                # an error line from a push is the registry's trouble (down, 5xx): worth another try
                raise TransientError(str(error)) from None

        self.retry.run(f"{self}: push {name}", push_once)

    # --- local models ---

    def local_models(self) -> dict[str, LocalModel]:
        response = self.retry.run(f"{self}: GET /api/tags", lambda: self._request("GET", "/api/tags", "list models"))
        models = response.json().get("models") or []
        return {m["name"]: LocalModel(m["name"], m["digest"]) for m in models}

    def local_digest(self, name: str) -> str | None:
        """The local manifest's sha256 (hex) for `name`, None when the host does not have it."""
        model = self.local_models().get(name)
        return model.digest if model else None

    def copy(self, source: str, destination: str) -> None:
        payload = {"source": source, "destination": destination}
        self.retry.run(
            f"{self}: copy {source} -> {destination}",
            lambda: self._request("POST", "/api/copy", f"copy {source}", json=payload),
        )

    def chat(self, name: str, messages: list[dict], options: dict) -> str:
        payload = {"model": name, "messages": messages, "stream": False, "options": options}
        response = self.retry.run(
            f"{self}: chat with {name}", lambda: self._request("POST", "/api/chat", f"chat with {name}", json=payload)
        )
        return response.json()["message"]["content"]

    def load(self, name: str) -> None:
        """Load the model without generating (a smoke test that it runs here)."""
        response = self.retry.run(
            f"{self}: load {name}",
            lambda: self._request("POST", "/api/generate", f"load {name}", json={"model": name, "stream": False}),
        )
        if not response.json().get("done"):
            raise PipelineError(f"{self}: {name} did not load: {response.text[:200]}")


def _lines(response: requests.Response) -> Iterator[dict]:
    for raw in response.iter_lines():
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            raise TransientError(f"unreadable progress line {raw[:80]!r}") from None
        if isinstance(line, dict):
            yield line
