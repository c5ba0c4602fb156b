"""What deploy and rollback share: their settings, the create request, the served check, pushing a version
and verifying it through the registry's own API, moving `latest` as one step, and the deployment records.

Settings come from params.yaml `deploy` < the environment (OLLAMA_HOST, DEPLOY_REGISTRY) < the command
line. A record is one JSON line per run in `deploy.records` (deployments/records.jsonl), appended by
deploy and rollback and kept by CI as an artifact. What outlives the job is in the registry: for each
deployed version, `<namespace>/<model>-releases:<tag>` holds its release (when, which commit, the gate
verdict and the gate cases it passed), which `rollback --list` shows and `rollback --to` requires.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cases import Case, load_cases
from pipeline.common import PipelineError, get_logger, write_text_atomic
from pipeline.http_body import DEFAULT_DEADLINE_S
from pipeline.http_retry import RetryPolicy
from pipeline.model_names import LATEST, PREVIOUS_LATEST, Repository, check_name_part
from pipeline.modelfile_parser import Modelfile
from pipeline.ollama_client import OllamaClient, hosts_from_env
from pipeline.params import DeployParams, GateParams
from pipeline.registry_client import MODEL_LAYER, Manifest, RegistryClient
from pipeline.verdict import Verdict, judge_keywords, sampling_options

log = get_logger("release")

MODELFILE = Path("models/release/Modelfile")  # what ships: the modelfile stage's output, FROM its GGUF
CASES = Path("data/gate_cases.jsonl")  # the gate's cases: the served check runs every one


# --- settings: params.yaml < environment < command line ---


@dataclass(frozen=True)
class Settings:
    repository: Repository
    hosts: tuple[str, ...]
    insecure: bool
    retry: RetryPolicy
    records: Path
    deadline_s: float = DEFAULT_DEADLINE_S

    def clients(self) -> tuple[list[OllamaClient], RegistryClient]:
        """A client per Ollama host, and one for the registry repository."""
        hosts = [OllamaClient(host, self.retry, self.deadline_s) for host in self.hosts]
        return hosts, RegistryClient(self.repository, self.insecure, self.retry, self.deadline_s)


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
        deadline_s=params.deadline_s,
    )


def create_request(gguf: Path, gguf_digest: str, modelfile: Modelfile) -> dict:
    """POST /api/create fields besides the name: the uploaded GGUF by digest, then the Modelfile's."""
    return {"files": {gguf.name: gguf_digest}, **modelfile.create_request()}


# --- the served check ---


# Sampler settings where Ollama's defaults differ from llama.cpp's (the gate's): Ollama penalises repeats
# (repeat_penalty 1.1) unless told otherwise, which changes greedy answers. The verdict's options win.
SERVED_CHECK_DEFAULTS = {"repeat_penalty": 1.0}


def served_options(verdict: Verdict, rules: GateParams) -> dict:
    """The verdict's greedy options over Ollama's differing defaults; a verdict without any (older) gets
    the gate's own."""
    return {**SERVED_CHECK_DEFAULTS, **(verdict.options or sampling_options(rules))}


def check_cases_judged(verdict: Verdict, cases: Mapping[str, Case], where: str) -> None:
    """The verdict judged exactly these cases: every gate case is checked served, none is left out."""
    judged = {c.id for c in verdict.cases}
    unknown, unjudged = sorted(judged - set(cases)), sorted(set(cases) - judged)
    if unknown or unjudged:
        raise PipelineError(
            f"{where}: the gate verdict does not match the gate cases (not in the cases: {unknown or 'none'}; "
            f"not judged by the gate: {unjudged or 'none'}); rerun the gate"
        )


def served_check(
    client: OllamaClient, name: str, verdict: Verdict, cases: Mapping[str, Case], rules: GateParams
) -> list[str]:
    """Send every gate case to `name` on this host and judge Ollama's answers as the gate judged llama.cpp's.
    A PipelineError unless the verdict is the same (passed); returns the per-case score differences.
    Ollama gives no likelihoods, so unstable cases (decided by likelihood in the gate) keep the gate's score."""
    if not cases:
        raise PipelineError("no gate cases: nothing to check the served model against")
    check_cases_judged(verdict, cases, f"served check on {client}")
    options = served_options(verdict, rules)
    judged = {c.id: c for c in verdict.cases}
    ordered = list(cases.values())
    before = {c.id: judged[c.id].before for c in ordered}
    after: dict[str, float] = {}
    forbidden: dict[str, tuple[str, ...]] = {}
    differences = []
    for case in ordered:
        gate_case = judged[case.id]
        answer = client.chat(name, case.messages(), options)
        score = case.score(answer)
        after[case.id] = gate_case.decided if gate_case.unstable else score.score
        forbidden[case.id] = score.forbidden
        if abs(score.score - gate_case.after) > 1e-9:
            differences.append(
                f"{case.id}: gate {gate_case.after:.3f} ({gate_case.answer[:60]!r}), "
                f"served {score.score:.3f} ({answer[:60]!r})"
            )
    # the gate also bounds what the GGUF may lose against the merged HF model: same rule, same scores
    merged = {c.id: judged[c.id].merged for c in ordered}
    reasons = judge_keywords(ordered, before, after, rules, forbidden, merged)
    if reasons:
        raise PipelineError(
            f"served check on {client}: {name} fails the gate that the GGUF passed in llama.cpp, so Ollama does not "
            f"prompt it as it was trained (TEMPLATE?): {'; '.join(reasons)}. Per case: {'; '.join(differences)}"
        )
    for difference in differences:
        log.warning("served check on %s: score differs from the gate's: %s", client, difference)
    log.info("served check on %s: %d cases, same verdict as the gate (passed)", client, len(ordered))
    return differences


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
    """Point `latest` at `version` everywhere, as one step: on every host first (a copy of the local
    manifest, verified), then in the registry (the same manifest bytes, no blob moves), the registry last.
    On any failure every host whose `latest` moved gets its previous one back, so hosts and registry stay
    on the old version together. True when anything changed."""
    source, live, previous = (registry.repository.name(tag) for tag in (version, LATEST, PREVIOUS_LATEST))
    before = {client.url: client.local_digest(live) for client in clients}
    moved: list[OllamaClient] = []
    backed_up: list[OllamaClient] = []
    try:
        for client in clients:
            wanted = client.local_digest(source)
            if wanted is None:
                raise PipelineError(f"{client} lost {source} before latest moved")
            if before[client.url] == wanted:
                continue
            if before[client.url] is not None:
                client.copy(live, previous)  # what to put back if a later step fails
                backed_up.append(client)
            moved.append(client)
            client.copy(source, live)
            if client.local_digest(live) != wanted:
                raise PipelineError(f"{client}: {live} did not move to {source}")
        registry_changed = _move_registry_latest(registry, manifest)
    except PipelineError as error:
        restored = _put_back(clients, moved, before, live, previous)
        raise PipelineError(f"{error}; latest was not moved: {restored}") from None
    finally:
        for client in backed_up:
            quietly(client.delete, previous)
    return registry_changed or bool(moved)


def _move_registry_latest(registry: RegistryClient, manifest: Manifest) -> bool:
    current = registry.manifest(LATEST)
    if current is not None and current.digest == manifest.digest:
        return False
    registry.put_manifest(LATEST, manifest)
    latest = registry.manifest(LATEST)
    if latest is None or latest.digest != manifest.digest:
        if current is not None:
            quietly(registry.put_manifest, LATEST, current)
        raise PipelineError(f"{registry}: latest is {latest and latest.digest} after the move, not {manifest.digest}")
    return True


def _put_back(
    clients: list[OllamaClient], moved: list[OllamaClient], before: dict[str, str | None], live: str, previous: str
) -> str:
    """Give each moved host its previous latest again; one line saying what was restored (or could not be)."""
    failed = []
    for client in moved:
        try:
            if client.local_digest(live) == before[client.url]:
                continue  # the failed step never moved it
            if before[client.url] is None:
                client.delete(live)
            else:
                client.copy(previous, live)
            if client.local_digest(live) != before[client.url]:
                raise PipelineError(f"{live} is not the previous latest")
        except PipelineError as error:
            failed.append(f"{client}: {error}")
    if failed:
        return "COULD NOT PUT BACK the previous latest on " + "; ".join(failed)
    return f"the previous latest is back on {len(moved)} host(s)"


def quietly(call: Callable[..., object], *args: object) -> None:
    """Clean-up that must not hide the error being raised (it is logged instead)."""
    try:
        call(*args)
    except PipelineError as error:
        log.warning("clean-up failed: %s", error)


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
    """The records of the file; a corrupt line is reported (file:line and why) and skipped, not fatal:
    one bad line must not hide every other deployment."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            log.warning("%s:%d: not a JSON record (%s): skipped", path, number, error)
            continue
        try:
            records.append(Record.from_json(row, f"{path}:{number}"))
        except PipelineError as error:
            log.warning("%s: skipped", error)
    return records


# --- releases in the registry: what outlives the job ---

RELEASE_MEDIA = "application/vnd.llm-gitops.release.v1+json"
RELEASE_CONFIG_MEDIA = "application/vnd.llm-gitops.release.config.v1+json"
RELEASES_SUFFIX = "-releases"


@dataclass(frozen=True)
class ReleaseNote:
    """A deployed version as the registry keeps it: which manifest, when, from which commit, and the gate
    verdict and cases it passed (rollback runs the served check with them, and refuses a version without)."""

    tag: str
    manifest_digest: str
    when: str
    commit: str | None
    verdict: Verdict
    cases_jsonl: str  # data/gate_cases.jsonl as the gate read it

    def to_bytes(self) -> bytes:
        row = {**dataclasses.asdict(self), "verdict": self.verdict.to_json()}
        return json.dumps(row, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> ReleaseNote:
        try:
            row = json.loads(data)
            if not isinstance(row, dict):
                raise TypeError("not a JSON object")
            verdict = Verdict.from_json(row["verdict"], Path(where))
            note = cls(
                tag=row["tag"],
                manifest_digest=row["manifest_digest"],
                when=row["when"],
                commit=row.get("commit"),
                verdict=verdict,
                cases_jsonl=row["cases_jsonl"],
            )
        except (ValueError, KeyError, TypeError) as error:
            raise PipelineError(f"{where}: not a release note ({type(error).__name__}: {error})") from None
        if not all(isinstance(v, str) for v in (note.tag, note.manifest_digest, note.when, note.cases_jsonl)):
            raise PipelineError(f"{where}: not a release note (tag, manifest_digest, when, cases_jsonl: strings)")
        return note

    def cases(self, workdir: Path) -> dict[str, Case]:
        """The gate cases this version passed, read as the gate reads them."""
        path = workdir / f"gate_cases-{self.tag}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.cases_jsonl, encoding="utf-8")
        errors: list[str] = []
        cases = {case.id: case for case in load_cases(path, errors)}
        if errors:
            raise PipelineError(f"the release note of {self.tag}: invalid gate cases:\n  " + "\n  ".join(errors))
        return cases


def releases_client(registry: RegistryClient, suffix: str = RELEASES_SUFFIX) -> RegistryClient:
    """The registry repository `<namespace>/<model><suffix>` (`-releases` by default), beside the model's own."""
    repository = registry.repository
    notes = Repository(repository.registry, repository.namespace, repository.model + suffix)
    return RegistryClient(notes, registry.insecure, registry.retry, registry.deadline_s)


def read_release_note(registry: RegistryClient, tag: str) -> ReleaseNote | None:
    """The release note of `tag`, None when there is none; a malformed one is a PipelineError."""
    notes = releases_client(registry)
    manifest = notes.manifest(tag)
    if manifest is None:
        return None
    layer = manifest.layer(RELEASE_MEDIA)
    if layer is None:
        raise PipelineError(f"{notes}: {tag} holds no release note")
    note = ReleaseNote.from_bytes(notes.read_blob(layer), f"{notes}:{tag}")
    if note.tag != tag:
        raise PipelineError(f"{notes}:{tag}: the note is about {note.tag!r}")
    return note


def write_release_note(registry: RegistryClient, note: ReleaseNote) -> None:
    """Keep the note of a version pushed and verified; the first note of a version stays (tags are immutable)."""
    notes = releases_client(registry)
    existing = read_release_note(registry, note.tag)
    if existing is not None:
        if existing.manifest_digest != note.manifest_digest:
            raise PipelineError(f"{notes}: {note.tag} is noted with another manifest ({existing.manifest_digest})")
        return
    config = notes.upload_blob(b"{}", RELEASE_CONFIG_MEDIA)
    layer = notes.upload_blob(note.to_bytes(), RELEASE_MEDIA)
    notes.put_manifest(note.tag, Manifest.build(config, [layer]))
    log.info("%s: release note of %s kept (verdict and gate cases)", notes, note.tag)


def release_notes(registry: RegistryClient) -> list[ReleaseNote]:
    """Every readable release note; an unreadable one is reported and skipped."""
    found = []
    for tag in releases_client(registry).tags():
        try:
            note = read_release_note(registry, tag)
        except PipelineError as error:
            log.warning("%s: skipped", error)
            continue
        if note is not None:
            found.append(note)
    return found


# --- versions removed by retention: a small mark per tag, so that rollback can say why a tag is gone ---

RETIRED_MEDIA = "application/vnd.llm-gitops.retired.v1+json"
RETIRED_SUFFIX = "-retired"


@dataclass(frozen=True)
class Retired:
    """A version retention deleted (its manifest and release note): kept as `<model>-retired:<tag>`."""

    tag: str
    manifest_digest: str
    when: str
    why: str

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()


def write_retired(registry: RegistryClient, mark: Retired) -> None:
    marks = releases_client(registry, RETIRED_SUFFIX)
    config = marks.upload_blob(b"{}", RELEASE_CONFIG_MEDIA)
    layer = marks.upload_blob(mark.to_bytes(), RETIRED_MEDIA)
    marks.put_manifest(mark.tag, Manifest.build(config, [layer]))


def read_retired(registry: RegistryClient, tag: str) -> Retired | None:
    """The retention mark of `tag`, None when retention never removed it."""
    marks = releases_client(registry, RETIRED_SUFFIX)
    manifest = marks.manifest(tag)
    layer = manifest and manifest.layer(RETIRED_MEDIA)
    if layer is None:
        return None
    where = f"{marks}:{tag}"
    try:
        row = json.loads(marks.read_blob(layer))
        mark = Retired(**row)
    except (ValueError, TypeError) as error:
        raise PipelineError(f"{where}: not a retention mark ({type(error).__name__}: {error})") from None
    if mark.tag != tag:
        raise PipelineError(f"{where}: the mark is about {mark.tag!r}")
    return mark
