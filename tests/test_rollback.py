"""python -m pipeline.rollback against a real Ollama and a real registry: each path back to a tagged version
(copy on the host, rebuild from the registry's blobs, rebuild from DVC at the git tag), the registry's
`latest` re-pointed without re-uploading, the version list, and an unknown tag that changes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from pipeline.common import PipelineError
from pipeline.deploy import deploy, load_release
from pipeline.params import GateParams
from pipeline.rollback import rollback
from tests.conftest import ROOT
from tests.servers import (
    Fault,
    OllamaServer,
    each_ollama,  # noqa: F401  (these tests run against every release in OLLAMA_VERSIONS)
)
from tests.test_deploy import MANIFEST_V2, ollama_models, registry_manifest, registry_tags, settings_for

SHA1, SHA2, DVC_TAG = "aaaa111", "bbbb222", "model-v9"
REPO = "tests/tiny"


@pytest.fixture(autouse=True)
def no_faults(stack):
    stack.ensure_running()
    stack.clear_faults()


@pytest.fixture(scope="module")
def deployed(stack, releases, records) -> dict[str, str]:
    """v1 (f16) deployed as SHA1, then v2 (q8_0) as SHA2: latest is v2. Returns tag -> manifest digest."""
    digests = {}
    for tag, version in ((SHA1, "v1"), (SHA2, "v2")):
        files = releases[version]
        record = deploy(load_release(files.modelfile, files.verdict, files.cases), [tag], settings_for(stack, records),
                        GateParams())  # fmt: skip
        digests[tag] = record.manifest_digest
    assert registry_manifest(stack, REPO, "latest")[0] == digests[SHA2]
    return digests


@pytest.fixture(scope="module")
def bare_ollama(ollama_binary, tmp_path_factory):
    """A second Ollama host that has never seen the model (a new workstation)."""
    server = OllamaServer(ollama_binary, tmp_path_factory.mktemp("bare-ollama"))
    server.start()
    yield server
    server.stop()


def cli(stack, records: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """The command as CI runs it: settings from params.yaml, hosts and registry from the environment."""
    params = tmp_path / "params.yaml"
    params.write_text(f"deploy:\n  namespace: tests\n  model: tiny\n  backoff_s: 0.1\n  records: {records}\n")
    env = {**os.environ, "OLLAMA_HOST": stack.ollama_url, "DEPLOY_REGISTRY": stack.registry_proxy.address}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.rollback", "--params", str(params), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_rollback_to_a_tag_the_host_has_copies_it_and_repoints_the_registry(stack, deployed, records, tmp_path):
    name = f"{stack.registry_proxy.address}/{REPO}"

    result = cli(stack, records, tmp_path, "--to", SHA1)

    assert result.returncode == 0, result.stderr
    assert registry_manifest(stack, REPO, "latest")[0] == deployed[SHA1]
    models = ollama_models(stack.ollama)
    assert models[f"{name}:latest"]["digest"] == models[f"{name}:{SHA1}"]["digest"]
    assert models[f"{name}:latest"]["details"]["quantization_level"] == "F16"  # v1 serves again
    # the fastest path: on the host, latest kept aside (to put back on failure) and the copy, then the aside
    # removed; one manifest PUT in the registry; no bytes moved
    assert stack.ollama_proxy.count("POST", "^/api/copy") == 2
    assert stack.ollama_proxy.count("DELETE", "^/api/delete") == 1
    assert f"{name}:latest.previous" not in models
    assert stack.ollama_proxy.count("POST", "^/api/(create|blobs)") == 0
    assert stack.registry_proxy.count("PUT", "/manifests/latest") == 1
    assert stack.registry_proxy.count("POST", "/blobs/uploads/") == 0
    answer = requests.post(
        f"http://{stack.ollama.address}/api/generate",
        json={"model": f"{name}:latest", "prompt": "PRINT", "stream": False, "options": {"num_predict": 4}},
    ).json()
    assert answer["done"] is True
    record = json.loads(records.read_text().splitlines()[-1])
    assert record["action"] == "rollback" and record["tags"] == [SHA1] and record["manifest_digest"] == deployed[SHA1]
    assert record["hosts"] == [{"url": stack.ollama_url, "path": "host has the tag: copy"}]


def test_ollama_cannot_pull_from_a_plain_registry_so_rollback_fetches_blobs_itself(stack, deployed, bare_ollama):
    """Why rollback has its own blob client: Ollama's pull wants a redirect on blob GETs (notes §5)."""
    pull = bare_ollama.cli("pull", "--insecure", f"{stack.registry.address}/{REPO}:{SHA1}")

    assert pull.returncode != 0
    assert "no Location header" in pull.stderr


def test_rollback_rebuilds_from_registry_blobs_on_a_host_without_the_tag(stack, deployed, records, bare_ollama):
    settings = settings_for(stack, records, hosts=[f"http://{bare_ollama.address}"])
    name = f"{stack.registry_proxy.address}/{REPO}"
    assert f"{name}:{SHA2}" not in ollama_models(bare_ollama)

    record = rollback(SHA2, settings, Path(records.parent) / "work", GateParams())

    models = ollama_models(bare_ollama)
    assert models[f"{name}:latest"]["digest"] == models[f"{name}:{SHA2}"]["digest"]
    assert models[f"{name}:latest"]["details"]["quantization_level"] == "Q8_0"
    _, manifest = registry_manifest(stack, REPO, SHA2)
    assert models[f"{name}:latest"]["size"] == sum(blob["size"] for blob in [*manifest["layers"], manifest["config"]])
    assert stack.registry_proxy.count("GET", rf"/{REPO}/blobs/sha256:") == len(manifest["layers"])
    assert stack.registry_proxy.count("POST", "/blobs/uploads/") == 0
    assert registry_manifest(stack, REPO, "latest")[0] == deployed[SHA2]
    assert record.hosts[0].path == "from the registry's blobs"


def live_state(stack) -> tuple[str, dict[str, str]]:
    """The registry's latest manifest digest and the host's local manifest digests, read directly."""
    return registry_manifest(stack, REPO, "latest")[0], {n: m["digest"] for n, m in ollama_models(stack.ollama).items()}


def test_a_tag_only_a_host_has_is_refused_it_cannot_be_verified(stack, deployed, records):
    """Anyone reaching the host's API can create a model under a tag; without the registry's copy and its
    release note nothing says a gate passed it (review #3)."""
    name = f"{stack.registry_proxy.address}/{REPO}"
    copied = requests.post(
        f"http://{stack.ollama.address}/api/copy", json={"source": f"{name}:{SHA1}", "destination": f"{name}:host-only"}
    )
    assert copied.ok and "host-only" not in registry_tags(stack, REPO)
    before = live_state(stack)

    with pytest.raises(PipelineError, match=r"has .*:host-only, but the registry has no host-only: .*refusing"):
        rollback("host-only", settings_for(stack, records), records.parent / "work-host-only", GateParams())

    assert live_state(stack) == before
    assert "host-only" not in registry_tags(stack, REPO)


def test_a_host_copy_that_differs_from_the_registry_is_never_made_live_as_it_is(stack, deployed, releases, records):
    """The registry's tag is v1 (f16); the host's copy of that tag was replaced by another model (v2, q8_0):
    the host gets the registry's model again, and that is what goes live."""
    name = f"{stack.registry_proxy.address}/{REPO}"
    settings = settings_for(stack, records)
    files = releases["v1"]
    deploy(load_release(files.modelfile, files.verdict, files.cases), ["swapped"], settings, GateParams())
    requests.post(
        f"http://{stack.ollama.address}/api/copy", json={"source": f"{name}:{SHA2}", "destination": f"{name}:swapped"}
    ).raise_for_status()
    assert ollama_models(stack.ollama)[f"{name}:swapped"]["details"]["quantization_level"] == "Q8_0"

    record = rollback("swapped", settings, records.parent / "work-swap", GateParams())

    assert record.hosts[0].path == "from the registry's blobs"
    assert ollama_models(stack.ollama)[f"{name}:latest"]["details"]["quantization_level"] == "F16"
    assert registry_manifest(stack, REPO, "latest")[0] == registry_manifest(stack, REPO, "swapped")[0]
    rollback(SHA2, settings, records.parent / "work-swap-back", GateParams())  # latest back on v2


def test_a_registry_tag_without_a_release_note_is_refused(stack, deployed, records):
    """A manifest put straight into the registry (no deploy ran the gate's served check on it)."""
    raw = requests.get(
        f"http://{stack.registry.address}/v2/{REPO}/manifests/{SHA1}", headers={"Accept": MANIFEST_V2}
    ).content
    requests.put(
        f"http://{stack.registry.address}/v2/{REPO}/manifests/planted",
        data=raw,
        headers={"Content-Type": MANIFEST_V2},
    ).raise_for_status()
    before = live_state(stack)

    with pytest.raises(PipelineError, match=r"planted has no release note .*refusing to make it live"):
        rollback("planted", settings_for(stack, records), records.parent / "work-planted", GateParams())

    assert live_state(stack) == before
    assert stack.ollama_proxy.count("POST", "^/api/(create|copy|blobs)") == 0


def test_a_version_failing_the_served_check_is_refused_and_latest_stays(stack, deployed, records):
    """Ollama answers the gate's cases with nothing the gate expects: the version is not made live."""
    stack.ollama_proxy.add(
        Fault("POST", "^/api/chat", "rewrite", rewrite=lambda _: b'{"message": {"role": "assistant", "content": "-"}}')
    )
    before = live_state(stack)

    with pytest.raises(PipelineError, match=r"served check on Ollama at .*:aaaa111 fails the gate"):
        rollback(SHA1, settings_for(stack, records), records.parent / "work-served", GateParams())

    stack.clear_faults()
    assert live_state(stack) == before


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (Fault("GET", rf"/{REPO}/blobs/sha256:", "cut"), r"download of sha256:\w+: stream cut"),
        (
            Fault("GET", rf"/{REPO}/blobs/sha256:", "rewrite", rewrite=lambda b: b[:-1] + bytes([b[-1] ^ 1])),
            r"arrived as sha256:",
        ),
    ],
    ids=["blob-fetch-cut", "wrong-digest"],
)
def test_rollback_faults_on_the_registry_blobs_leave_the_current_version_live(
    stack, deployed, records, bare_ollama, fault, message
):
    settings = settings_for(stack, records, hosts=[f"http://{bare_ollama.address}"])
    rollback(SHA2, settings, records.parent / f"work-{fault.kind}-0", GateParams())  # the bare host serves v2
    latest = registry_manifest(stack, REPO, "latest")[0]
    on_host = {n: m["digest"] for n, m in ollama_models(bare_ollama).items()}
    stack.registry_proxy.add(fault)

    with pytest.raises(PipelineError, match=message):
        rollback(SHA1, settings, records.parent / f"work-{fault.kind}", GateParams())

    stack.clear_faults()
    assert registry_manifest(stack, REPO, "latest")[0] == latest
    assert {n: m["digest"] for n, m in ollama_models(bare_ollama).items()} == on_host


def test_the_registry_down_during_a_rollback_leaves_the_current_version_live(stack, deployed, records):
    before = live_state(stack)
    stack.registry.stop()
    try:
        with pytest.raises(PipelineError, match=r"manifest aaaa111.*HTTP 502.*gave up after 3 attempts"):
            rollback(SHA1, settings_for(stack, records), records.parent / "work-down", GateParams())
    finally:
        stack.registry.start()
    assert live_state(stack) == before


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def dvc(repo: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def dvc_repository(releases, tmp_path) -> Path:
    """A project repository whose git tag DVC_TAG has the v1 release as DVC outputs, pushed to a DVC remote;
    the local cache and workspace copies are gone, so only the remote has the bytes."""
    repo = tmp_path / "project"
    for relative in ("models/release/Modelfile", "models/gguf/model-f16.gguf", "models/gate/verdict.json"):
        (repo / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(releases["v1"].root / relative, repo / relative)
    (repo / "data").mkdir()  # git-tracked, as in the project: the cases the gate judged at this tag
    shutil.copyfile(releases["v1"].cases, repo / "data" / "gate_cases.jsonl")
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "ci@example.com")
    git(repo, "config", "user.name", "CI")
    dvc(repo, "init", "-q")
    dvc(repo, "remote", "add", "-d", "store", str(tmp_path / "remote"))
    dvc(repo, "add", "-q", "models/release/Modelfile", "models/gguf/model-f16.gguf", "models/gate/verdict.json")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "model v9")
    git(repo, "tag", DVC_TAG)
    dvc(repo, "push", "-q")
    shutil.rmtree(repo / ".dvc" / "cache")
    for relative in ("models/release/Modelfile", "models/gguf/model-f16.gguf", "models/gate/verdict.json"):
        (repo / relative).unlink()
    return repo


def test_the_dvc_remote_missing_during_a_rollback_from_dvc_leaves_the_current_version_live(
    stack, deployed, records, dvc_repository, monkeypatch, tmp_path
):
    """The tag is only in git and DVC, and the NAS share is gone: one error, nothing moves."""
    monkeypatch.chdir(dvc_repository)
    assert DVC_TAG not in registry_tags(stack, REPO)  # runs before the rollback from DVC puts it there
    shutil.rmtree(tmp_path / "remote")
    before = live_state(stack)

    with pytest.raises(PipelineError, match=DVC_TAG) as raised:
        rollback(DVC_TAG, settings_for(stack, records), tmp_path / "work", GateParams())

    assert "Traceback" not in str(raised.value)
    assert live_state(stack) == before
    assert DVC_TAG not in registry_tags(stack, REPO)


def test_rollback_from_dvc_at_the_git_tag_when_no_host_or_registry_has_it(
    stack, deployed, releases, records, dvc_repository, monkeypatch, tmp_path
):
    monkeypatch.chdir(dvc_repository)
    assert DVC_TAG not in registry_tags(stack, REPO)

    record = rollback(DVC_TAG, settings_for(stack, records), tmp_path / "work", GateParams())

    name = f"{stack.registry_proxy.address}/{REPO}"
    digest, manifest = registry_manifest(stack, REPO, DVC_TAG)
    assert registry_manifest(stack, REPO, "latest")[0] == digest == record.manifest_digest
    gguf = dvc_repository / "models/gguf/model-f16.gguf"
    assert not gguf.exists()  # read from the DVC remote, not from a workspace copy
    model_layer = next(layer for layer in manifest["layers"] if layer["mediaType"].endswith(".model"))
    assert model_layer["digest"] == "sha256:" + hashlib.sha256(releases["v1"].gguf.read_bytes()).hexdigest()
    models = ollama_models(stack.ollama)
    assert models[f"{name}:latest"]["digest"] == models[f"{name}:{DVC_TAG}"]["digest"]
    assert record.hosts[0].path == "from DVC at the git tag"


def test_an_unknown_tag_is_one_clear_error_and_changes_nothing(stack, deployed, records, tmp_path):
    latest = registry_manifest(stack, REPO, "latest")[0]
    local = ollama_models(stack.ollama)

    result = cli(stack, records, tmp_path, "--to", "no-such-tag")

    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown tag 'no-such-tag': no Ollama host has ")
    assert f"(it has: {SHA1}, {SHA2}" in lines[0] and lines[0].endswith("Nothing was changed")
    assert registry_manifest(stack, REPO, "latest")[0] == latest
    assert ollama_models(stack.ollama) == local
    assert stack.registry_proxy.count("PUT", "") == 0 and stack.ollama_proxy.count("POST", "^/api/copy") == 0


def test_list_shows_registry_tags_and_deployment_records(stack, deployed, records, tmp_path):
    result = cli(stack, records, tmp_path, "--list")

    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert {SHA1, SHA2} <= set(rows)
    latest = registry_manifest(stack, REPO, "latest")[0]
    for tag in (SHA1, SHA2):
        assert deployed[tag][:19] in rows[tag]
        assert (" * " in rows[tag]) == (deployed[tag] == latest)
    deploys = {r["tags"][0]: r for r in map(json.loads, records.read_text().splitlines()) if r["action"] == "deploy"}
    assert deploys[SHA1]["when"] in rows[SHA1] and deploys[SHA1]["commit"][:12] in rows[SHA1]


def test_rollback_cli_documents_the_ci_commands():
    usage = subprocess.run(
        [sys.executable, "-m", "pipeline.rollback", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert "python -m pipeline.rollback --to <tag>" in usage.stdout
    assert "python -m pipeline.rollback --list" in usage.stdout
