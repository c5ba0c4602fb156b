"""Roll back: make a tagged model version live again, without retraining.

    python -m pipeline.rollback --to <tag>
    python -m pipeline.rollback --list

--to takes, per Ollama host, the fastest path that works:
1. the host still has `<registry>/<namespace>/<model>:<tag>`: copy it to `:latest` (/api/copy);
2. else the registry has the tag: our own client fetches its blobs (sha256-checked) and the model is
   created again from them (Ollama's own pull from a plain registry:2 fails: it wants a redirect on blob
   GETs that the filesystem storage does not send);
3. else DVC has it at the git revision `<tag>` (a git tag or commit): models/release/Modelfile, its GGUF,
   the gate verdict and cases are read with DVC (from the remote if needed), the model is created and the
   tag pushed.
Refused before anything changes: an unknown tag; a tag retention removed (`<model>-retired:<tag>`
says when and why); a registry tag without the release note deploy keeps
(`<model>-releases:<tag>`: a passed gate verdict and the gate cases); a tag only some host has (its
origin cannot be verified). A host copy whose manifest is not the registry's is rebuilt from the registry.
Then the served check of deploy runs on every host with the version's own verdict and cases, and `latest`
moves as deploy moves it: on every host, then in the registry (same bytes, no re-upload); a failure puts
back what moved.

--list shows the deployable versions: the registry's tags (with `latest` marked) and when and from which
commit each was deployed (the release notes in the registry, and this job's deploy.records).
Settings as for pipeline.deploy: params.yaml `deploy`, OLLAMA_HOST, DEPLOY_REGISTRY, --host, --registry.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.cases import Case, load_cases
from pipeline.common import PipelineError, get_logger, run_cli
from pipeline.model_names import LATEST, check_version_tag
from pipeline.modelfile_parser import load_modelfile
from pipeline.ollama_client import file_sha256
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
    commit_of,
    create_request,
    move_latest,
    now,
    push_and_verify,
    read_records,
    read_release_note,
    read_retired,
    release_notes,
    resolve_settings,
    served_check,
    write_release_note,
)
from pipeline.verdict import VERDICT, Verdict, load_verdict

log = get_logger("rollback")

# Manifest layer media type -> the /api/create field it becomes (text layers as they are, JSON ones decoded).
TEXT_FIELDS = {
    "application/vnd.ollama.image.template": "template",
    "application/vnd.ollama.image.system": "system",
}
JSON_FIELDS = {
    "application/vnd.ollama.image.params": "parameters",
    "application/vnd.ollama.image.messages": "messages",
}
LICENSE = "application/vnd.ollama.image.license"
PATHS = ("host has the tag: copy", "from the registry's blobs", "from DVC at the git tag")


@dataclass(frozen=True)
class Approved:
    """What the version passed: the gate verdict and the gate cases the served check runs again."""

    verdict: Verdict
    cases: dict[str, Case]
    cases_jsonl: str


@dataclass(frozen=True)
class DvcRelease:
    """The release files of a git revision, read through DVC: the create request and its GGUF."""

    approved: Approved
    gguf: Path
    gguf_digest: str
    request: dict


def create_request_from_registry(registry: RegistryClient, manifest: Manifest, workdir: Path) -> tuple[dict, Path]:
    """The /api/create fields that rebuild the model in `manifest`, from blobs fetched with our client."""
    request: dict = {}
    model_file: Path | None = None
    for layer in manifest.layers:
        path = registry.fetch_blob(layer, workdir / layer.digest.replace(":", "-"))
        if layer.media_type == MODEL_LAYER:
            model_file = path
        elif layer.media_type in TEXT_FIELDS:
            request[TEXT_FIELDS[layer.media_type]] = path.read_text(encoding="utf-8")
        elif layer.media_type in JSON_FIELDS:
            request[JSON_FIELDS[layer.media_type]] = json.loads(path.read_text(encoding="utf-8"))
        elif layer.media_type == LICENSE:
            request.setdefault("license", []).append(path.read_text(encoding="utf-8"))
        else:
            raise PipelineError(f"{registry}: layer type {layer.media_type} cannot be re-created by rollback")
    if model_file is None:
        raise PipelineError(f"{registry}: the manifest has no model layer")
    gguf = model_file.with_name("model.gguf")
    os.replace(model_file, gguf)
    request["files"] = {gguf.name: manifest.layer(MODEL_LAYER).digest}
    return request, gguf


def read_release_from_dvc(tag: str, workdir: Path) -> DvcRelease:
    """models/release/Modelfile, its GGUF, the gate verdict and the gate cases at git revision `tag`, read
    through DVC (from the remote if needed); the GGUF must be the one the verdict passed."""
    import dvc.api
    from dvc.exceptions import DvcException
    from scmrepo.exceptions import SCMError

    repo = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True).stdout.strip()
    root = workdir / "dvc"

    def get(path: Path) -> Path:
        destination = root / path
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            with (
                dvc.api.open(str(path), repo=repo or ".", rev=tag, mode="rb") as source,
                open(destination, "wb") as out,
            ):
                shutil.copyfileobj(source, out)
        except (DvcException, SCMError, FileNotFoundError, OSError) as error:
            raise PipelineError(f"DVC has no {path} at revision {tag!r}: {type(error).__name__}: {error}") from None
        return destination

    verdict = load_verdict(get(VERDICT))
    cases_path = get(CASES)
    modelfile_path = get(MODELFILE)
    modelfile = load_modelfile(modelfile_path)
    gguf = get(Path(os.path.normpath(MODELFILE.parent / modelfile.from_)))
    digest = file_sha256(gguf)
    if verdict.gguf_sha256 and digest != "sha256:" + verdict.gguf_sha256.removeprefix("sha256:"):
        raise PipelineError(f"DVC at {tag!r}: {gguf.name} is {digest}, not the GGUF the gate passed")
    errors: list[str] = []
    cases = {case.id: case for case in load_cases(cases_path, errors)}
    if errors:
        raise PipelineError(f"DVC at {tag!r}: invalid gate cases:\n  " + "\n  ".join(errors))
    approved = Approved(verdict, cases, cases_path.read_text(encoding="utf-8"))
    return DvcRelease(approved, gguf, digest, create_request(gguf, digest, modelfile))


def approved_in_registry(registry: RegistryClient, tag: str, manifest: Manifest, workdir: Path) -> Approved:
    """The release note deploy kept for `tag`: it must name this manifest and a passed verdict."""
    note = read_release_note(registry, tag)
    if note is None:
        raise PipelineError(
            f"{registry}: {tag} has no release note (no gate verdict recorded by a deploy): refusing to make it "
            "live. Nothing was changed"
        )
    if note.manifest_digest != manifest.digest:
        raise PipelineError(
            f"{registry}: {tag} is {manifest.digest}, but its release note is about {note.manifest_digest}: "
            "refusing. Nothing was changed"
        )
    if not note.verdict.passed:
        raise PipelineError(f"{registry}: {tag}: its gate verdict failed: refusing. Nothing was changed")
    return Approved(note.verdict, note.cases(workdir), note.cases_jsonl)


def rollback(tag: str, settings: Settings, workdir: Path, rules: GateParams) -> Record:
    """Make `tag` live again: resolved and checked before anything changes, the served check on every host,
    then latest moves as deploy moves it (hosts, then the registry; put back on failure)."""
    check_version_tag(tag)
    repository = settings.repository
    name = repository.name(tag)
    clients, registry = settings.clients()
    for client in clients:
        client.check_version()
    held = {client.url: client.local_digest(name) for client in clients}
    manifest = registry.manifest(tag)
    paths = {client.url: PATHS[0] for client in clients}
    from_dvc: DvcRelease | None = None

    if manifest is not None:
        approved = approved_in_registry(registry, tag, manifest, workdir)
        # A host copy that is not the registry's manifest is never made live as it is: that host gets the
        # registry's verified blobs again (Ollama's create from them writes its own manifest, so a copy
        # rebuilt by an earlier rollback differs too; the served check below judges what it serves).
        lacking = [client for client in clients if held[client.url] != manifest.local_digest]
        for client in lacking:
            if held[client.url] is not None:
                log.warning("%s: %s is not the registry's %s: rebuilt from the registry's blobs", client, name, tag)
        for blob in manifest.blobs:
            registry.check_blob(blob, download=False)
        if lacking:
            request, gguf = create_request_from_registry(registry, manifest, workdir)
            for client in lacking:
                client.upload_blob(gguf, request["files"][gguf.name])
                client.create(name, request)
                paths[client.url] = PATHS[1]
    else:
        lacking = clients
        retired = read_retired(registry, tag)
        if retired is not None:
            raise PipelineError(
                f"{registry}: {tag} was removed by retention on {retired.when} ({retired.why}): it cannot be rolled "
                "back to. Deploy its commit again to bring it back. Nothing was changed"
            )
        holders = [str(client) for client in clients if held[client.url] is not None]
        if holders:
            raise PipelineError(
                f"{', '.join(holders)} {'has' if len(holders) == 1 else 'have'} {name}, but the registry has no {tag}: "
                "a host-only copy cannot be verified: refusing. Deploy that commit again. Nothing was changed"
            )
        try:
            from_dvc = read_release_from_dvc(tag, workdir)
        except PipelineError as dvc_error:
            known = [t for t in registry.tags() if t != LATEST]
            raise PipelineError(
                f"unknown tag {tag!r}: no Ollama host has {name}, the registry has no such tag "
                f"(it has: {', '.join(known) or 'none'}), and {dvc_error}. Nothing was changed"
            ) from None
        approved = from_dvc.approved
        for client in clients:
            client.upload_blob(from_dvc.gguf, from_dvc.gguf_digest)
            client.create(name, from_dvc.request)
            paths[client.url] = PATHS[2]

    for client in clients:  # the same check as deploy's, before the version goes live
        served_check(client, name, approved.verdict, approved.cases, rules)
    if manifest is None:  # from DVC: the registry gets the version tag and its note first
        manifest = push_and_verify(clients[0], registry, [tag], from_dvc.gguf_digest if from_dvc else None)
        note = ReleaseNote(tag, manifest.digest, now(), commit_of(), approved.verdict, approved.cases_jsonl)
        write_release_note(registry, note)
    changed = move_latest(registry, clients, manifest, tag)
    record = Record(
        action="rollback",
        when=now(),
        commit=commit_of(),
        tags=[tag],
        registry=repository.registry,
        repository=repository.path,
        manifest_digest=manifest.digest,
        model_digest=manifest.layer(MODEL_LAYER).digest,
        hosts=[HostRecord(url=client.url, path=paths[client.url]) for client in clients],
        latest=tag,
        changed=changed,
    )
    append_record(settings.records, record)
    log.info(
        "latest -> %s (manifest %s); %s", tag, manifest.digest[:19], "; ".join(f"{u}: {p}" for u, p in paths.items())
    )
    return record


def deployable_versions(settings: Settings) -> list[dict]:
    """Registry tags with their release notes (kept in the registry by deploy: a later pipeline sees them),
    and this job's deployment records, one row per tag, newest deployment last."""
    _, registry = settings.clients()
    latest = registry.manifest(LATEST)
    rows: dict[str, dict] = {}
    for tag in registry.tags():
        if tag == LATEST:
            continue
        manifest = registry.manifest(tag)
        rows[tag] = {
            "tag": tag,
            "manifest_digest": manifest.digest if manifest else None,
            "in_registry": manifest is not None,
            "latest": bool(manifest and latest and manifest.digest == latest.digest),
            "deployed": None,
            "commit": None,
        }
    deployments = [([note.tag], note.manifest_digest, note.when, note.commit) for note in release_notes(registry)]
    deployments += [
        (record.tags, record.manifest_digest, record.when, record.commit)
        for record in read_records(settings.records)
        if record.action == "deploy" and record.repository == settings.repository.path
    ]
    for tags, digest, when, commit in deployments:
        for tag in tags:
            row = rows.setdefault(tag, {"tag": tag, "manifest_digest": digest, "in_registry": False, "latest": False})
            if row.get("deployed") is None or when > row["deployed"]:
                row["deployed"], row["commit"] = when, commit
    return sorted(rows.values(), key=lambda row: (row.get("deployed") or "", row["tag"]))


def format_versions(rows: list[dict]) -> str:
    lines = [f"{'tag':<24} {'manifest':<21} {'latest':<6} {'registry':<8} {'deployed':<25} commit"]
    for row in rows:
        digest, commit = (row["manifest_digest"] or "-")[:19], (row.get("commit") or "-")[:12]
        lines.append(
            f"{row['tag']:<24} {digest:<21} {'*' if row['latest'] else '':<6} "
            f"{'yes' if row['in_registry'] else 'no':<8} {row.get('deployed') or '-':<25} {commit}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.rollback",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--to", metavar="TAG", help="version tag to make live again (git short SHA or git tag)")
    action.add_argument("--list", action="store_true", help="list deployable versions")
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--registry", help="registry host:port (default: DEPLOY_REGISTRY, else params deploy.registry)")
    parser.add_argument(
        "--host", action="append", help="Ollama host, repeatable (default: OLLAMA_HOST, comma-separated, else params)"
    )
    args = parser.parse_args(argv)

    params = load_params(args.params)
    settings = resolve_settings(params.deploy, os.environ, args.registry, args.host)
    if args.list:
        print(format_versions(deployable_versions(settings)))
        return
    with tempfile.TemporaryDirectory(prefix="rollback-") as workdir:
        rollback(args.to, settings, Path(workdir), params.gate)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
