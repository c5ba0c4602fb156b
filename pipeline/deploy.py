"""Deploy the gated model to Ollama and the registry, then move `latest`.

    python -m pipeline.deploy --tag <git short sha> [--tag <git tag>]

Reads models/gate/verdict.json (refuses a model whose gate failed or is missing), the rendered
models/release/Modelfile and the GGUF its FROM names, data/gate_cases.jsonl, and params.yaml `deploy`.
The Ollama hosts come from `deploy.hosts`, overridden by OLLAMA_HOST (comma-separated: the rig and the
workstation) and then by --host; the registry from `deploy.registry`, DEPLOY_REGISTRY, then --registry.

    python -m pipeline.deploy --pull --tag ...   (a fresh clone: first fetch what ships from the DVC remote)

For each Ollama host: check the version (the JSON /api/create API: 0.5.5+), upload the GGUF only if
the host lacks it, and create the model under a scratch name. A version tag that already exists, in the
registry or on any host, must hold that same model (tags are immutable), else nothing changes. Then the
served check on every host: every case of data/gate_cases.jsonl through /api/chat with the gate's greedy
options must reach the gate's verdict (which proves Ollama applies the TEMPLATE the model was trained
with). Only then are the version tags written on the hosts, pushed from the first host and verified
through the registry's own API (the manifest is the one Ollama created, every blob is there with its
digest, the model layer is our GGUF), and the version's release note (verdict, gate cases, commit) kept
in the registry for rollback. `latest` moves last, on every host and then in the registry; on any failure
the hosts that moved get their previous `latest` back, so hosts and registry stay on one version.
Deploying the same model again uploads nothing and changes nothing. Every run appends a record to
`deploy.records` (deployments/records.jsonl) for CI to keep.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.cases import Case, load_cases
from pipeline.common import PipelineError, get_logger, run_cli
from pipeline.model_names import LATEST, STAGING, check_version_tag
from pipeline.modelfile_parser import Modelfile, load_modelfile
from pipeline.ollama_client import LocalModel, OllamaClient, file_sha256
from pipeline.params import GateParams, load_params
from pipeline.registry_client import MODEL_LAYER, Manifest, RegistryClient
from pipeline.release import (
    CASES,
    MODELFILE,
    HostRecord,
    Record,
    ReleaseNote,
    Settings,
    append_record,
    check_cases_judged,
    commit_of,
    create_request,
    move_latest,
    now,
    push_and_verify,
    quietly,
    resolve_settings,
    served_check,
    write_release_note,
)
from pipeline.verdict import VERDICT, Verdict, load_verdict

log = get_logger("deploy")


# --- what ships: the verdict, the Modelfile, its GGUF, the gate's cases ---


@dataclass(frozen=True)
class Release:
    modelfile_path: Path
    modelfile: Modelfile
    gguf: Path
    gguf_digest: str
    verdict: Verdict
    cases: dict[str, Case]
    cases_jsonl: str  # the cases file as read: kept with the version in the registry for rollback

    def create_request(self) -> dict:
        return create_request(self.gguf, self.gguf_digest, self.modelfile)


def load_release(modelfile_path: Path, verdict_path: Path, cases_path: Path) -> Release:
    verdict = load_verdict(verdict_path)
    modelfile = load_modelfile(modelfile_path)
    if modelfile.adapters:
        raise PipelineError(f"{modelfile_path}: ADAPTER is not supported by deploy: ship a merged GGUF")
    gguf = (modelfile_path.parent / modelfile.from_).resolve()
    if not gguf.is_file():
        raise PipelineError(f"{modelfile_path}: FROM {modelfile.from_}: no such GGUF next to the Modelfile")
    digest = file_sha256(gguf)
    passed_digest = verdict.gguf_sha256
    if passed_digest and "sha256:" + passed_digest.removeprefix("sha256:") != digest:
        raise PipelineError(
            f"{modelfile_path}: FROM {modelfile.from_} is {digest}, not the GGUF the gate passed "
            f"(sha256:{passed_digest.removeprefix('sha256:')}); rerun the pipeline"
        )
    errors: list[str] = []
    cases = {case.id: case for case in load_cases(cases_path, errors)}
    if errors:
        raise PipelineError("invalid gate cases:\n  " + "\n  ".join(errors))
    check_cases_judged(verdict, cases, f"{verdict_path} and {cases_path}")
    return Release(modelfile_path, modelfile, gguf, digest, verdict, cases, cases_path.read_text(encoding="utf-8"))


def pull_release(modelfile_path: Path) -> Path:
    """Fetch from the DVC remote exactly what ships: the Modelfile, then the GGUF its FROM names, whichever
    stage wrote it (quantize, or convert when the gate ships convert.outtype). Returns the GGUF's path."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo() as repo:
            repo.pull(targets=[str(modelfile_path)])
            gguf = Path(os.path.normpath(modelfile_path.parent / load_modelfile(modelfile_path).from_))
            repo.pull(targets=[str(gguf)])
    except DvcException as error:
        raise PipelineError(f"dvc pull of the release ({modelfile_path} and its GGUF): {error}") from None
    log.info("pulled %s and %s from the DVC remote", modelfile_path, gguf)
    return gguf


# --- deploy ---


@dataclass(frozen=True)
class Staged:
    """The release created on one host under the staging name: whether the GGUF was sent, the local
    manifest's digest (what every version tag of this release must hold), the served check's differences."""

    uploaded: bool
    digest: str
    differences: list[str]


def stage(client: OllamaClient, staging: str, release: Release) -> Staged:
    """Upload the GGUF if missing and create the release under the staging name (no version tag is touched)."""
    uploaded = client.upload_blob(release.gguf, release.gguf_digest)
    client.create(staging, release.create_request())
    digest = client.local_digest(staging)
    if digest is None:
        raise PipelineError(f"{client}: {staging} is missing right after its create")
    return Staged(uploaded, digest, [])


def check_tags_free(
    registry: RegistryClient,
    in_registry: dict[str, Manifest | None],
    clients: list[OllamaClient],
    local_before: dict[str, dict[str, LocalModel]],
    staged: dict[str, Staged],
    names: dict[str, str],
) -> None:
    """Version tags are immutable, on the registry and on every host: a tag that exists must already hold
    this release. Checked before any version tag is written."""
    primary = staged[clients[0].url].digest
    for tag, previous in in_registry.items():
        if previous is not None and previous.local_digest != primary:
            raise PipelineError(
                f"{registry}: {tag} already holds another model ({previous.digest}); version tags are immutable, "
                "deploy this model under a new tag. Nothing was changed"
            )
    for client in clients:
        for tag, name in names.items():
            existing = local_before[client.url].get(name)
            if existing is not None and existing.digest != staged[client.url].digest:
                raise PipelineError(
                    f"{client}: {tag} already holds another model (local manifest {existing.digest[:12]}); version "
                    "tags are immutable, deploy this model under a new tag. Nothing was changed"
                )


def deploy(release: Release, tags: list[str], settings: Settings, rules: GateParams) -> Record:
    """Ship `release` under the version `tags`, then move latest; returns the deployment record.

    Order: stage the release on every host under a scratch name, refuse if any version tag (registry or host)
    holds another model, run the served check on every host, then write the version tags on the hosts, push
    and verify them in the registry, keep the release note, and move latest (hosts, then the registry)."""
    tags = list(dict.fromkeys(check_version_tag(tag) for tag in tags))
    if not tags:
        raise PipelineError("no tag given: deploy needs at least one version tag (--tag <git short sha>)")
    repository = settings.repository
    names = {tag: repository.name(tag) for tag in tags}
    staging = repository.name(STAGING)
    clients, registry = settings.clients()
    for client in clients:
        client.check_version()

    in_registry = {tag: registry.manifest(tag) for tag in tags}
    local_before = {client.url: client.local_models() for client in clients}
    staged: dict[str, Staged] = {}
    try:
        for client in clients:
            staged[client.url] = stage(client, staging, release)
        check_tags_free(registry, in_registry, clients, local_before, staged, names)
        for client in clients:
            differences = served_check(client, staging, release.verdict, release.cases, rules)
            staged[client.url] = dataclasses.replace(staged[client.url], differences=differences)
        for client in clients:
            for name in names.values():
                if name not in local_before[client.url]:
                    client.copy(staging, name)
    finally:
        for client in clients:
            if client.url in staged:
                quietly(client.delete, staging)
    primary = clients[0]
    manifest = push_and_verify(primary, registry, tags, release.gguf_digest, in_registry)
    for tag in tags:
        note = ReleaseNote(tag, manifest.digest, now(), commit_of(), release.verdict, release.cases_jsonl)
        write_release_note(registry, note)
    latest_moved = move_latest(registry, clients, manifest, tags[0])

    local_changed = any(
        client.local_models().get(name) != local_before[client.url].get(name)
        for client in clients
        for name in [*names.values(), repository.name(LATEST)]
    )
    uploaded = any(done.uploaded for done in staged.values())
    record = Record(
        action="deploy",
        when=now(),
        commit=commit_of(),
        tags=tags,
        registry=repository.registry,
        repository=repository.path,
        manifest_digest=manifest.digest,
        model_digest=manifest.layer(MODEL_LAYER).digest,
        gguf=release.gguf.name,
        gguf_sha256=release.gguf_digest,
        layers={layer.media_type: layer.digest for layer in manifest.blobs},
        hosts=[
            HostRecord(
                url=client.url,
                version=".".join(map(str, client.version or ())),
                uploaded=staged[client.url].uploaded,
                served_check_differences=staged[client.url].differences,
            )
            for client in clients
        ],
        latest=tags[0],
        changed=latest_moved or local_changed or uploaded or None in in_registry.values(),
    )
    append_record(settings.records, record)
    log.info(
        "deployed %s as %s (manifest %s); latest -> %s%s",
        release.gguf.name,
        ", ".join(names.values()),
        manifest.digest[:19],
        tags[0],
        "" if record.changed else " (already deployed: nothing changed)",
    )
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.deploy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--tag", action="append", required=True, help="version tag (repeat: git short SHA, then git tag if any)"
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--modelfile", type=Path, default=MODELFILE, help="rendered Modelfile (default: %(default)s)")
    parser.add_argument("--verdict", type=Path, default=VERDICT, help="gate verdict (default: %(default)s)")
    parser.add_argument("--cases", type=Path, default=CASES, help="gate cases (default: %(default)s)")
    parser.add_argument(
        "--pull",
        action="store_true",
        help="first fetch the Modelfile and the GGUF it names from the DVC remote (a fresh CI clone)",
    )
    parser.add_argument("--registry", help="registry host:port (default: DEPLOY_REGISTRY, else params deploy.registry)")
    parser.add_argument(
        "--host", action="append", help="Ollama host, repeatable (default: OLLAMA_HOST, comma-separated, else params)"
    )
    args = parser.parse_args(argv)

    params = load_params(args.params)
    settings = resolve_settings(params.deploy, os.environ, args.registry, args.host)
    for tag in args.tag:  # names are checked before anything is read or sent
        settings.repository.name(check_version_tag(tag))
    if args.pull:
        pull_release(args.modelfile)
    release = load_release(args.modelfile, args.verdict, args.cases)
    deploy(release, args.tag, settings, params.gate)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
