"""python -m pipeline.deploy against a real Ollama (v0.11.4, built from source) and a real registry (Debian's
docker-registry): create, served check, push, verification through the registry, `latest`, records.

Everything is read back independently of our clients: the registry's HTTP API with plain requests, Ollama's
/api/tags, the `ollama` command line, and the proxies' logs of what was sent.
"""

from __future__ import annotations

import dataclasses
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
from pipeline.http_retry import RetryPolicy
from pipeline.model_names import Repository
from pipeline.params import DeployParams, GateParams
from pipeline.release import Settings, resolve_settings
from tests.conftest import ROOT
from tests.servers import (
    CHATML_TEMPLATE,
    Fault,
    OllamaServer,
    each_ollama,  # noqa: F401  (these tests run against every release in OLLAMA_VERSIONS)
    write_release,
)

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
SHA1, GIT_TAG, SHA2 = "1a2b3c4", "model-v1", "5d6e7f8"


def settings_for(stack, records: Path, model: str = "tiny", hosts: list[str] | None = None) -> Settings:
    return Settings(
        repository=Repository(stack.registry_proxy.address, "tests", model),
        hosts=tuple(hosts or [stack.ollama_url]),
        insecure=True,
        retry=RetryPolicy(retries=2, backoff_s=0.05, timeout_s=120),
        records=records,
    )


def registry_manifest(stack, repository: str, tag: str) -> tuple[str, dict] | None:
    """(Docker-Content-Digest, manifest) straight from the registry, not through our client or the proxy."""
    response = requests.get(
        f"http://{stack.registry.address}/v2/{repository}/manifests/{tag}", headers={"Accept": MANIFEST_V2}
    )
    if response.status_code == 404:
        return None
    response.raise_for_status()
    assert response.headers["Docker-Content-Digest"] == "sha256:" + hashlib.sha256(response.content).hexdigest()
    return response.headers["Docker-Content-Digest"], response.json()


def registry_tags(stack, repository: str) -> list[str]:
    response = requests.get(f"http://{stack.registry.address}/v2/{repository}/tags/list")
    return sorted(response.json()["tags"]) if response.ok else []


def ollama_models(ollama: OllamaServer) -> dict[str, dict]:
    """Ollama's own list (/api/tags), straight from the server."""
    return {m["name"]: m for m in requests.get(f"http://{ollama.address}/api/tags").json()["models"]}


def sha256_hex(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def deploy_cli(stack, cwd: Path, *args) -> subprocess.CompletedProcess:
    """`python -m pipeline.deploy` as CI runs it in `cwd`: hosts and registry from the environment."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OLLAMA_HOST": stack.ollama_url,
        "DEPLOY_REGISTRY": stack.registry_proxy.address,
    }
    command = [sys.executable, "-m", "pipeline.deploy", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(autouse=True)
def no_faults(stack):
    """Each test starts with both servers running, no faults armed and empty proxy logs."""
    stack.ensure_running()
    stack.clear_faults()


def load(files):
    return load_release(files.modelfile, files.verdict, files.cases)


def test_deploy_creates_checks_pushes_verifies_then_moves_latest(stack, releases, records, request):
    served_by = request.node.callspec.params["ollama_binary"]  # the release each_ollama started
    record = deploy(load(releases["v1"]), [SHA1, GIT_TAG], settings_for(stack, records), GateParams())

    assert registry_tags(stack, "tests/tiny") == sorted([SHA1, GIT_TAG, "latest"])
    digest, manifest = registry_manifest(stack, "tests/tiny", SHA1)
    assert registry_manifest(stack, "tests/tiny", GIT_TAG)[0] == digest
    assert registry_manifest(stack, "tests/tiny", "latest")[0] == digest
    # the model layer is our GGUF, byte for byte (v0.11.4 stores it as uploaded)
    model_layer = next(layer for layer in manifest["layers"] if layer["mediaType"].endswith(".model"))
    gguf_hex = sha256_hex(releases["v1"].gguf)
    assert model_layer["digest"] == f"sha256:{gguf_hex}"
    blob = requests.get(f"http://{stack.registry.address}/v2/tests/tiny/blobs/{model_layer['digest']}").content
    assert hashlib.sha256(blob).hexdigest() == gguf_hex
    # the manifest in the registry is the one Ollama wrote (its local file = the pushed bytes + a newline)
    pushed = requests.get(
        f"http://{stack.registry.address}/v2/tests/tiny/manifests/{SHA1}", headers={"Accept": MANIFEST_V2}
    ).content
    local = ollama_models(stack.ollama)
    prefix = f"{stack.registry_proxy.address}/tests/tiny"
    for tag in (SHA1, GIT_TAG, "latest"):
        assert local[f"{prefix}:{tag}"]["digest"] == hashlib.sha256(pushed + b"\n").hexdigest()
    # one upload to Ollama, blobs uploaded to the registry, and the record CI keeps
    assert stack.ollama_proxy.count("POST", "^/api/blobs/") == 1
    assert stack.registry_proxy.count("PATCH", "/blobs/uploads/") >= 3
    saved = [json.loads(line) for line in records.read_text().splitlines()]
    assert saved[-1] == record.to_json()
    assert record.tags == [SHA1, GIT_TAG] and record.manifest_digest == digest and record.changed is True
    assert record.model_digest == f"sha256:{gguf_hex}" and record.latest == SHA1
    assert record.hosts[0].version == served_by and record.hosts[0].uploaded is True
    assert record.hosts[0].served_check_differences == []
    assert len(record.commit) == 40


def test_deploying_the_same_model_again_uploads_nothing_and_changes_nothing(stack, releases, records, tmp_path):
    """Again, through the command line as CI runs it: settings from params.yaml and the environment."""
    before = {tag: registry_manifest(stack, "tests/tiny", tag)[0] for tag in (SHA1, GIT_TAG, "latest")}
    local_before = {name: m["digest"] for name, m in ollama_models(stack.ollama).items()}
    files = releases["v1"]
    params = tmp_path / "params.yaml"
    params.write_text(f"deploy:\n  namespace: tests\n  model: tiny\n  records: {records}\n")
    paths = ["--modelfile", files.modelfile, "--verdict", files.verdict, "--cases", files.cases]

    result = deploy_cli(stack, ROOT, "--tag", SHA1, "--tag", GIT_TAG, "--params", params, *paths)

    assert result.returncode == 0, result.stderr
    assert "(already deployed: nothing changed)" in result.stderr
    record = json.loads(records.read_text().splitlines()[-1])
    assert record["tags"] == [SHA1, GIT_TAG] and record["manifest_digest"] == before["latest"]
    assert record["changed"] is False and record["hosts"][0]["uploaded"] is False
    assert stack.ollama_proxy.count("POST", "^/api/blobs/") == 0  # no model bytes to Ollama
    assert stack.ollama_proxy.count("POST", "^/api/push") == 0
    assert stack.registry_proxy.count("POST", "/blobs/uploads/") == 0  # none to the registry
    assert stack.registry_proxy.count("PUT", "/manifests/") == 0
    assert {tag: registry_manifest(stack, "tests/tiny", tag)[0] for tag in before} == before
    assert {name: m["digest"] for name, m in ollama_models(stack.ollama).items()} == local_before


def test_by_hand_ollama_run_answers_and_ollama_push_is_a_no_op(stack, releases):
    name = f"{stack.registry_proxy.address}/tests/tiny:latest"
    digest = registry_manifest(stack, "tests/tiny", "latest")[0]

    run = stack.ollama.cli("run", name, releases["v1"].prompts[0])
    push = stack.ollama.cli("push", "--insecure", name)

    assert run.returncode == 0 and run.stdout.strip(), run.stderr
    assert push.returncode == 0 and "success" in push.stderr + push.stdout, push.stderr
    assert stack.registry_proxy.count("POST", "/blobs/uploads/") == 0  # every blob already there
    assert stack.registry_proxy.count("HEAD", "/blobs/") >= 3
    assert registry_manifest(stack, "tests/tiny", "latest")[0] == digest


def test_served_check_rejects_a_template_the_model_was_not_trained_with(stack, tiny_versions, tmp_path, records):
    """The GGUF is the gate's, only the Modelfile TEMPLATE is wrong: Ollama's answers fail the gate's cases."""
    model = tiny_versions["v1"]  # the random model: any other prompt than its template's changes its answers
    wrong = write_release(tmp_path, model.gguf, model.answers, template=CHATML_TEMPLATE)
    latest = registry_manifest(stack, "tests/tiny", "latest")[0]

    served = r"served check on Ollama at .*fails the gate .*TEMPLATE\?.*learn: mean score 0\.000 < learn_min_score"
    lost = r".*gguf: mean score 0\.000 below the merged model's 1\.000"
    with pytest.raises(PipelineError, match=served + lost):
        deploy(load(wrong), ["wrong-template"], settings_for(stack, records), GateParams())

    assert "wrong-template" not in registry_tags(stack, "tests/tiny")
    assert registry_manifest(stack, "tests/tiny", "latest")[0] == latest
    # it was checked under a scratch name, removed again: the host has no name of it
    assert [name for name in ollama_models(stack.ollama) if "wrong-template" in name or "staging" in name] == []
    assert stack.ollama_proxy.count("DELETE", "^/api/delete") == 1


def test_a_failed_or_missing_gate_verdict_is_refused(releases, tmp_path):
    files = releases["v1"]
    failed = tmp_path / "verdict.json"
    failed.write_text(json.dumps({**json.loads(files.verdict.read_text()), "passed": False, "reasons": ["keep: x"]}))

    with pytest.raises(PipelineError, match=r"the gate failed, refusing to ship: keep: x"):
        load_release(files.modelfile, failed, files.cases)
    with pytest.raises(PipelineError, match=r"no gate verdict; run the gate first"):
        load_release(files.modelfile, tmp_path / "missing.json", files.cases)


def test_a_gguf_other_than_the_one_the_gate_passed_is_refused(releases, tiny_versions, tmp_path):
    files = releases["v1"]
    verdict = json.loads(files.verdict.read_text())
    other = tmp_path / "verdict.json"
    other.write_text(json.dumps({**verdict, "gguf_sha256": sha256_hex(tiny_versions["v2"].gguf)}))

    with pytest.raises(PipelineError, match=r"FROM \.\./gguf/model-f16\.gguf is sha256:\w+, not the GGUF the gate"):
        load_release(files.modelfile, other, files.cases)


@pytest.mark.parametrize(
    ("namespace", "model", "tag", "message"),
    [
        ("Tests", "tiny", "abc", r"namespace 'Tests' is invalid: .* \(registries answer 404 to upper case\)"),
        ("tests", "Tiny", "abc", r"model 'Tiny' is invalid"),
        ("tests", "tiny", "bad tag", r"tag 'bad tag' is invalid"),
        ("tests", "tiny", "latest", r"'latest' is the moving tag"),
    ],
)
def test_names_are_checked_before_anything_is_sent(stack, releases, records, namespace, model, tag, message):
    with pytest.raises(PipelineError, match=message):
        settings = settings_for(stack, records)
        repository = Repository(settings.repository.registry, namespace, model)
        deploy(load(releases["v1"]), [tag], dataclasses.replace(settings, repository=repository), GateParams())
    assert stack.ollama_proxy.seen == [] and stack.registry_proxy.seen == []


def test_an_ollama_older_than_the_json_create_api_is_refused(stack, releases, records):
    stack.ollama_proxy.add(Fault("GET", "^/api/version", "rewrite", rewrite=lambda _: b'{"version":"0.5.4"}'))

    supported = r"0\.5\.5 and later \(tested: 0\.11\.4, 0\.17\.4\)"
    with pytest.raises(PipelineError, match=rf"runs Ollama 0\.5\.4, below the supported range {supported}: 0\.5\.5 is"):
        deploy(load(releases["v1"]), ["old-ollama"], settings_for(stack, records), GateParams())
    assert stack.ollama_proxy.count("POST", "") == 0


def test_deploy_to_two_ollama_hosts_serves_the_model_on_both(stack, releases, records, ollama_binary, tmp_path):
    """The rig and the workstation: each gets the GGUF and passes the served check; one push to the registry."""
    second = OllamaServer(ollama_binary, tmp_path / "workstation")
    second.start()
    try:
        settings = settings_for(stack, records, hosts=[stack.ollama_url, f"http://{second.address}"])
        record = deploy(load(releases["v2"]), [SHA2], settings, GateParams())

        prefix = f"{stack.registry_proxy.address}/tests/tiny"
        for ollama in (stack.ollama, second):
            models = ollama_models(ollama)
            assert models[f"{prefix}:latest"]["digest"] == models[f"{prefix}:{SHA2}"]["digest"]
            assert models[f"{prefix}:latest"]["details"]["quantization_level"] == "Q8_0"
        assert registry_manifest(stack, "tests/tiny", "latest")[0] == record.manifest_digest
        # the wrong-template test's failed deploy left nothing on the rig (its GGUF went with the scratch name)
        assert [host.uploaded for host in record.hosts] == [True, True]
        assert stack.ollama_proxy.count("POST", "^/api/push") == 1
    finally:
        second.stop()


def test_settings_come_from_params_then_environment_then_flags():
    params = DeployParams(registry="params.example:5000", hosts=["http://rig:11434"])
    environ = {"OLLAMA_HOST": "rig:11434, workstation", "DEPLOY_REGISTRY": "env.example:5000"}

    assert resolve_settings(params, {}).hosts == ("http://rig:11434",)
    from_env = resolve_settings(params, environ)
    assert from_env.hosts == ("rig:11434", "workstation") and from_env.repository.registry == "env.example:5000"
    from_flags = resolve_settings(params, environ, registry="flag.example:5000", hosts=["laptop"])
    assert from_flags.hosts == ("laptop",) and from_flags.repository.registry == "flag.example:5000"
    assert from_flags.repository.name("abc") == "flag.example:5000/llm-gitops/opl-assistant:abc"


def test_cli_documents_the_ci_command_and_fails_with_one_line(tmp_path):
    env = {**os.environ, "OLLAMA_HOST": "127.0.0.1:9", "DEPLOY_REGISTRY": "127.0.0.1:9"}
    command = [sys.executable, "-m", "pipeline.deploy"]
    usage = subprocess.run([*command, "--help"], cwd=ROOT, capture_output=True, text=True, env=env)
    missing = subprocess.run(
        [*command, "--tag", SHA1, "--verdict", str(tmp_path / "none.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )

    assert "python -m pipeline.deploy --tag <git short sha> [--tag <git tag>]" in usage.stdout
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none.json'}: no gate verdict; run the gate first (dvc repro gate)"
    ]


def test_ship_f16_deploys_from_a_fresh_clone_with_only_dvc(stack, releases, records, tmp_path):
    """The gate ships convert's f16 (not a quantize output): `deploy --pull` in a clean clone fetches the
    Modelfile and exactly the GGUF its FROM names from the DVC remote, whichever stage wrote it."""
    from tests.scratch_project import git

    project, remote = tmp_path / "project", tmp_path / "remote"
    v1, v2 = releases["v1"], releases["v2"]
    for relative, source in (
        ("models/release/Modelfile", v1.modelfile),  # FROM ../gguf/model-f16.gguf
        ("models/gguf/model-f16.gguf", v1.gguf),
        ("models/gguf/model-q8_0.gguf", v2.gguf),
        ("models/gate/verdict.json", v1.verdict),
        ("data/gate_cases.jsonl", v1.cases),
    ):
        (project / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, project / relative)
    (project / "params.yaml").write_text(f"deploy:\n  namespace: tests\n  model: tiny\n  records: {records}\n")
    git(tmp_path, "init", "-q", "-b", "main", str(project))

    def dvc(cwd: Path, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=True, capture_output=True)

    dvc(project, "init", "-q")
    dvc(project, "remote", "add", "-d", "store", str(remote))
    for stage, out in (("convert", "model-f16.gguf"), ("quantize", "model-q8_0.gguf")):
        dvc(project, "stage", "add", "-q", "-n", stage, "-o", f"models/gguf/{out}", "true")
    dvc(project, "stage", "add", "-q", "-n", "modelfile", "-o", "models/release/Modelfile", "true")
    dvc(project, "commit", "-q", "-f")
    dvc(project, "push", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "ship f16")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    assert not (clone / "models/release/Modelfile").exists()

    result = deploy_cli(stack, clone, "--pull", "--tag", "f16-clone")

    assert result.returncode == 0, result.stderr
    assert (clone / "models/gguf/model-f16.gguf").read_bytes() == v1.gguf.read_bytes()
    assert not (clone / "models/gguf/model-q8_0.gguf").exists()  # only what ships is pulled
    _, manifest = registry_manifest(stack, "tests/tiny", "f16-clone")
    model_layer = next(layer for layer in manifest["layers"] if layer["mediaType"].endswith(".model"))
    assert model_layer["digest"] == f"sha256:{sha256_hex(v1.gguf)}"


def test_a_cached_ollama_binary_is_trusted_by_its_sha256_not_by_what_it_prints(tmp_path, ollama_binary):
    """A poisoned tool cache: a script answering `--version` like Ollama 0.11.4 is not run as the server."""
    from tests.servers import OLLAMA_VERSION, trusted_ollama

    stub = tmp_path / "ollama"
    stub.write_text(
        f"#!/bin/sh\necho 'ollama version is {OLLAMA_VERSION}'\necho 'client version is {OLLAMA_VERSION}'\n"
    )
    stub.chmod(0o755)
    printed = subprocess.run([stub, "--version"], capture_output=True, text=True).stdout

    assert f"client version is {OLLAMA_VERSION}" in printed  # what the old check accepted
    assert not trusted_ollama(stub)
    assert trusted_ollama(ollama_binary)
