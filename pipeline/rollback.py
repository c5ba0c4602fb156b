"""Roll back: make a tagged model version live again, without retraining.

    python -m pipeline.rollback --to <tag>
    python -m pipeline.rollback --list

--to takes, per Ollama host, the fastest path that works:
1. the host still has `<registry>/<namespace>/<model>:<tag>`: copy it to `:latest` (/api/copy);
2. else the registry has the tag: our own client fetches its blobs (sha256-checked) and the model is
   created again from them (Ollama's own pull from a plain registry:2 fails: it wants a redirect on blob
   GETs that the filesystem storage does not send);
3. else DVC has it at the git revision `<tag>` (a git tag or commit): models/release/Modelfile and its
   GGUF are read with DVC (from the remote if needed), the model is created and the tag pushed.
In the registry, `latest` is re-pointed at the tag's manifest (same bytes, no re-upload). Everything is
resolved before anything changes: an unknown tag is one clear error, and nothing moves.

--list shows the deployable versions: the registry's tags (with `latest` marked) and the deployment
records (deploy.records: when, from which commit).
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

from pipeline.common import PipelineError, get_logger, run_cli
from pipeline.model_names import LATEST, check_version_tag
from pipeline.modelfile_parser import load_modelfile
from pipeline.ollama_client import OllamaClient, file_sha256
from pipeline.params import load_params
from pipeline.registry_client import MODEL_LAYER, Manifest, RegistryClient
from pipeline.release import (
    MODELFILE,
    HostRecord,
    Record,
    Settings,
    append_record,
    commit_of,
    create_request,
    move_latest,
    now,
    push_and_verify,
    read_records,
    resolve_settings,
)
from pipeline.verdict import VERDICT, load_verdict

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


@dataclass
class Source:
    """Where the tag's model comes from for the hosts that lack it."""

    manifest: Manifest | None  # the registry's, if it has the tag
    dvc_release: Path | None = None  # a directory with the release files read from DVC


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


def read_release_from_dvc(tag: str, workdir: Path) -> Path:
    """models/release/Modelfile, its GGUF and the gate verdict at git revision `tag`, read through DVC."""
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

    load_verdict(get(VERDICT))
    modelfile = load_modelfile(get(MODELFILE))
    get(Path(os.path.normpath(MODELFILE.parent / modelfile.from_)))
    return root


def resolve_source(tag: str, registry: RegistryClient, lacking: list[OllamaClient], workdir: Path) -> Source:
    manifest = registry.manifest(tag)
    if manifest is not None or not lacking:
        return Source(manifest)
    try:
        return Source(None, read_release_from_dvc(tag, workdir))
    except PipelineError as dvc_error:
        known = [t for t in registry.tags() if t != LATEST]
        raise PipelineError(
            f"unknown tag {tag!r}: no Ollama host has {registry.repository.name(tag)}, the registry has no such tag "
            f"(it has: {', '.join(known) or 'none'}), and {dvc_error}. Nothing was changed"
        ) from None


def rollback(tag: str, settings: Settings, workdir: Path) -> Record:
    check_version_tag(tag)
    repository = settings.repository
    name = repository.name(tag)
    clients = [OllamaClient(host, settings.retry) for host in settings.hosts]
    registry = RegistryClient(repository, settings.insecure, settings.retry)
    for client in clients:
        client.check_version()
    lacking = [client for client in clients if client.local_digest(name) is None]
    source = resolve_source(tag, registry, lacking, workdir)

    paths = {client.url: PATHS[0] for client in clients}
    dvc_gguf_digest = None
    if lacking and source.manifest is not None:
        request, gguf = create_request_from_registry(registry, source.manifest, workdir)
        for client in lacking:
            client.upload_blob(gguf, request["files"][gguf.name])
            client.create(name, request)
            paths[client.url] = PATHS[1]
    elif lacking:
        modelfile_path = source.dvc_release / MODELFILE
        modelfile = load_modelfile(modelfile_path)
        gguf = (modelfile_path.parent / modelfile.from_).resolve()
        dvc_gguf_digest = file_sha256(gguf)
        request = create_request(gguf, dvc_gguf_digest, modelfile)
        for client in lacking:
            client.upload_blob(gguf, dvc_gguf_digest)
            client.create(name, request)
            paths[client.url] = PATHS[2]
    for client in clients:
        client.load(name)  # it runs here before it goes live

    manifest = source.manifest
    if manifest is None:  # from DVC, or only the hosts have it: the registry gets the version tag first
        manifest = push_and_verify(clients[0], registry, [tag], dvc_gguf_digest)
    else:
        for blob in manifest.blobs:
            registry.check_blob(blob, download=False)
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
    """Registry tags and recorded deployments, one row per tag, newest record last."""
    registry = RegistryClient(settings.repository, settings.insecure, settings.retry)
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
    for record in read_records(settings.records):
        if record.action != "deploy" or record.repository != settings.repository.path:
            continue
        for tag in record.tags:
            row = rows.setdefault(
                tag, {"tag": tag, "manifest_digest": record.manifest_digest, "in_registry": False, "latest": False}
            )
            row["deployed"], row["commit"] = record.when, record.commit
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

    settings = resolve_settings(load_params(args.params).deploy, os.environ, args.registry, args.host)
    if args.list:
        print(format_versions(deployable_versions(settings)))
        return
    with tempfile.TemporaryDirectory(prefix="rollback-") as workdir:
        rollback(args.to, settings, Path(workdir))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
