"""The Docker registry's own HTTP API (distribution registry:2), read by us, independently of Ollama.

Used to verify what Ollama pushed (manifest bytes and digests, every blob), to move `latest` by putting
a version's manifest bytes under that tag (same bytes, same digest, no blob re-upload), to list tags, to
delete a version's manifest (retention), and to fetch a model's blobs for rollback (Ollama's own pull
from a plain registry:2 fails: it expects a redirect `Location` on blob GETs that the filesystem driver
does not send).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urljoin

import requests

from pipeline.common import PipelineError, atomic_file, file_sha256_hex, get_logger
from pipeline.http_body import DEFAULT_DEADLINE_S, MAX_JSON_BYTES, Deadline, blocks, json_object, read_body
from pipeline.http_retry import RetryPolicy, TransientError, check_status
from pipeline.model_names import Repository, check_digest

log = get_logger("registry_client")  # shared by deploy and rollback: logs under its own name

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
MODEL_LAYER = "application/vnd.ollama.image.model"
MAX_MANIFEST_BYTES = 4 << 20  # a manifest lists a few blobs: a few KB
T = TypeVar("T")
# What a registry without deletes needs (the doctor says the same): its config, or the env of registry:2.
DELETE_DISABLED = (
    "the registry has deletes disabled; enable them with `storage: delete: enabled: true` in its config.yml "
    "(registry:2 in a container: REGISTRY_STORAGE_DELETE_ENABLED=true) and restart it"
)
# A digest no manifest has: deleting it changes nothing, and answers 404 when deletes are enabled, else 405.
PROBE_DIGEST = "sha256:" + "0" * 64


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str  # sha256:<64 hex>, checked when parsed: it becomes part of URLs and file names
    size: int

    def to_json(self) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Manifest:
    """A manifest exactly as the registry holds it: its digest is the sha256 of these bytes."""

    raw: bytes
    digest: str
    config: Layer
    layers: tuple[Layer, ...] = field(default=())

    @classmethod
    def parse(cls, raw: bytes, where: str) -> Manifest:
        try:
            body = json.loads(raw)
            config = Layer(body["config"]["mediaType"], body["config"]["digest"], int(body["config"]["size"]))
            layers = tuple(Layer(item["mediaType"], item["digest"], int(item["size"])) for item in body["layers"])
        except (ValueError, KeyError, TypeError) as error:
            raise PipelineError(f"{where}: not an image manifest: {error}") from None
        if body.get("schemaVersion") != 2 or body.get("mediaType") != MANIFEST_V2:
            raise PipelineError(f"{where}: not a schema 2 manifest ({body.get('mediaType')})")
        for layer in (*layers, config):
            check_digest(layer.digest, f"{where}: {layer.media_type}")
            if not isinstance(layer.media_type, str) or layer.size < 0:
                raise PipelineError(f"{where}: layer {layer.digest}: bad media type or size")
        return cls(raw, sha256_of(raw), config, layers)

    @classmethod
    def build(cls, config: Layer, layers: list[Layer]) -> Manifest:
        """A schema 2 manifest of these blobs (they must be in the repository before it is put)."""
        body = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_V2,
            "config": config.to_json(),
            "layers": [layer.to_json() for layer in layers],
        }
        return cls.parse(json.dumps(body, sort_keys=True).encode(), "manifest")

    @property
    def blobs(self) -> tuple[Layer, ...]:
        return (*self.layers, self.config)

    def layer(self, media_type: str) -> Layer | None:
        found = [layer for layer in self.layers if layer.media_type == media_type]
        return found[0] if found else None

    @property
    def local_digest(self) -> str:
        """What Ollama's /api/tags reports for this manifest: the sha256 of the file it writes, which ends with
        a newline that the pushed body lacks."""
        return hashlib.sha256(self.raw + b"\n").hexdigest()


class RegistryClient:
    def __init__(
        self, repository: Repository, insecure: bool, retry: RetryPolicy, deadline_s: float = DEFAULT_DEADLINE_S
    ):
        self.repository, self.insecure = repository, insecure
        self.base = f"{'http' if insecure else 'https'}://{repository.registry}/v2/{repository.path}"
        self.retry = retry
        self.deadline_s = deadline_s  # overall, per operation: every attempt and every block of a blob
        self.session = requests.Session()

    def __repr__(self) -> str:
        return f"registry {self.repository.registry}/{self.repository.path}"

    def _run(self, what: str, call: Callable[[Deadline], T]) -> T:
        deadline = Deadline(self.deadline_s, f"{self} {what}")
        return self.retry.run(f"{self}: {what}", lambda: call(deadline))

    def _get(self, what: str, url: str, limit: int = MAX_JSON_BYTES, **kwargs) -> tuple[int, bytes, Mapping[str, str]]:
        """(status, body, headers) of a GET; the body read whole (at most `limit` bytes) before the deadline."""

        def call(deadline: Deadline) -> tuple[int, bytes, Mapping[str, str]]:
            timeout = deadline.timeout(self.retry.timeout_s)
            with self.session.get(url, timeout=timeout, stream=True, **kwargs) as response:
                if response.status_code == 404:
                    return 404, b"", dict(response.headers)
                check_status(response, f"{self} {what}")
                return (
                    response.status_code,
                    read_body(response, deadline, f"{self} {what}", limit),
                    dict(response.headers),
                )

        return self._run(what, call)

    def health(self) -> str:
        """One line on whether the registry answers at all (to explain a failed push by Ollama)."""
        url = self.base.split("/v2/")[0] + "/v2/"
        try:
            response = self.session.get(url, timeout=(10, 30))
        except requests.RequestException as error:
            return f"{self.repository.registry} is unreachable from here ({type(error).__name__})"
        return f"{self.repository.registry} answers HTTP {response.status_code} on /v2/"

    def tags(self) -> list[str]:
        status, body, _ = self._get("list tags", f"{self.base}/tags/list")
        if status == 404:  # NAME_UNKNOWN: nothing pushed yet
            return []
        what = f"{self} list tags"
        tags = json_object(body, what).get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
            raise PipelineError(f"{what}: the answer's 'tags' is not a list of strings")
        return sorted(tags)

    def manifest(self, tag: str) -> Manifest | None:
        """The manifest under `tag` (None if there is none); its bytes must hash to the registry's digest."""
        where = f"{self} manifest {tag}"
        status, body, headers = self._get(
            f"get manifest {tag}", f"{self.base}/manifests/{tag}", MAX_MANIFEST_BYTES, headers={"Accept": MANIFEST_V2}
        )
        if status == 404:
            return None
        manifest = Manifest.parse(body, where)
        announced = headers.get("Docker-Content-Digest")
        if announced and announced != manifest.digest:
            raise PipelineError(
                f"{where}: digest mismatch: the registry says {announced}, the bytes hash to {manifest.digest}"
            )
        return manifest

    def check_blob(self, layer: Layer, download: bool) -> None:
        """The blob exists with its digest and size; `download` also reads it back and hashes it."""
        self._head_blob(layer)
        if download:
            self.read_blob(layer)

    def _head_blob(self, layer: Layer) -> None:
        url = f"{self.base}/blobs/{check_digest(layer.digest, str(self))}"

        def head(deadline: Deadline) -> None:
            response = self.session.head(url, timeout=deadline.timeout(self.retry.timeout_s))
            if response.status_code == 404:
                raise PipelineError(f"{self}: blob {layer.digest} ({layer.media_type}) is missing")
            check_status(response, f"{self} HEAD blob {layer.digest}")
            announced = response.headers.get("Docker-Content-Digest")
            length = int(response.headers.get("Content-Length", -1))
            if announced != layer.digest or length != layer.size:
                raise PipelineError(
                    f"{self}: blob {layer.digest}: the registry answers digest {announced}, size {length} "
                    f"(manifest: size {layer.size})"
                )

        self._run(f"HEAD blob {layer.digest}", head)

    def read_blob(self, layer: Layer, limit: int = MAX_JSON_BYTES) -> bytes:
        """A small blob's bytes (config, template, a release record), checked against its digest."""
        url = f"{self.base}/blobs/{check_digest(layer.digest, str(self))}"
        status, data, _ = self._get(f"get blob {layer.digest}", url, limit)
        if status == 404:
            raise PipelineError(f"{self}: blob {layer.digest} ({layer.media_type}) is missing")
        if sha256_of(data) != layer.digest:
            raise PipelineError(f"{self}: blob {layer.digest} reads back as {sha256_of(data)}: digest mismatch")
        return data

    def fetch_blob(self, layer: Layer, destination: Path) -> Path:
        """Download a blob to `destination` (atomically), verifying its sha256 while streaming. A file already
        there is used only if it hashes to the digest (a file of the right size may hold anything)."""
        digest_name = check_digest(layer.digest, str(self))

        def download(deadline: Deadline) -> None:
            digest = hashlib.sha256()
            with atomic_file(destination) as tmp:
                response = self.session.get(
                    f"{self.base}/blobs/{digest_name}", stream=True, timeout=deadline.timeout(self.retry.timeout_s)
                )
                with response:
                    check_status(response, f"{self} get blob {layer.digest}")
                    with open(tmp, "wb") as out:
                        for block in blocks(response, deadline, f"{self}: download of {layer.digest}"):
                            digest.update(block)
                            out.write(block)
                if "sha256:" + digest.hexdigest() != layer.digest:
                    raise TransientError(f"{self}: blob {layer.digest} arrived as sha256:{digest.hexdigest()}")

        if destination.is_file() and os.path.getsize(destination) == layer.size:
            if "sha256:" + file_sha256_hex(destination) == layer.digest:
                return destination
            log.warning("%s: %s holds other bytes than %s: fetched again", self, destination, layer.digest[:19])
        log.info("%s: fetching %s (%d bytes)", self, layer.digest[:19], layer.size)
        self._run(f"fetch blob {layer.digest}", download)
        return destination

    def upload_blob(self, data: bytes, media_type: str) -> Layer:
        """Put a small blob (monolithic upload: POST a session, PUT the bytes with their digest)."""
        layer = Layer(media_type, sha256_of(data), len(data))

        def upload(deadline: Deadline) -> None:
            started = self.session.post(f"{self.base}/blobs/uploads/", timeout=deadline.timeout(self.retry.timeout_s))
            check_status(started, f"{self} start upload")
            location = started.headers.get("Location")
            if not location:
                raise PipelineError(f"{self} start upload: the answer has no Location")
            url = urljoin(self.base + "/", location)
            separator = "&" if "?" in url else "?"
            response = self.session.put(
                f"{url}{separator}digest={layer.digest}",
                data=data,
                headers={"Content-Type": "application/octet-stream"},
                timeout=deadline.timeout(self.retry.timeout_s),
            )
            check_status(response, f"{self} upload blob {layer.digest}")

        self._run(f"upload blob {layer.digest}", upload)
        return layer

    def put_manifest(self, tag: str, manifest: Manifest) -> None:
        """Put these exact manifest bytes under `tag` (the blobs are already there: nothing is re-uploaded)."""

        def put(deadline: Deadline) -> None:
            response = self.session.put(
                f"{self.base}/manifests/{tag}",
                data=manifest.raw,
                headers={"Content-Type": MANIFEST_V2},
                timeout=deadline.timeout(self.retry.timeout_s),
            )
            check_status(response, f"{self} put manifest {tag}")
            announced = response.headers.get("Docker-Content-Digest")
            if announced and announced != manifest.digest:
                raise PipelineError(f"{self}: {tag} stored as {announced}, expected {manifest.digest}")

        self._run(f"put manifest {tag}", put)

    def delete_manifest(self, digest: str) -> bool:
        """Delete the manifest `digest` and with it every tag of this repository that holds it (the
        registry's API deletes by digest only). True when deleted, False when it was already gone. Its blobs
        stay on disk until the registry's garbage-collect run. A registry without `storage.delete.enabled`
        answers 405 UNSUPPORTED: one clear error saying how to turn it on."""
        url = f"{self.base}/manifests/{check_digest(digest, str(self))}"

        def delete(deadline: Deadline) -> bool:
            response = self.session.delete(url, timeout=deadline.timeout(self.retry.timeout_s))
            if response.status_code == 404:
                return False
            if response.status_code == 405:
                raise PipelineError(f"{self}: DELETE of manifest {digest} refused: {DELETE_DISABLED}")
            check_status(response, f"{self} delete manifest {digest}")
            return True

        return self._run(f"delete manifest {digest}", delete)
