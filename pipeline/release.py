"""What deploy and rollback share: their settings, the create request, pushing a version and verifying it
through the registry's own API, moving `latest`, and the deployment records.

Settings come from params.yaml `deploy` < the environment (OLLAMA_HOST, DEPLOY_REGISTRY) < the command
line. A record is one JSON line per run in `deploy.records` (deployments/records.jsonl), appended by
deploy and rollback and read back by `pipeline.rollback --list`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.common import PipelineError, get_logger, write_text_atomic
from pipeline.http_retry import RetryPolicy
from pipeline.model_names import LATEST, Repository, check_name_part
from pipeline.modelfile_parser import Modelfile
from pipeline.ollama_client import OllamaClient, hosts_from_env
from pipeline.params import DeployParams
from pipeline.registry_client import MODEL_LAYER, Manifest, RegistryClient

log = get_logger("release")

MODELFILE = Path("models/release/Modelfile")  # what ships: the modelfile stage's output, FROM its GGUF


# --- settings: params.yaml < environment < command line ---


@dataclass(frozen=True)
class Settings:
    repository: Repository
    hosts: tuple[str, ...]
    insecure: bool
    retry: RetryPolicy
    records: Path


def resolve_settings(
    params: DeployParams,
    environ: Mapping[str, str] = os.environ,
    registry: str | None = None,
    hosts: list[str] | None = None,
) -> Settings:
    registry = registry or environ.get("DEPLOY_REGISTRY") or params.registry
    check_name_part("registry", registry)
    return Settings(
        repository=Repository(registry, params.namespace, params.model),
        hosts=tuple(hosts or hosts_from_env(environ) or params.hosts),
        insecure=params.insecure,
        retry=RetryPolicy(params.retries, params.backoff_s, params.timeout_s),
        records=Path(params.records),
    )


def create_request(gguf: Path, gguf_digest: str, modelfile: Modelfile) -> dict:
    """POST /api/create fields besides the name: the uploaded GGUF by digest, then the Modelfile's."""
    return {"files": {gguf.name: gguf_digest}, **modelfile.create_request()}


# --- pushing a version and verifying it through the registry ---


def push_and_verify(
    client: OllamaClient,
    registry: RegistryClient,
    tags: list[str],
    gguf_digest: str | None,
    in_registry: Mapping[str, Manifest | None] | None = None,
) -> Manifest:
    """Push each version tag the registry lacks (per `in_registry`; None: all of them) from `client`,
    then check that every tag holds the manifest `client` created, every blob is there with its digest,
    and the model layer is the GGUF `gguf_digest` names where Ollama stores it as uploaded."""
    for tag in tags:
        name = registry.repository.name(tag)
        if in_registry is not None and in_registry.get(tag) is not None:
            log.info("%s: %s is already there, same manifest: not pushed again", registry, tag)
            continue
        try:
            client.push(name, registry.insecure)
        except PipelineError as error:
            raise PipelineError(f"{error}; the registry {registry.health()}") from None
    manifests = []
    for tag in tags:
        name = registry.repository.name(tag)
        manifest = registry.manifest(tag)
        if manifest is None:
            raise PipelineError(f"{registry}: {tag} is missing after the push")
        local = client.local_digest(name)
        if manifest.local_digest != local:
            raise PipelineError(
                f"{registry}: {tag} is {manifest.digest}, not the manifest {client} created for {name} "
                f"(local manifest sha256 {local})"
            )
        manifests.append(manifest)
    manifest = manifests[0]
    for blob in manifest.blobs:
        # the small blobs (config, template, params) are read back and hashed; the model only checked by HEAD
        registry.check_blob(blob, download=blob.media_type != MODEL_LAYER)
    model = manifest.layer(MODEL_LAYER)
    if model is None:
        raise PipelineError(f"{registry}: {tags[0]} has no model layer")
    if gguf_digest and model.digest != gguf_digest:
        if client.stores_gguf_as_uploaded:
            raise PipelineError(
                f"{registry}: the model layer of {tags[0]} is {model.digest}, not our GGUF {gguf_digest}"
            )
        log.info("%s rewrote the GGUF on import (0.30+): model layer %s", client, model.digest)
    return manifest


# --- moving latest ---


def move_latest(registry: RegistryClient, clients: list[OllamaClient], manifest: Manifest, version: str) -> bool:
    """Point `latest` at `version` in the registry (same manifest bytes, no blob moves) and on every host
    (a copy of the local manifest). True when anything changed."""
    changed = False
    current = registry.manifest(LATEST)
    if current is None or current.digest != manifest.digest:
        registry.put_manifest(LATEST, manifest)
        changed = True
    latest = registry.manifest(LATEST)
    if latest is None or latest.digest != manifest.digest:
        raise PipelineError(f"{registry}: latest is {latest and latest.digest} after the move, not {manifest.digest}")
    source, live = registry.repository.name(version), registry.repository.name(LATEST)
    for client in clients:
        wanted = client.local_digest(source)
        if wanted is None:
            raise PipelineError(f"{client} lost {source} before latest moved")
        if client.local_digest(live) != wanted:
            client.copy(source, live)
            changed = True
        if client.local_digest(live) != wanted:
            raise PipelineError(f"{client}: {live} did not move to {source}")
    return changed


# --- records ---


@dataclass(frozen=True)
class HostRecord:
    """What one run did on one Ollama host; deploy fills version/uploaded/served check, rollback the path."""

    url: str
    version: str | None = None
    uploaded: bool | None = None
    served_check_differences: list[str] | None = None
    path: str | None = None  # rollback: which of its three paths this host took


@dataclass(frozen=True)
class Record:
    """One deployment or rollback, as a line of deploy.records. Optional fields left None are not written."""

    action: str  # deploy | rollback
    when: str  # UTC, ISO 8601
    commit: str | None
    tags: list[str]
    registry: str
    repository: str
    manifest_digest: str
    model_digest: str
    latest: str
    changed: bool
    hosts: list[HostRecord] = field(default_factory=list)
    gguf: str | None = None  # deploy: the GGUF file's name and sha256, and the manifest's layers
    gguf_sha256: str | None = None
    layers: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        row = _without_unset(self)
        row["hosts"] = [_without_unset(host) for host in self.hosts]
        return row

    @classmethod
    def from_json(cls, row: Any, where: str) -> Record:
        """A record read back; a PipelineError naming `where` (file:line) and the field for a malformed one."""
        if not isinstance(row, dict):
            raise PipelineError(f"{where}: a record is a JSON object, not {type(row).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(row) - names)
        if unknown:
            raise PipelineError(f"{where}: unknown record field(s) {', '.join(unknown)}")
        try:
            hosts = [HostRecord(**host) for host in row.get("hosts", [])]
            record = cls(**{**row, "hosts": hosts})
        except TypeError as error:  # a missing field, or a host with an unknown one
            raise PipelineError(f"{where}: not a deployment record: {error}") from None
        if not isinstance(record.tags, list) or not all(isinstance(tag, str) for tag in record.tags):
            raise PipelineError(f"{where}: tags: expected a list of strings, got {record.tags!r}")
        return record


def _without_unset(record: Record | HostRecord) -> dict[str, Any]:
    """The record's fields, less the optional ones (default None) it leaves None: what the other command fills."""
    optional = {f.name for f in dataclasses.fields(record) if f.default is None}
    return {k: v for k, v in dataclasses.asdict(record).items() if not (k in optional and v is None)}


def commit_of() -> str | None:
    if os.environ.get("CI_COMMIT_SHA"):
        return os.environ["CI_COMMIT_SHA"]
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def append_record(path: Path, record: Record) -> None:
    """Append one JSON line (the file is rewritten atomically, so a crash never leaves half a line)."""
    previous = path.read_text(encoding="utf-8") if path.is_file() else ""
    if previous and not previous.endswith("\n"):
        previous += "\n"
    write_text_atomic(path, previous + json.dumps(record.to_json(), sort_keys=True) + "\n")


def read_records(path: Path) -> list[Record]:
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise PipelineError(f"{path}:{number}: not a JSON record: {error}") from None
        records.append(Record.from_json(row, f"{path}:{number}"))
    return records
