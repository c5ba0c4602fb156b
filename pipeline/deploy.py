"""Deploy the gated model to Ollama and the registry, then move `latest`.

    python -m pipeline.deploy --tag <git short sha> [--tag <git tag>]

Reads models/gate/verdict.json (refuses a model whose gate failed or is missing), the rendered
models/release/Modelfile and the GGUF its FROM names, data/gate_cases.jsonl, and params.yaml `deploy`.
The Ollama hosts come from `deploy.hosts`, overridden by OLLAMA_HOST (comma-separated: the rig and the
workstation) and then by --host; the registry from `deploy.registry`, DEPLOY_REGISTRY, then --registry.

For each Ollama host: check the version (the JSON /api/create API: 0.5.5+), upload the GGUF only if
the host lacks it, create `<registry>/<namespace>/<model>:<tag>` from the Modelfile, and run the
served check: the gate's cases through /api/chat with the gate's greedy options must reach the gate's
verdict (which proves Ollama applies the TEMPLATE the model was trained with). Then push the version
tags from the first host and verify them through the registry's own API (the manifest is the one
Ollama created, every blob is there with its digest, the model layer is our GGUF). Only then does
`latest` move, in the registry and on every host. Any failure leaves `latest` where it was.
Deploying the same model again uploads nothing and changes nothing. Every run appends a record to
`deploy.records` (deployments/records.jsonl) for CI to keep and `pipeline.rollback --list` to show.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.cases import Case, load_cases
from pipeline.common import PipelineError, get_logger, run_cli, write_text_atomic
from pipeline.http_retry import RetryPolicy
from pipeline.model_names import LATEST, Repository, check_name_part, check_version_tag
from pipeline.modelfile_parser import Modelfile, load_modelfile
from pipeline.ollama_client import OllamaClient, file_sha256
from pipeline.params import DeployParams, GateParams, load_params
from pipeline.registry_client import MODEL_LAYER, Manifest, RegistryClient
from pipeline.verdict import VERDICT, Verdict, judge_keywords, load_verdict

log = get_logger("deploy")

MODELFILE = Path("models/release/Modelfile")
CASES = Path("data/gate_cases.jsonl")


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
    env_hosts = [h.strip() for h in environ.get("OLLAMA_HOST", "").split(",") if h.strip()]
    registry = registry or environ.get("DEPLOY_REGISTRY") or params.registry
    check_name_part("registry", registry)
    return Settings(
        repository=Repository(registry, params.namespace, params.model),
        hosts=tuple(hosts or env_hosts or params.hosts),
        insecure=params.insecure,
        retry=RetryPolicy(params.retries, params.backoff_s, params.timeout_s),
        records=Path(params.records),
    )


# --- what ships: the verdict, the Modelfile, its GGUF, the gate's cases ---


@dataclass(frozen=True)
class Release:
    modelfile_path: Path
    modelfile: Modelfile
    gguf: Path
    gguf_digest: str
    verdict: Verdict
    cases: dict[str, Case]

    def create_request(self) -> dict:
        """POST /api/create fields besides the name: the uploaded GGUF by digest, then the Modelfile's."""
        return {"files": {self.gguf.name: self.gguf_digest}, **self.modelfile.create_request()}


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
    unknown = [c.id for c in verdict.cases if c.id not in cases]
    if unknown:
        raise PipelineError(f"{verdict_path}: cases {unknown} are not in {cases_path}; rerun the gate")
    return Release(modelfile_path, modelfile, gguf, digest, verdict, cases)


# --- the served check ---


def served_options(verdict: Verdict, rules: GateParams) -> dict:
    """The verdict's greedy options; a verdict without any (older) gets the gate's, with Ollama's
    repeat_penalty 1.1 turned off: it changes greedy answers."""
    return verdict.options or {
        "temperature": 0,
        "top_k": 1,
        "seed": rules.seed,
        "num_predict": rules.max_new_tokens,
        "repeat_penalty": 1.0,
    }


def served_check(client: OllamaClient, name: str, release: Release, rules: GateParams) -> list[str]:
    """Send the gate's cases to `name` on this host and judge Ollama's answers as the gate judged llama.cpp's.
    A PipelineError unless the verdict is the same (passed); returns the per-case score differences.
    Ollama gives no likelihoods, so unstable cases (decided by likelihood in the gate) keep the gate's score."""
    verdict_cases = release.verdict.cases
    if not verdict_cases:
        raise PipelineError("the gate verdict lists no cases: nothing to check the served model against")
    options = served_options(release.verdict, rules)
    cases = [release.cases[c.id] for c in verdict_cases]
    before = {c.id: c.before for c in verdict_cases}
    after: dict[str, float] = {}
    forbidden: dict[str, tuple[str, ...]] = {}
    differences = []
    for gate_case, case in zip(verdict_cases, cases, strict=True):
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
    merged = {c.id: c.merged for c in verdict_cases}
    reasons = judge_keywords(cases, before, after, rules, forbidden, merged)
    if reasons:
        raise PipelineError(
            f"served check on {client}: {name} fails the gate that the GGUF passed in llama.cpp, so Ollama does not "
            f"prompt it as it was trained (TEMPLATE?): {'; '.join(reasons)}. Per case: {'; '.join(differences)}"
        )
    for difference in differences:
        log.warning("served check on %s: score differs from the gate's: %s", client, difference)
    log.info("served check on %s: %d cases, same verdict as the gate (passed)", client, len(cases))
    return differences


# --- registry verification ---


def verify_pushed(registry: RegistryClient, primary: OllamaClient, tags: list[str], release: Release) -> Manifest:
    """Each version tag in the registry holds the manifest Ollama created, every blob is there with its
    digest, and the model layer is our GGUF where Ollama stores it as uploaded."""
    manifests = []
    for tag in tags:
        name = registry.repository.name(tag)
        manifest = registry.manifest(tag)
        if manifest is None:
            raise PipelineError(f"{registry}: {tag} is missing after the push")
        local = primary.local_digest(name)
        if manifest.local_digest != local:
            raise PipelineError(
                f"{registry}: {tag} is {manifest.digest}, not the manifest {primary} created for {name} "
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
    if primary.stores_gguf_as_uploaded and model.digest != release.gguf_digest:
        raise PipelineError(
            f"{registry}: the model layer of {tags[0]} is {model.digest}, not our GGUF {release.gguf_digest}"
        )
    if model.digest != release.gguf_digest:
        log.info("%s rewrote the GGUF on import (0.30+): model layer %s", primary, model.digest)
    return manifest


# --- records ---


def commit_of() -> str | None:
    if os.environ.get("CI_COMMIT_SHA"):
        return os.environ["CI_COMMIT_SHA"]
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line (the file is rewritten atomically, so a crash never leaves half a line)."""
    previous = path.read_text(encoding="utf-8") if path.is_file() else ""
    if previous and not previous.endswith("\n"):
        previous += "\n"
    write_text_atomic(path, previous + json.dumps(record, sort_keys=True) + "\n")


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as error:
            raise PipelineError(f"{path}:{number}: not a JSON record: {error}") from None
    return records


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


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


# --- deploy ---


def deploy(release: Release, tags: list[str], settings: Settings, rules: GateParams) -> dict:
    """Ship `release` under the version `tags`, then move latest; returns the deployment record."""
    tags = list(dict.fromkeys(check_version_tag(tag) for tag in tags))
    if not tags:
        raise PipelineError("no tag given: deploy needs at least one version tag (--tag <git short sha>)")
    repository = settings.repository
    names = [repository.name(tag) for tag in tags]
    clients = [OllamaClient(host, settings.retry) for host in settings.hosts]
    registry = RegistryClient(repository, settings.insecure, settings.retry)
    for client in clients:
        client.check_version()

    in_registry = {tag: registry.manifest(tag) for tag in tags}
    local_before = {client.url: client.local_models() for client in clients}
    request = release.create_request()
    uploaded, differences = {}, {}
    for client in clients:
        uploaded[client.url] = client.upload_blob(release.gguf, release.gguf_digest)
        client.create(names[0], request)
        for name in names[1:]:
            client.copy(names[0], name)
        differences[client.url] = served_check(client, names[0], release, rules)

    primary = clients[0]
    created = primary.local_digest(names[0])
    for tag in tags:
        previous = in_registry[tag]
        if previous is not None and previous.local_digest != created:
            raise PipelineError(
                f"{registry}: {tag} already holds another model ({previous.digest}); version tags are immutable, "
                "deploy this model under a new tag"
            )
    for tag, name in zip(tags, names, strict=True):
        if in_registry[tag] is None:
            try:
                primary.push(name, settings.insecure)
            except PipelineError as error:
                raise PipelineError(f"{error}; the registry {registry.health()}") from None
        else:
            log.info("%s: %s is already there, same manifest: not pushed again", registry, tag)
    manifest = verify_pushed(registry, primary, tags, release)
    latest_moved = move_latest(registry, clients, manifest, tags[0])

    local_changed = any(
        client.local_models().get(name) != local_before[client.url].get(name)
        for client in clients
        for name in [*names, repository.name(LATEST)]
    )
    record = {
        "action": "deploy",
        "when": now(),
        "commit": commit_of(),
        "tags": tags,
        "registry": repository.registry,
        "repository": repository.path,
        "manifest_digest": manifest.digest,
        "model_digest": manifest.layer(MODEL_LAYER).digest,
        "gguf": str(release.gguf.name),
        "gguf_sha256": release.gguf_digest,
        "layers": {layer.media_type: layer.digest for layer in manifest.blobs},
        "hosts": [
            {
                "url": client.url,
                "version": ".".join(map(str, client.version or ())),
                "uploaded": uploaded[client.url],
                "served_check_differences": differences[client.url],
            }
            for client in clients
        ],
        "latest": tags[0],
        "changed": latest_moved or local_changed or any(uploaded.values()) or None in in_registry.values(),
    }
    append_record(settings.records, record)
    log.info(
        "deployed %s as %s (manifest %s); latest -> %s%s",
        release.gguf.name,
        ", ".join(names),
        manifest.digest[:19],
        tags[0],
        "" if record["changed"] else " (already deployed: nothing changed)",
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
    parser.add_argument("--registry", help="registry host:port (default: DEPLOY_REGISTRY, else params deploy.registry)")
    parser.add_argument(
        "--host", action="append", help="Ollama host, repeatable (default: OLLAMA_HOST, comma-separated, else params)"
    )
    args = parser.parse_args(argv)

    params = load_params(args.params)
    settings = resolve_settings(params.deploy, os.environ, args.registry, args.host)
    for tag in args.tag:  # names are checked before anything is read or sent
        settings.repository.name(check_version_tag(tag))
    release = load_release(args.modelfile, args.verdict, args.cases)
    deploy(release, args.tag, settings, params.gate)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
