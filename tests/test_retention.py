"""python -m pipeline.retention: the plan's rules (pure), then against a real registry (Debian's
docker-registry, deletes enabled) and a real Ollama: five versions deployed, the dry run changes nothing,
--apply keeps what the rules keep and deletes the rest with its release note, garbage-collect (with the
registry read-only) frees the deleted versions' own blobs on disk, every kept version still rolls back, a
deleted one is refused as removed by retention, and an Ollama host keeps latest, current and previous."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.common import PipelineError
from pipeline.deploy import deploy, load_release
from pipeline.model_names import Repository
from pipeline.ollama_client import LocalModel
from pipeline.params import DeployParams, GateParams
from pipeline.release import Record, read_retired, releases_client
from pipeline.retention import Version, plan_host, plan_registry
from pipeline.rollback import rollback
from tests.conftest import ROOT
from tests.servers import gate_answers, write_release
from tests.test_deploy import ollama_models, registry_manifest, registry_tags, settings_for

NOW = datetime.datetime(2026, 6, 30, 12, 0, tzinfo=datetime.UTC)
REPO = "tests/tiny"


def version(tag: str, digest: str, deployed: str | None, blobs: dict[str, int], commit: str | None = None) -> Version:
    return Version(tag, digest, sum(blobs.values()), blobs, deployed, commit)


def record(when: str, tags: list[str], digest: str, action: str = "deploy") -> Record:
    return Record(action, when, None, tags, "r:5000", REPO, digest, "sha256:m", tags[0], True)


# --- the plan's rules ---


def test_the_plan_keeps_newest_latest_git_tagged_and_recent_and_deletes_the_rest():
    versions = [
        version("v1", "sha256:d1", "2026-01-01T00:00:00+00:00", {"g1": 100, "t": 1}),
        version("model-v1", "sha256:d1", "2026-01-01T00:00:01+00:00", {"g1": 100, "t": 1}),  # same manifest
        version("v2", "sha256:d2", "2026-02-01T00:00:00+00:00", {"g2": 200, "t": 1}, commit="abcdef0123"),
        version("v3", "sha256:d3", "2026-03-01T00:00:00+00:00", {"g3": 300, "t": 1}),
        version("v4", "sha256:d4", "2026-04-01T00:00:00+00:00", {"g2": 200, "p4": 2, "t": 1}),  # v2's GGUF
        version("v5", "sha256:d5", "2026-05-01T00:00:00+00:00", {"g5": 500, "t": 1}),
        version("v6", "sha256:d6", "2026-06-22T00:00:00+00:00", {"g6": 600, "t": 1}),
        version("planted", "sha256:d7", None, {"g7": 700}),  # no release note
    ]
    git_tags = {"model-v1": "f" * 40, "model-v2": "abcdef0123" + "0" * 30}
    records = [
        record("2026-06-25T00:00:00+00:00", ["v3"], "sha256:d3", "rollback"),
        record("2026-01-02T00:00:00+00:00", ["v5"], "sha256:d5"),  # too old to count
    ]

    latest = version("latest", "sha256:d5", None, {"g5": 500, "t": 1})
    plan = plan_registry(REPO, versions, latest, 2, 10, git_tags, records, NOW, noted=["v1", "gone"])

    why = {d.tag: d.why for d in plan.decisions}
    kept = {d.tag for d in plan.decisions if d.keep}
    assert kept == {"latest", "v1", "model-v1", "v2", "v3", "v5", "v6"}
    assert why["model-v1"] == ("git tag model-v1",)
    assert why["v1"] == ("same manifest as kept model-v1",)
    assert why["v2"] == ("the commit of git tag model-v2",)
    assert why["v3"] == ("rollback 2026-06-25T00:00:00+00:00 in deploy.records (within keep_days 10)",)
    assert why["v5"] == ("latest points to it", "newest 2 of keep_versions 2")
    assert why["v6"] == ("newest 1 of keep_versions 2", "deployed 2026-06-22T00:00:00+00:00 (within keep_days 10)")
    assert plan.deleted == {"sha256:d4": ["v4"], "sha256:d7": ["planted"]}
    # v4's GGUF g2 stays (v2 uses it): garbage-collect frees only v4's params p4 and planted's g7
    assert plan.freed_bytes == 2 + 700
    assert plan.orphan_notes == ("gone",)
    assert [(d.tag, d.size, d.why) for d in plan.decisions if d.tag == "latest"] == [("latest", 501, ("the live tag",))]
    assert "planted" in plan.format() and "DELETE" in plan.format()


def test_the_host_plan_keeps_latest_current_and_previous():
    repository = Repository("r:5000", "tests", "tiny")
    prefix = "r:5000/tests/tiny:"
    local = {
        prefix + tag: LocalModel(prefix + tag, digest)
        for tag, digest in [("a", "1"), ("b", "2"), ("c", "3"), ("d", "4"), ("d-git", "4"), ("latest", "4")]
    }
    local["other/model:x"] = LocalModel("other/model:x", "9")  # not ours: never touched

    plan = plan_host("http://h:11434", local, repository, history=["a", "b", "c", "b", "d"])

    decisions = {d.name.removeprefix(prefix): d for d in plan.decisions}
    assert {tag for tag, d in decisions.items() if d.keep} == {"latest", "d", "d-git", "b"}
    assert decisions["b"].why == "the previous version (b)"
    assert {tag for tag, d in decisions.items() if not d.keep} == {"a", "c"}
    assert "other/model:x" not in {d.name for d in plan.decisions}


def test_keep_versions_must_be_positive(tmp_path):
    from pipeline.params import load_params

    params = tmp_path / "params.yaml"
    params.write_text("deploy:\n  keep_versions: 0\n")
    with pytest.raises(PipelineError, match=r"params.yaml:2: deploy.keep_versions: must be > 0"):
        load_params(params)
    assert DeployParams().keep_versions == 5 and DeployParams().keep_days == 30


# --- against the real registry and Ollama ---

TAGS = ("1111aaa", "2222bbb", "3333ccc", "4444ddd", "5555eee")
GIT_TAG = "model-v1"  # deployed with the first version, and a git tag in the project below
KEEP_VERSIONS = 2


@pytest.fixture(scope="module")
def five(stack, tiny_versions, tiny_merged, records, tmp_path_factory) -> dict[str, dict]:
    """Five versions deployed in order, latest the fifth. GGUFs: 1 and 4 the f16, 2 and 5 the q8_0 (each pair
    apart by a PARAMETER), 3 an f32 only it uses. Returns tag -> {manifest, model} digests."""
    from pipeline.convert import convert
    from pipeline.params import ConvertParams

    root = tmp_path_factory.mktemp("five")
    f32 = root / "model-f32.gguf"
    convert(tiny_merged, f32, ConvertParams(outtype="f32"))
    ggufs = {"f16": tiny_versions["v1"], "q8_0": tiny_versions["v2"]}
    sources = [
        (ggufs["f16"].gguf, ggufs["f16"].answers),
        (ggufs["q8_0"].gguf, ggufs["q8_0"].answers),
        (f32, gate_answers(f32)),
        (ggufs["f16"].gguf, ggufs["f16"].answers),
        (ggufs["q8_0"].gguf, ggufs["q8_0"].answers),
    ]
    deployed = {}
    for number, (tag, (gguf, answers)) in enumerate(zip(TAGS, sources, strict=True), 1):
        files = write_release(root / tag, gguf, answers)
        files.modelfile.write_text(files.modelfile.read_text().replace("num_predict 32", f"num_predict {30 + number}"))
        tags = [tag, GIT_TAG] if number == 1 else [tag]
        release = load_release(files.modelfile, files.verdict, files.cases)
        time.sleep(1.1)  # release notes are dated to the second: "newest" must be unambiguous
        result = deploy(release, tags, settings_for(stack, records), GateParams())
        manifest = registry_manifest(stack, REPO, tag)[1]
        deployed[tag] = {
            "manifest": result.manifest_digest,
            "model": result.model_digest,
            "model_size": gguf.stat().st_size,
            "blobs": {blob["digest"]: blob["size"] for blob in [*manifest["layers"], manifest["config"]]},
        }
    assert registry_manifest(stack, REPO, "latest")[0] == deployed[TAGS[4]]["manifest"]
    return deployed


@pytest.fixture(scope="module")
def project(tmp_path_factory, records) -> Path:
    """A project directory as CI checks it out: params.yaml (keep 2 versions, no days) and a git tag model-v1."""
    root = tmp_path_factory.mktemp("project")
    (root / "params.yaml").write_text(
        "deploy:\n  namespace: tests\n  model: tiny\n  backoff_s: 0.1\n"
        f"  records: {records}\n  keep_versions: {KEEP_VERSIONS}\n  keep_days: 0\n"
    )
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(root)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "params.yaml"], check=True)
    subprocess.run([*git, "commit", "-qm", "params"], check=True)
    subprocess.run([*git, "tag", GIT_TAG], check=True)
    return root


def retention_cli(stack, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OLLAMA_HOST": stack.ollama_url,
        "DEPLOY_REGISTRY": stack.registry_proxy.address,
    }
    command = [sys.executable, "-m", "pipeline.retention", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> sha256 of its bytes): byte-identical means equal."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def on_disk(root: Path) -> int:
    return sum(path.stat().st_blocks * 512 for path in root.rglob("*") if path.is_file())


KEPT = {TAGS[0], GIT_TAG, TAGS[3], TAGS[4], "latest"}  # git tag (and its first tag), newest two, latest
DELETED = {TAGS[1], TAGS[2]}


def test_the_dry_run_plans_and_changes_nothing(stack, five, project):
    before = tree_digest(stack.registry.storage)

    result = retention_cli(stack, project)

    assert result.returncode == 0, result.stderr
    assert tree_digest(stack.registry.storage) == before  # byte-identical registry directory
    assert "dry run: nothing changed" in result.stdout
    plan = json.loads((project / "retention-plan.json").read_text())
    assert plan["apply"] is False and plan["deleted"] == []
    decisions = {v["tag"]: v for v in plan["plans"][0]["versions"]}
    assert {tag for tag, v in decisions.items() if v["keep"]} == KEPT
    assert {tag for tag, v in decisions.items() if not v["keep"]} == DELETED
    assert decisions[GIT_TAG]["why"] == [f"git tag {GIT_TAG}"]
    assert decisions[TAGS[4]]["why"] == ["latest points to it", f"newest 1 of keep_versions {KEEP_VERSIONS}"]
    assert decisions[TAGS[2]]["size"] == sum(
        blob["size"] for blob in (lambda m: [*m["layers"], m["config"]])(registry_manifest(stack, REPO, TAGS[2])[1])
    )
    for tag in DELETED:
        assert f"{tag:<24} {five[tag]['manifest'][:19]}" in result.stdout


def test_apply_deletes_the_rest_with_their_release_notes(stack, five, project):
    result = retention_cli(stack, project, "--apply")

    assert result.returncode == 0, result.stderr
    assert set(registry_tags(stack, REPO)) == KEPT
    assert set(registry_tags(stack, f"{REPO}-releases")) == KEPT - {"latest"}
    assert set(registry_tags(stack, f"{REPO}-retired")) == DELETED
    for tag in DELETED:  # gone by digest, not only untagged
        assert registry_manifest(stack, REPO, five[tag]["manifest"]) is None
    # a second run finds nothing more to delete
    again = retention_cli(stack, project, "--apply")
    assert again.returncode == 0 and "deleted 0;" in again.stdout


def blob_file(storage: Path, digest: str) -> Path:
    """Where the filesystem driver keeps a blob's bytes."""
    return storage / "docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:] / "data"


def test_garbage_collect_refuses_a_writable_registry_then_frees_the_deleted_versions_blobs(stack, five, project):
    storage, config = stack.registry.storage, str(stack.registry.config)
    kept_blobs = {blob for tag in KEPT - {"latest", GIT_TAG} for blob in five[tag]["blobs"]}
    unique = {blob: size for tag in DELETED for blob, size in five[tag]["blobs"].items() if blob not in kept_blobs}
    assert five[TAGS[2]]["model"] in unique and five[TAGS[1]]["model"] not in unique  # q8_0: the fifth's too
    before = tree_digest(storage)

    writable = retention_cli(stack, project, "gc", "--config", config, "--apply")

    assert writable.returncode == 1
    assert (
        "accepts pushes (a manifest PUT answers HTTP 400, not 405): garbage-collect would race them" in writable.stderr
    )
    assert tree_digest(storage) == before  # nothing collected, and the probe wrote nothing

    stack.registry.stop()
    stack.registry.read_only = True
    stack.registry.start()
    try:
        usage_before = on_disk(storage)
        result = retention_cli(stack, project, "gc", "--config", config, "--apply")
        usage_after = on_disk(storage)
    finally:
        stack.registry.stop()
        stack.registry.read_only = False
        stack.registry.start()

    assert result.returncode == 0, result.stderr
    assert "registry read-only (a manifest PUT answers HTTP 405)" in result.stdout
    assert f"freed {usage_before - usage_after:,} bytes on disk" in result.stdout
    assert usage_before - usage_after >= sum(unique.values())
    assert not any(blob_file(storage, blob).exists() for blob in unique)
    for blob, size in ((b, s) for tag in KEPT - {"latest", GIT_TAG} for b, s in five[tag]["blobs"].items()):
        assert blob_file(storage, blob).stat().st_size == size  # every kept version's blobs, all still there


def test_an_ollama_host_keeps_latest_current_and_previous_and_frees_the_rest_on_disk(stack, five, project):
    name = f"{stack.registry_proxy.address}/{REPO}"
    blobs = stack.ollama.models / "blobs"
    f32 = blobs / five[TAGS[2]]["model"].replace(":", "-")
    assert f32.is_file()
    usage_before = on_disk(blobs)

    result = retention_cli(stack, project, "hosts", "--apply")

    assert result.returncode == 0, result.stderr
    ours = {n.removeprefix(name + ":") for n in ollama_models(stack.ollama) if n.startswith(name + ":")}
    assert ours == {"latest", TAGS[4], TAGS[3]}  # current (the fifth) and previous (the fourth)
    assert not f32.exists()  # Ollama removed the blob no name uses any more
    assert usage_before - on_disk(blobs) >= five[TAGS[2]]["model_size"]
    assert (blobs / five[TAGS[0]]["model"].replace(":", "-")).is_file()  # the f16: the fourth uses it


@pytest.mark.parametrize("tag", [GIT_TAG, TAGS[0], TAGS[3], TAGS[4]])
def test_every_kept_version_still_rolls_back_after_garbage_collect(stack, five, records, tag):
    record = rollback(tag, settings_for(stack, records), records.parent / f"work-{tag}", GateParams())

    assert record.manifest_digest == five[TAGS[0] if tag == GIT_TAG else tag]["manifest"]
    # the first version left the host with its retention: rebuilt from the registry's blobs, which GC kept
    expected = "host has the tag: copy" if tag in (TAGS[3], TAGS[4]) else "from the registry's blobs"
    assert record.hosts[0].path == expected
    assert registry_manifest(stack, REPO, "latest")[0] == record.manifest_digest


@pytest.mark.parametrize("tag", sorted(DELETED))
def test_a_deleted_version_is_refused_as_removed_by_retention(stack, five, records, tag):
    live = registry_manifest(stack, REPO, "latest")[0]
    settings = settings_for(stack, records)
    _, registry = settings.clients()
    assert read_retired(registry, tag).manifest_digest == five[tag]["manifest"]
    assert releases_client(registry).manifest(tag) is None

    with pytest.raises(PipelineError, match=rf"{tag} was removed by retention on .* it cannot be rolled back to"):
        rollback(tag, settings, records.parent / f"work-{tag}", GateParams())

    assert registry_manifest(stack, REPO, "latest")[0] == live
