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
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.cases import Case, load_cases
from pipeline.common import PipelineError, get_logger, run_cli
from pipeline.model_names import LATEST, check_version_tag
from pipeline.modelfile_parser import Modelfile, load_modelfile
from pipeline.ollama_client import OllamaClient, file_sha256
from pipeline.params import GateParams, load_params
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
    resolve_settings,
)
from pipeline.verdict import VERDICT, Verdict, judge_keywords, load_verdict, sampling_options

log = get_logger("deploy")

CASES = Path("data/gate_cases.jsonl")


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
    unknown = [c.id for c in verdict.cases if c.id not in cases]
    if unknown:
        raise PipelineError(f"{verdict_path}: cases {unknown} are not in {cases_path}; rerun the gate")
    return Release(modelfile_path, modelfile, gguf, digest, verdict, cases)


# --- the served check ---


# Sampler settings where Ollama's defaults differ from llama.cpp's (the gate's): Ollama penalises repeats
# (repeat_penalty 1.1) unless told otherwise, which changes greedy answers. The verdict's options win.
SERVED_CHECK_DEFAULTS = {"repeat_penalty": 1.0}


def served_options(verdict: Verdict, rules: GateParams) -> dict:
    """The verdict's greedy options over Ollama's differing defaults; a verdict without any (older) gets
    the gate's own."""
    return {**SERVED_CHECK_DEFAULTS, **(verdict.options or sampling_options(rules))}


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


# --- deploy ---


@dataclass(frozen=True)
class Installed:
    """What installing the release did on one host: whether the GGUF was sent, and the served check's
    per-case score differences from the gate."""

    uploaded: bool
    differences: list[str]


def install(client: OllamaClient, names: list[str], release: Release, rules: GateParams) -> Installed:
    """On one host: upload the GGUF if missing, create the first name, copy it to the others, check it served."""
    uploaded = client.upload_blob(release.gguf, release.gguf_digest)
    client.create(names[0], release.create_request())
    for name in names[1:]:
        client.copy(names[0], name)
    return Installed(uploaded, served_check(client, names[0], release, rules))


def check_tags_free(registry: RegistryClient, in_registry: dict[str, Manifest | None], created: str | None) -> None:
    """Version tags are immutable: a tag the registry has must already hold the model just created."""
    for tag, previous in in_registry.items():
        if previous is not None and previous.local_digest != created:
            raise PipelineError(
                f"{registry}: {tag} already holds another model ({previous.digest}); version tags are immutable, "
                "deploy this model under a new tag"
            )


def deploy(release: Release, tags: list[str], settings: Settings, rules: GateParams) -> Record:
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
    installed = {client.url: install(client, names, release, rules) for client in clients}
    primary = clients[0]
    check_tags_free(registry, in_registry, primary.local_digest(names[0]))
    manifest = push_and_verify(primary, registry, tags, release.gguf_digest, in_registry)
    latest_moved = move_latest(registry, clients, manifest, tags[0])

    local_changed = any(
        client.local_models().get(name) != local_before[client.url].get(name)
        for client in clients
        for name in [*names, repository.name(LATEST)]
    )
    uploaded = any(done.uploaded for done in installed.values())
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
                uploaded=installed[client.url].uploaded,
                served_check_differences=installed[client.url].differences,
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
        ", ".join(names),
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
