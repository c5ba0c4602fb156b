"""The Docker registry's own HTTP API (distribution registry:2), read by us, independently of Ollama.

Used to verify what Ollama pushed (manifest bytes and digests, every blob), to move `latest` by putting
a version's manifest bytes under that tag (same bytes, same digest, no blob re-upload), to list tags,
and to fetch a model's blobs for rollback (Ollama's own pull from a plain registry:2 fails: it expects
a redirect `Location` on blob GETs that the filesystem driver does not send).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import requests

from pipeline.common import PipelineError, atomic_file, get_logger
from pipeline.http_retry import RetryPolicy, TransientError, check_status
from pipeline.model_names import Repository

log = get_logger("registry_client")  # shared by deploy and rollback: logs under its own name

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
MODEL_LAYER = "application/vnd.ollama.image.model"


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int


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
        return cls(raw, sha256_of(raw), config, layers)

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
    def __init__(self, repository: Repository, insecure: bool, retry: RetryPolicy):
        self.repository, self.insecure = repository, insecure
        self.base = f"{'http' if insecure else 'https'}://{repository.registry}/v2/{repository.path}"
        self.retry = retry
        self.session = requests.Session()

    def __repr__(self) -> str:
        return f"registry {self.repository.registry}/{self.repository.path}"

    def _get(self, what: str, url: str, **kwargs) -> requests.Response:
        def call() -> requests.Response:
            response = self.session.get(url, timeout=(10, self.retry.timeout_s), **kwargs)
            if response.status_code != 404:
                check_status(response, f"{self} {what}")
            return response

        return self.retry.run(f"{self}: {what}", call)

    def health(self) -> str:
        """One line on whether the registry answers at all (to explain a failed push by Ollama)."""
        url = self.base.split("/v2/")[0] + "/v2/"
        try:
            response = self.session.get(url, timeout=(10, 30))
        except requests.RequestException as error:
            return f"{self.repository.registry} is unreachable from here ({type(error).__name__})"
        return f"{self.repository.registry} answers HTTP {response.status_code} on /v2/"

    def tags(self) -> list[str]:
        response = self._get("list tags", f"{self.base}/tags/list")
        if response.status_code == 404:  # NAME_UNKNOWN: nothing pushed yet
            return []
        return sorted(response.json().get("tags") or [])

    def manifest(self, tag: str) -> Manifest | None:
        """The manifest under `tag` (None if there is none); its bytes must hash to the registry's digest."""
        where = f"{self} manifest {tag}"
        response = self._get(f"get manifest {tag}", f"{self.base}/manifests/{tag}", headers={"Accept": MANIFEST_V2})
        if response.status_code == 404:
            return None
        manifest = Manifest.parse(response.content, where)
        announced = response.headers.get("Docker-Content-Digest")
        if announced and announced != manifest.digest:
            raise PipelineError(
                f"{where}: digest mismatch: the registry says {announced}, the bytes hash to {manifest.digest}"
            )
        return manifest

    def check_blob(self, layer: Layer, download: bool) -> None:
        """The blob exists with its digest and size; `download` also reads it back and hashes it."""
        url = f"{self.base}/blobs/{layer.digest}"

        def head() -> None:
            response = self.session.head(url, timeout=(10, self.retry.timeout_s))
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

        self.retry.run(f"{self}: HEAD blob {layer.digest}", head)
        if download:
            data = self._get(f"get blob {layer.digest}", url).content
            if sha256_of(data) != layer.digest:
                raise PipelineError(f"{self}: blob {layer.digest} reads back as {sha256_of(data)}: digest mismatch")

    def fetch_blob(self, layer: Layer, destination: Path) -> Path:
        """Download a blob to `destination` (atomically), verifying its sha256 while streaming."""

        def download() -> None:
            digest = hashlib.sha256()
            with atomic_file(destination) as tmp:
                response = self.session.get(
                    f"{self.base}/blobs/{layer.digest}", stream=True, timeout=(10, self.retry.timeout_s)
                )
                check_status(response, f"{self} get blob {layer.digest}")
                try:
                    with open(tmp, "wb") as out:
                        for block in response.iter_content(1 << 20):
                            digest.update(block)
                            out.write(block)
                except requests.exceptions.ChunkedEncodingError as error:
                    raise TransientError(f"{self}: download of {layer.digest} cut: {error}") from None
                if "sha256:" + digest.hexdigest() != layer.digest:
                    raise TransientError(f"{self}: blob {layer.digest} arrived as sha256:{digest.hexdigest()}")

        if destination.is_file() and os.path.getsize(destination) == layer.size:
            return destination
        log.info("%s: fetching %s (%d bytes)", self, layer.digest[:19], layer.size)
        self.retry.run(f"{self}: fetch blob {layer.digest}", download)
        return destination

    def put_manifest(self, tag: str, manifest: Manifest) -> None:
        """Put these exact manifest bytes under `tag` (the blobs are already there: nothing is re-uploaded)."""

        def put() -> None:
            response = self.session.put(
                f"{self.base}/manifests/{tag}",
                data=manifest.raw,
                headers={"Content-Type": MANIFEST_V2},
                timeout=(10, self.retry.timeout_s),
            )
            check_status(response, f"{self} put manifest {tag}")
            announced = response.headers.get("Docker-Content-Digest")
            if announced and announced != manifest.digest:
                raise PipelineError(f"{self}: {tag} stored as {announced}, expected {manifest.digest}")

        self.retry.run(f"{self}: put manifest {tag}", put)
