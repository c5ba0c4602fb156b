"""Retention: which model versions stay in the registry and on the Ollama hosts; the rest is removed.

    python -m pipeline.retention [registry] [--apply] [--plan-out retention-plan.json]
    python -m pipeline.retention hosts [--apply]
    python -m pipeline.retention gc --config CONFIG [--apply]       (on the NAS, registry read-only)

Every command is a dry run unless --apply: it prints the plan and changes nothing.

registry: every tag of `<namespace>/<model>` with its size and why it is kept or deleted. Kept: `latest`
and the version it points to; the newest `deploy.keep_versions` versions (by when deploy kept their
release note); every version a git tag `model-v*` names (as a registry tag, or by its commit); every
version deployed or rolled back to in the last `deploy.keep_days` days (release notes and
deploy.records). A version is a manifest: tags that hold the same manifest are kept or deleted together,
since the registry deletes by digest, with every tag on it. The rest is deleted by digest, with its
release note (`<model>-releases:<tag>`), and leaves a mark `<model>-retired:<tag>` so that rollback says
it was removed by retention. Release notes whose version is gone are deleted too. The registry needs
`storage.delete.enabled` (the doctor checks it).

hosts: per Ollama host, the names `<registry>/<namespace>/<model>:<tag>` it has: kept are `latest`, the
current version (what latest holds) and the previous one (what latest held before, per the release notes
and deploy.records); the rest is deleted through /api/delete (Ollama removes blobs no name uses).

gc: deleting manifests frees no disk space; the registry's `garbage-collect --delete-untagged` run does,
and it must not race a push: run it with the registry read-only or stopped (checked: a blob upload must be
refused). Reports the bytes under the storage directory before and after. See README "Retention".
Settings as for pipeline.deploy: params.yaml `deploy`, OLLAMA_HOST, DEPLOY_REGISTRY, --host, --registry.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests
import yaml

from pipeline.common import PipelineError, get_logger, run_cli, write_text_atomic
from pipeline.model_names import LATEST, RESERVED, Repository
from pipeline.ollama_client import LocalModel, OllamaClient
from pipeline.params import DeployParams, load_params
from pipeline.registry_client import MANIFEST_V2, PROBE_DIGEST, RegistryClient
from pipeline.release import (
    Record,
    ReleaseNote,
    Retired,
    Settings,
    read_records,
    release_notes,
    releases_client,
    resolve_settings,
    write_retired,
)

log = get_logger("retention")

GIT_TAG_PATTERN = "model-v*"
PLAN = Path("retention-plan.json")


# --- the plan: pure, from what the registry, git and the records say ---


@dataclass(frozen=True)
class Version:
    """A version tag in the registry: its manifest, the bytes of its blobs, and its release note's facts."""

    tag: str
    digest: str
    size: int
    blobs: Mapping[str, int]  # blob digest -> size
    deployed: str | None = None  # when deploy kept its release note (UTC, ISO 8601)
    commit: str | None = None


@dataclass(frozen=True)
class Decision:
    tag: str
    digest: str
    size: int
    keep: bool
    why: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    repository: str
    decisions: tuple[Decision, ...]
    orphan_notes: tuple[str, ...] = ()  # release notes of tags the registry no longer has: deleted
    freed_bytes: int = 0  # blobs only deleted versions use: what garbage-collect frees at most

    @property
    def deleted(self) -> dict[str, list[str]]:
        """Manifest digest -> its tags, for every version to delete."""
        found: dict[str, list[str]] = {}
        for decision in self.decisions:
            if not decision.keep:
                found.setdefault(decision.digest, []).append(decision.tag)
        return found

    def to_json(self) -> dict:
        return {
            "repository": self.repository,
            "versions": [asdict(decision) for decision in self.decisions],
            "orphan_notes": list(self.orphan_notes),
            "freed_bytes": self.freed_bytes,
        }

    def format(self) -> str:
        lines = [f"retention plan for {self.repository}:", f"  {'tag':<24} {'manifest':<19} {'size':>12}  action"]
        for d in self.decisions:
            action = "keep" if d.keep else "DELETE"
            lines.append(f"  {d.tag:<24} {d.digest[:19]:<19} {d.size:>12,}  {action}: {'; '.join(d.why)}")
        for tag in self.orphan_notes:
            gone = "DELETE: release note of a version no longer in the registry"
            lines.append(f"  {tag:<24} {'-':<19} {'-':>12}  {gone}")
        kept = sum(1 for d in self.decisions if d.keep)
        lines.append(
            f"  {kept} kept, {len(self.decisions) - kept} deleted ({len(self.deleted)} manifests); "
            f"garbage-collect frees up to {self.freed_bytes:,} bytes of blobs"
        )
        return "\n".join(lines)


def _day_cutoff(now: datetime.datetime, keep_days: int) -> str:
    return (now - datetime.timedelta(days=keep_days)).isoformat(timespec="seconds")


def _commit_matches(tag_or_commit: str | None, commit: str) -> bool:
    """A registry tag (deploy's git short SHA) or a full commit naming `commit`."""
    return bool(tag_or_commit) and len(tag_or_commit) >= 7 and commit.startswith(tag_or_commit)


def plan_registry(
    repository: str,
    versions: Iterable[Version],
    latest: Version | None,
    keep_versions: int,
    keep_days: int,
    git_tags: Mapping[str, str],
    records: Iterable[Record],
    now: datetime.datetime,
    noted: Iterable[str] = (),
) -> Plan:
    """Keep or delete each version tag (see the module's doc). `latest`: what the tag `latest` holds;
    `git_tags`: git tag name -> commit; `noted`: the tags that have a release note."""
    versions = sorted(versions, key=lambda v: v.tag)
    live = latest.digest if latest else None
    reasons: dict[str, list[str]] = {v.tag: [] for v in versions}
    by_digest: dict[str, list[Version]] = {}
    for version in versions:
        by_digest.setdefault(version.digest, []).append(version)

    for version in versions:
        if version.digest == live:
            reasons[version.tag].append("latest points to it")
        for name, commit in sorted(git_tags.items()):
            if version.tag == name:
                reasons[version.tag].append(f"git tag {name}")
            elif _commit_matches(version.tag, commit) or _commit_matches(version.commit, commit):
                reasons[version.tag].append(f"the commit of git tag {name}")

    # newest versions: a manifest counts once, dated by the newest release note of its tags
    def deployed(digest: str) -> str:
        return max((v.deployed or "" for v in by_digest[digest]), default="")

    newest = sorted(by_digest, key=lambda d: (deployed(d), d), reverse=True)[:keep_versions]
    for rank, digest in enumerate(newest, 1):
        for version in by_digest[digest]:
            reasons[version.tag].append(f"newest {rank} of keep_versions {keep_versions}")

    cutoff = _day_cutoff(now, keep_days) if keep_days > 0 else "9"  # keep_days 0: no version kept by date
    for version in versions:
        if version.deployed and version.deployed >= cutoff:
            reasons[version.tag].append(f"deployed {version.deployed} (within keep_days {keep_days})")
    for record in records:
        if record.when < cutoff or record.repository != repository:
            continue
        for version in versions:
            if version.tag in record.tags or version.digest == record.manifest_digest:
                why = f"{record.action} {record.when} in deploy.records (within keep_days {keep_days})"
                if why not in reasons[version.tag]:
                    reasons[version.tag].append(why)

    kept_digests = {v.digest for v in versions if reasons[v.tag]}
    decisions = []
    for version in versions:
        why = list(dict.fromkeys(reasons[version.tag]))
        keep = version.digest in kept_digests
        if keep and not why:
            holders = [v.tag for v in by_digest[version.digest] if reasons[v.tag]]
            why = [f"same manifest as kept {', '.join(holders)}"]
        elif not keep:
            why = [
                f"not among the newest {keep_versions}, no git tag, latest elsewhere, "
                f"not deployed in the last {keep_days} days"
            ]
        decisions.append(Decision(version.tag, version.digest, version.size, keep, tuple(why)))
    if latest is not None:
        decisions.append(Decision(LATEST, latest.digest, latest.size, True, ("the live tag",)))

    kept_blobs = {blob for v in versions if v.digest in kept_digests for blob in v.blobs}
    freed = {blob: size for v in versions if v.digest not in kept_digests for blob, size in v.blobs.items()}
    freed_bytes = sum(size for blob, size in freed.items() if blob not in kept_blobs)
    present = {v.tag for v in versions}
    orphans = tuple(sorted(set(noted) - present))
    return Plan(repository, tuple(decisions), orphans, freed_bytes)


@dataclass(frozen=True)
class HostDecision:
    name: str
    keep: bool
    why: str


@dataclass(frozen=True)
class HostPlan:
    host: str
    decisions: tuple[HostDecision, ...]

    def to_json(self) -> dict:
        return {"host": self.host, "models": [asdict(d) for d in self.decisions]}

    def format(self) -> str:
        lines = [f"retention plan for {self.host}:"]
        lines += [f"  {d.name:<60} {'keep' if d.keep else 'DELETE'}: {d.why}" for d in self.decisions]
        return "\n".join(lines)


def latest_history(notes: Iterable[ReleaseNote], records: Iterable[Record], repository: str) -> list[str]:
    """The tags `latest` was moved to, oldest first: each deploy (its release note, or its record) and each
    rollback (its record)."""
    moves = [(note.when, note.tag) for note in notes]
    moves += [(record.when, record.latest) for record in records if record.repository == repository]
    return [tag for _, tag in sorted(set(moves))]


def plan_host(host: str, local: Mapping[str, LocalModel], repository: Repository, history: list[str]) -> HostPlan:
    """Keep latest, the current version (the tags holding what latest holds) and the previous one (the last
    tag latest held before, per `history`); delete every other version tag of this repository."""
    prefix = f"{repository.registry}/{repository.path}:"
    ours = {name.removeprefix(prefix): model for name, model in local.items() if name.startswith(prefix)}
    live = ours.get(LATEST)
    current = {tag for tag, model in ours.items() if live is not None and model.digest == live.digest} - {LATEST}
    if not current and history:
        current = {history[-1]}

    def held_by_latest(tag: str) -> bool:
        return tag in current or (live is not None and tag in ours and ours[tag].digest == live.digest)

    previous = next((tag for tag in reversed(history) if not held_by_latest(tag)), None)
    decisions = []
    for tag in sorted(ours):
        name = prefix + tag
        if tag in RESERVED:
            why = "the live tag" if tag == LATEST else "deploy's own name (a deploy may be running)"
            decisions.append(HostDecision(name, True, why))
        elif tag in current:
            decisions.append(HostDecision(name, True, "the current version (latest holds it)"))
        elif tag == previous or (previous in ours and ours[tag].digest == ours[previous].digest):
            decisions.append(HostDecision(name, True, f"the previous version ({previous})"))
        else:
            decisions.append(HostDecision(name, False, "neither latest, the current nor the previous version"))
    return HostPlan(host, tuple(decisions))


# --- reading the registry and git ---


def registry_versions(
    registry: RegistryClient, notes: Mapping[str, ReleaseNote]
) -> tuple[list[Version], Version | None]:
    """Every version tag with its manifest and release note, and what `latest` holds."""
    versions, latest = [], None
    for tag in registry.tags():
        manifest = registry.manifest(tag)
        if manifest is None:  # deleted meanwhile
            continue
        blobs = {blob.digest: blob.size for blob in manifest.blobs}
        note = notes.get(tag)
        version = Version(
            tag, manifest.digest, sum(blobs.values()), blobs, note.when if note else None, note.commit if note else None
        )
        if tag == LATEST:
            latest = version
        else:
            versions.append(version)
    return versions, latest


def git_model_tags(pattern: str = GIT_TAG_PATTERN) -> dict[str, str]:
    """git tag name -> the commit it names (annotated tags peeled), for tags matching `pattern`."""
    command = ["git", "for-each-ref", f"refs/tags/{pattern}", "--format=%(refname:short) %(objectname) %(*objectname)"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        raise PipelineError(f"cannot list the git tags {pattern} (retention keeps what they name): {error}") from None
    tags = {}
    for line in result.stdout.splitlines():
        name, obj, *peeled = line.split()
        tags[name] = peeled[0] if peeled else obj
    return tags


def now_utc() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def registry_plan(settings: Settings, params: DeployParams, git_tags: Mapping[str, str]) -> Plan:
    _, registry = settings.clients()
    notes = {note.tag: note for note in release_notes(registry)}
    noted = releases_client(registry).tags()
    versions, latest = registry_versions(registry, notes)
    return plan_registry(
        settings.repository.path,
        versions,
        latest,
        params.keep_versions,
        params.keep_days,
        git_tags,
        read_records(settings.records),
        now_utc(),
        noted,
    )


# --- acting on a plan ---


def apply_registry_plan(settings: Settings, plan: Plan) -> list[str]:
    """Delete what the plan deletes; returns the tags deleted. Before each delete the registry is read
    again: a manifest `latest` now holds, or that a tag outside the plan now holds, is left alone."""
    _, registry = settings.clients()
    notes = releases_client(registry)
    registry.delete_manifest(PROBE_DIGEST)  # deletes enabled? one clear error before anything changes
    deleted = []
    for digest, tags in plan.deleted.items():
        holders = {tag for tag in registry.tags() if (m := registry.manifest(tag)) and m.digest == digest}
        if not holders <= set(tags):
            log.warning("%s: %s is now also %s: not deleted", registry, digest[:19], ", ".join(sorted(holders)))
            continue
        why = next(d.why for d in plan.decisions if d.digest == digest)
        for tag in tags:  # the mark first: rollback explains a missing tag even if this run stops half-way
            write_retired(registry, Retired(tag, digest, now_utc().isoformat(timespec="seconds"), "; ".join(why)))
        registry.delete_manifest(digest)
        for tag in tags:
            note = notes.manifest(tag)
            if note is not None:
                notes.delete_manifest(note.digest)
        log.info("%s: deleted %s (%s) and its release note", registry, ", ".join(tags), digest[:19])
        deleted += tags
    present = set(registry.tags())
    for tag in plan.orphan_notes:
        note = notes.manifest(tag)
        if tag not in present and note is not None:
            notes.delete_manifest(note.digest)
            log.info("%s: deleted the release note of %s (its version is gone)", notes, tag)
    return deleted


def host_plans(settings: Settings) -> list[HostPlan]:
    clients, registry = settings.clients()
    history = latest_history(release_notes(registry), read_records(settings.records), settings.repository.path)
    return [plan_host(client.url, client.local_models(), settings.repository, history) for client in clients]


def apply_host_plan(client: OllamaClient, plan: HostPlan) -> list[str]:
    deleted = []
    for decision in plan.decisions:
        if not decision.keep:
            client.delete(decision.name)
            deleted.append(decision.name)
    log.info("%s: deleted %d name(s)", client, len(deleted))
    return deleted


# --- garbage collection on the NAS ---


@dataclass(frozen=True)
class DiskUsage:
    files: int
    bytes: int  # the files' sizes
    on_disk: int  # blocks allocated (what `du` counts)


def disk_usage(root: Path) -> DiskUsage:
    files = size = blocks = 0
    for directory, _, names in os.walk(root):
        for name in names:
            status = os.lstat(os.path.join(directory, name))
            files, size, blocks = files + 1, size + status.st_size, blocks + status.st_blocks * 512
    return DiskUsage(files, size, blocks)


@dataclass(frozen=True)
class RegistryConfig:
    path: Path
    storage: Path
    address: str | None  # host:port the registry listens on


def read_registry_config(path: Path) -> RegistryConfig:
    """The storage directory and address of a registry config.yml; one clear error naming the field."""
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise PipelineError(f"{path}: cannot read the registry config: {error}") from None
    if not isinstance(config, dict):
        raise PipelineError(f"{path}: not a registry config (a YAML mapping)")
    storage = (config.get("storage") or {}).get("filesystem") or {}
    root = storage.get("rootdirectory") if isinstance(storage, dict) else None
    if not isinstance(root, str):
        raise PipelineError(
            f"{path}: storage.filesystem.rootdirectory: missing (gc measures the filesystem storage; pass --storage)"
        )
    address = (config.get("http") or {}).get("addr")
    if isinstance(address, str) and address.startswith(":"):
        address = "127.0.0.1" + address
    return RegistryConfig(path, Path(root), address if isinstance(address, str) else None)


def check_not_writable(url: str) -> str:
    """The registry at `url` must accept no push while garbage-collect runs: read-only mode answers 405 to
    any write, a stopped one does not answer. The probe is a manifest PUT of `{}`, which a writable registry
    rejects as invalid (400) without storing anything. Returns how the registry stands."""
    probe = f"{url.rstrip('/')}/v2/retention-probe/gc/manifests/probe"
    try:
        response = requests.put(probe, data=b"{}", headers={"Content-Type": MANIFEST_V2}, timeout=10)
    except requests.ConnectionError:
        return "stopped"
    if response.status_code != 405:
        raise PipelineError(
            f"{url} accepts pushes (a manifest PUT answers HTTP {response.status_code}, not 405): garbage-collect "
            "would race them and lose blobs. Restart the registry read-only "
            "(REGISTRY_STORAGE_MAINTENANCE_READONLY='{\"enabled\":true}', or storage: maintenance: readonly: "
            "enabled: true in its config.yml) or stop it, then run gc again"
        )
    return f"read-only (a manifest PUT answers HTTP {response.status_code})"


@dataclass(frozen=True)
class GcReport:
    before: DiskUsage
    after: DiskUsage
    registry: str
    output: str

    def format(self) -> str:
        before, after = self.before, self.after
        return (
            f"registry {self.registry}; storage before: {before.on_disk:,} bytes on disk ({before.files} files, "
            f"{before.bytes:,} bytes), after: {after.on_disk:,} bytes on disk ({after.files} files, "
            f"{after.bytes:,} bytes); freed {before.on_disk - after.on_disk:,} bytes on disk"
        )


def garbage_collect(config: str, storage: Path, command: list[str], url: str | None, apply: bool) -> GcReport:
    """`<command> garbage-collect --delete-untagged <config>` (with --dry-run unless `apply`), the registry
    at `url` checked read-only or stopped first, the storage directory measured before and after."""
    if not storage.is_dir():
        raise PipelineError(f"{storage}: the registry's storage directory does not exist")
    state = check_not_writable(url) if url else "not checked (no address: make sure it is read-only or stopped)"
    before = disk_usage(storage)
    run = [*command, "garbage-collect", "--delete-untagged", *([] if apply else ["--dry-run"]), config]
    log.info("%s", shlex.join(run))
    try:
        result = subprocess.run(run, capture_output=True, text=True)
    except OSError as error:
        raise PipelineError(f"{shlex.join(run)}: {error}") from None
    if result.returncode != 0:
        raise PipelineError(f"{shlex.join(run)} failed ({result.returncode}): {result.stderr.strip()[-1500:]}")
    return GcReport(before, disk_usage(storage), state, result.stdout + result.stderr)


# --- command line ---


@dataclass
class Outcome:
    """What one run planned and did, for the log and the plan artifact."""

    apply: bool
    plans: list[dict] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.retention", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", nargs="?", default="registry", choices=("registry", "hosts", "gc"))
    parser.add_argument("--apply", action="store_true", help="act on the plan (default: a dry run)")
    parser.add_argument("--plan-out", type=Path, default=PLAN, help="the plan as JSON (default: %(default)s)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--registry", help="registry host:port (default: DEPLOY_REGISTRY, else params deploy.registry)")
    parser.add_argument(
        "--host", action="append", help="Ollama host, repeatable (default: OLLAMA_HOST, comma-separated, else params)"
    )
    gc = parser.add_argument_group("gc (on the NAS)")
    gc.add_argument("--config", help="the registry's config.yml, as the registry command sees it")
    gc.add_argument("--storage", type=Path, help="its storage directory here (default: the config's rootdirectory)")
    gc.add_argument(
        "--registry-command",
        default="docker-registry",
        help="how to run the registry binary (default: %(default)s; a container: 'docker exec registry registry')",
    )
    gc.add_argument("--url", help="the registry's URL, checked read-only (default: http://<the config's http.addr>)")
    args = parser.parse_args(argv)

    if args.what == "gc":
        if not args.config:
            parser.error("gc needs --config")
        url = args.url
        storage = args.storage
        if storage is None or url is None:
            config = read_registry_config(Path(args.config))
            storage = storage or config.storage
            url = url or (f"http://{config.address}" if config.address else None)
        report = garbage_collect(args.config, storage, shlex.split(args.registry_command), url, args.apply)
        print(report.output.strip()[-4000:])
        print(("" if args.apply else "dry run: ") + report.format())
        return

    params = load_params(args.params)
    settings = resolve_settings(params.deploy, os.environ, args.registry, args.host)
    outcome = Outcome(args.apply)

    def keep_outcome() -> None:  # the plan is kept before anything is deleted, and again with what was
        write_text_atomic(args.plan_out, json.dumps(asdict(outcome), indent=2, sort_keys=True) + "\n")

    if args.what == "registry":
        plan = registry_plan(settings, params.deploy, git_model_tags())
        print(plan.format())
        outcome.plans.append(plan.to_json())
        keep_outcome()
        if args.apply:
            outcome.deleted = apply_registry_plan(settings, plan)
    else:
        clients, _ = settings.clients()
        plans = host_plans(settings)
        for plan in plans:
            print(plan.format())
            outcome.plans.append(plan.to_json())
        keep_outcome()
        if args.apply:
            for client, plan in zip(clients, plans, strict=True):
                outcome.deleted += apply_host_plan(client, plan)
    keep_outcome()
    done = f"deleted {len(outcome.deleted)}" if args.apply else "dry run: nothing changed"
    print(f"{done}; plan: {args.plan_out}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
