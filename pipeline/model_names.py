"""Names of deployed models: `host:port/namespace/model:tag`, checked before anything is sent.

A name must satisfy both Ollama (`types/model/name.go`) and the registry (`distribution/reference`):
- registry host: a host name or IP with an optional port;
- namespace and model: lower case. Ollama accepts upper case, but the registry has no route for it and
  answers 404, which Ollama reports as "file does not exist" (ollama/ollama#3297);
- namespace: no dots (Ollama); model may contain dots;
- tag: Docker's `[A-Za-z0-9_][A-Za-z0-9_.-]*`, at most 80 characters (Ollama's limit, below Docker's 128).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.common import PipelineError

LATEST = "latest"
# Names deploy uses for a moment on the hosts: the model being checked, and latest before it moves.
STAGING = "deploy.staging"
PREVIOUS_LATEST = "latest.previous"
RESERVED = (LATEST, STAGING, PREVIOUS_LATEST)
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

# (pattern, rule in words) per name part; the intersection of Ollama's and the registry's grammars.
PARTS = {
    "registry": (r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?", "a host name or IP with optional :port"),
    "namespace": (r"[a-z0-9]+(?:(?:_|__|-+)[a-z0-9]+)*", "lower-case letters, digits, '_' or '-' inside"),
    "model": (r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*", "lower-case letters, digits, '.', '_' or '-' inside"),
    "tag": (r"[A-Za-z0-9_][A-Za-z0-9_.-]*", "letters, digits, '_', '.', '-', not starting with '.' or '-'"),
}
MAX_LENGTH = {"registry": 350, "namespace": 80, "model": 80, "tag": 80}


def name_part_error(kind: str, value: object) -> str | None:
    """Why `value` is not a valid `kind` part of a model name (None: it is)."""
    pattern, rule = PARTS[kind]
    if not isinstance(value, str) or not value:
        return f"{kind} must be a non-empty string"
    if len(value) > MAX_LENGTH[kind]:
        return f"{kind} {value!r} is longer than {MAX_LENGTH[kind]} characters"
    if not re.fullmatch(pattern, value):
        hint = " (registries answer 404 to upper case)" if kind != "tag" and value.lower() != value else ""
        return f"{kind} {value!r} is invalid: {rule}{hint}"
    return None


def check_name_part(kind: str, value: object) -> str:
    error = name_part_error(kind, value)
    if error:
        raise PipelineError(error)
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class Repository:
    """`host:port/namespace/model` in a registry; `name(tag)` is what Ollama and the registry call it."""

    registry: str
    namespace: str
    model: str

    def __post_init__(self) -> None:
        for kind in ("registry", "namespace", "model"):
            check_name_part(kind, getattr(self, kind))

    @property
    def path(self) -> str:
        """The registry's repository path, `namespace/model`."""
        return f"{self.namespace}/{self.model}"

    def name(self, tag: str) -> str:
        check_name_part("tag", tag)
        return f"{self.registry}/{self.path}:{tag}"


def check_version_tag(tag: str) -> str:
    """A tag naming one model version: a valid tag and not the moving `latest` (nor deploy's own names)."""
    check_name_part("tag", tag)
    if tag == LATEST:
        raise PipelineError(f"tag {LATEST!r} is the moving tag; deploy a version tag (git short SHA or git tag)")
    if tag in RESERVED:
        raise PipelineError(f"tag {tag!r} is reserved for deploy's own use; deploy a version tag")
    return tag


def check_digest(digest: object, where: str) -> str:
    """A content digest as the registry and Ollama name blobs, `sha256:<64 hex>`, checked before it becomes
    part of a URL or a file name (a digest like `sha256:../../x` would walk out of the directory)."""
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise PipelineError(f"{where}: digest {str(digest)[:80]!r} is not sha256:<64 hex digits>")
    return digest
