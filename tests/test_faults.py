"""Faults around the real Ollama and registry while deploying v2 over a live v1: each ends in one clear error
(after retries where retrying is safe), `latest` stays on v1 in the registry and in Ollama, and v1 still answers.

Faults are injected by FaultProxy (tests/servers.py) in front of the real servers, or by stopping/killing the
real server processes at a chosen request.
"""

from __future__ import annotations

import dataclasses
import re
import time

import pytest
import requests

from pipeline.common import PipelineError
from pipeline.deploy import deploy, load_release
from pipeline.http_retry import RetryPolicy
from pipeline.params import GateParams
from pipeline.release import Record
from tests.servers import Fault, FaultProxy, OllamaServer
from tests.test_deploy import ollama_models, registry_manifest, registry_tags, settings_for

REPO = "tests/tiny"
ATTEMPTS = "gave up after 3 attempts"  # settings_for: 2 retries


@pytest.fixture(scope="module")
def live(stack, releases, records) -> dict:
    """v1 deployed and live: the registry's latest manifest digest and Ollama's latest manifest digest."""
    files = releases["v1"]
    release = load_release(files.modelfile, files.verdict, files.cases)
    record = deploy(release, ["v1-live"], settings_for(stack, records), GateParams())
    name = f"{stack.registry_proxy.address}/{REPO}:latest"
    return {"registry": record.manifest_digest, "ollama": ollama_models(stack.ollama)[name]["digest"], "name": name}


@pytest.fixture(autouse=True)
def no_faults(stack, live):
    stack.ensure_running()
    stack.clear_faults()
    yield
    stack.clear_faults()


def deploy_v2(stack, releases, records, tag: str) -> Record:
    files = releases["v2"]
    return deploy(load_release(files.modelfile, files.verdict, files.cases), [tag], settings_for(stack, records),
                  GateParams())  # fmt: skip


def assert_v1_still_live(stack, live: dict) -> None:
    """latest unchanged in the registry and in Ollama, and the previous version resolves and answers."""
    stack.clear_faults()
    assert registry_manifest(stack, REPO, "latest")[0] == live["registry"]
    latest = ollama_models(stack.ollama)[live["name"]]
    assert latest["digest"] == live["ollama"] and latest["details"]["quantization_level"] == "F16"
    answer = requests.post(
        f"http://{stack.ollama.address}/api/chat",
        json={
            "model": live["name"],
            "messages": [{"role": "user", "content": "PRINT"}],
            "stream": False,
            "options": {"num_predict": 4},
        },
        timeout=120,
    ).json()
    assert answer["done"] is True and answer["model"] == live["name"]


def test_a_gguf_altered_on_its_way_to_ollama_is_retried_then_reported(stack, releases, records, live):
    """Wrong digest: Ollama checks the uploaded bytes against the digest in the URL and answers 400."""
    stack.ollama_proxy.add(Fault("POST", "^/api/blobs/", "corrupt"))

    with pytest.raises(PipelineError, match=rf"upload of model-q8_0\.gguf: digest mismatch.*{ATTEMPTS}"):
        deploy_v2(stack, releases, records, "v2-corrupt")

    assert stack.ollama_proxy.count("POST", "^/api/blobs/") == 3
    assert stack.ollama_proxy.count("POST", "^/api/create") == 0
    assert_v1_still_live(stack, live)


def test_ollama_answering_5xx_is_retried_then_reported(stack, releases, records, live):
    stack.ollama_proxy.add(Fault("POST", "^/api/create", "status", status=503))

    with pytest.raises(PipelineError, match=rf"create .*HTTP 503: injected fault: HTTP 503 .*{ATTEMPTS}"):
        deploy_v2(stack, releases, records, "v2-5xx")

    assert stack.ollama_proxy.count("POST", "^/api/create") == 3
    assert_v1_still_live(stack, live)


def test_a_create_stream_cut_after_its_first_line_is_reported(stack, releases, records, live):
    stack.ollama_proxy.add(Fault("POST", "^/api/create", "cut"))

    with pytest.raises(PipelineError, match=rf"create .*: stream cut .*{ATTEMPTS}"):
        deploy_v2(stack, releases, records, "v2-cut")

    assert_v1_still_live(stack, live)


def test_ollama_killed_mid_create_is_reported_and_v1_serves_after_a_restart(stack, releases, records, live):
    stack.ollama_proxy.add(Fault("POST", "^/api/create", "cut", times=1, hook=stack.ollama.kill))

    with pytest.raises(PipelineError, match=rf"create .*(unreachable|HTTP 502).*{ATTEMPTS}"):
        deploy_v2(stack, releases, records, "v2-killed")

    assert not stack.ollama.running
    stack.ollama.start()  # same models directory: what was live before is live again
    assert_v1_still_live(stack, live)


def test_registry_stopped_mid_push_is_reported_and_nothing_half_pushed_goes_live(stack, releases, records, live):
    # the first new blob (the q8_0 model) goes through; the registry stops when the next upload starts
    stack.registry_proxy.add(Fault("POST", "/blobs/uploads/", "before", times=1, skip=1, hook=stack.registry.stop))

    with pytest.raises(
        PipelineError, match=rf"push .*v2-halfway: .*{ATTEMPTS}\); the registry .* answers HTTP 502 on /v2/"
    ):
        deploy_v2(stack, releases, records, "v2-halfway")

    assert not stack.registry.running
    stack.registry.start()  # same storage
    assert "v2-halfway" not in registry_tags(stack, REPO)
    assert_v1_still_live(stack, live)


def test_a_push_stream_cut_after_its_first_line_is_reported(stack, releases, records, live):
    stack.ollama_proxy.add(Fault("POST", "^/api/push", "cut"))

    with pytest.raises(PipelineError, match=rf"push .*: stream cut .*{ATTEMPTS}"):
        deploy_v2(stack, releases, records, "v2-push-cut")

    assert_v1_still_live(stack, live)


def test_a_manifest_that_does_not_match_its_digest_stops_the_deploy_before_latest(stack, releases, records, live):
    """Wrong digest on the registry side: the manifest bytes read back do not hash to Docker-Content-Digest."""
    stack.registry_proxy.add(
        Fault("GET", "/manifests/v2-bad-digest$", "rewrite", rewrite=lambda body: body.replace(b'{"', b'{ "', 1))
    )

    with pytest.raises(PipelineError, match=r"manifest v2-bad-digest: digest mismatch: the registry says sha256:"):
        deploy_v2(stack, releases, records, "v2-bad-digest")

    assert_v1_still_live(stack, live)


def test_the_registry_failing_when_latest_moves_leaves_latest_alone_everywhere(stack, releases, records, live):
    stack.registry_proxy.add(Fault("PUT", "/manifests/latest$", "status", status=500))

    with pytest.raises(PipelineError, match=rf"put manifest latest: HTTP 500.*{ATTEMPTS}"):
        deploy_v2(stack, releases, records, "v2-latest-500")

    assert "v2-latest-500" in registry_tags(stack, REPO)  # the version itself was pushed and verified
    assert_v1_still_live(stack, live)


def test_transient_faults_are_retried_and_the_deploy_then_succeeds(stack, releases, records, live):
    stack.ollama_proxy.add(Fault("POST", "^/api/create", "status", status=503, times=1))
    stack.ollama_proxy.add(Fault("POST", "^/api/push", "cut", times=1))
    stack.registry_proxy.add(Fault("GET", "/manifests/", "status", status=502, times=1))

    record = deploy_v2(stack, releases, records, "v2-after-retries")

    assert stack.ollama_proxy.count("POST", "^/api/create") == 2
    digest = registry_manifest(stack, REPO, "v2-after-retries")[0]
    assert registry_manifest(stack, REPO, "latest")[0] == digest == record.manifest_digest
    assert ollama_models(stack.ollama)[live["name"]]["details"]["quantization_level"] == "Q8_0"


# --- two hosts: latest moves on every host and then in the registry, or nowhere ---


@pytest.fixture
def workstation(stack, releases, records, ollama_binary, tmp_path, live):
    """A second Ollama host behind its own FaultProxy, serving v1 as latest like the rig."""
    server = OllamaServer(ollama_binary, tmp_path / "workstation")
    server.start()
    proxy = FaultProxy(server.port)
    files = releases["v1"]
    hosts = [stack.ollama_url, f"http://{proxy.address}"]
    deploy(load_release(files.modelfile, files.verdict, files.cases), ["v1-both"],
           settings_for(stack, records, hosts=hosts), GateParams())  # fmt: skip
    proxy.clear()
    stack.clear_faults()  # the requests the test counts are those of its own deploy, not of this set-up
    try:
        yield server, proxy, hosts
    finally:
        proxy.close()
        server.stop()


def test_a_500_on_host_2s_latest_copy_leaves_registry_and_both_hosts_on_v1(stack, releases, records, live, workstation):
    server, proxy, hosts = workstation
    second_before = ollama_models(server)[live["name"]]["digest"]
    proxy.add(Fault("POST", "^/api/copy", "status", status=500, body=r'"destination": "[^"]*:latest"'))
    files = releases["v2"]

    with pytest.raises(
        PipelineError,
        match=r"copy \S+:v2-split -> \S+:latest: HTTP 500.*latest was not moved: the previous latest is back on 2 host",
    ):
        deploy(load_release(files.modelfile, files.verdict, files.cases), ["v2-split"],
               settings_for(stack, records, hosts=hosts), GateParams())  # fmt: skip

    assert stack.registry_proxy.count("PUT", "/manifests/latest") == 0  # the registry moves last: never reached
    assert_v1_still_live(stack, live)
    assert ollama_models(server)[live["name"]]["digest"] == second_before
    for ollama in (stack.ollama, server):
        assert not [name for name in ollama_models(ollama) if name.endswith((":latest.previous", ":deploy.staging"))]


def test_a_version_tag_recreated_with_another_model_is_refused_before_anything_changes(stack, releases, records, live):
    """v2 under v1's tag: the registry's and the host's v1 stay v1; no version tag or latest is written."""
    name = f"{stack.registry_proxy.address}/{REPO}:v1-live"
    host_v1 = ollama_models(stack.ollama)[name]["digest"]
    registry_v1 = registry_manifest(stack, REPO, "v1-live")[0]

    with pytest.raises(PipelineError, match=r"v1-live already holds another model .*immutable.*Nothing was changed"):
        deploy_v2(stack, releases, records, "v1-live")

    assert ollama_models(stack.ollama)[name]["digest"] == host_v1
    assert registry_manifest(stack, REPO, "v1-live")[0] == registry_v1
    assert stack.ollama_proxy.count("POST", "^/api/(copy|push)") == 0
    assert stack.registry_proxy.count("PUT", "/manifests/") == 0
    assert_v1_still_live(stack, live)


def test_a_tag_only_the_host_holds_with_another_model_is_refused_too(stack, releases, records, live):
    """The registry lacks the tag, but the host has it with v1: v2 may not overwrite it there."""
    name = f"{stack.registry_proxy.address}/{REPO}"
    requests.post(
        f"http://{stack.ollama.address}/api/copy", json={"source": f"{name}:v1-live", "destination": f"{name}:on-host"}
    ).raise_for_status()
    held = ollama_models(stack.ollama)[f"{name}:on-host"]["digest"]

    with pytest.raises(PipelineError, match=r"Ollama at .*: on-host already holds another model"):
        deploy_v2(stack, releases, records, "on-host")

    assert ollama_models(stack.ollama)[f"{name}:on-host"]["digest"] == held
    assert "on-host" not in registry_tags(stack, REPO)
    assert_v1_still_live(stack, live)


# --- deadlines: a server that stalls, or streams progress forever, is cut ---


def test_a_stalled_create_stream_fails_within_its_read_timeout_per_attempt(stack, releases, records, live):
    stack.ollama_proxy.add(Fault("POST", "^/api/create", "stall", hold_s=5))
    settings = dataclasses.replace(settings_for(stack, records), retry=RetryPolicy(2, 0.05, timeout_s=1))
    files = releases["v2"]
    start = time.monotonic()

    with pytest.raises(PipelineError, match=rf"create .*stream stalled .*{ATTEMPTS}"):
        deploy(load_release(files.modelfile, files.verdict, files.cases), ["v2-stall"], settings, GateParams())

    assert time.monotonic() - start < 10  # 3 attempts of 1 s each, not 3 x 600 s
    assert_v1_still_live(stack, live)


def test_a_push_streaming_progress_forever_is_cut_at_its_deadline(stack, releases, records, live):
    """Each progress line resets a read timeout; only the overall deadline ends it (not retried)."""
    stack.ollama_proxy.add(Fault("POST", "^/api/push", "drip", hold_s=60))
    settings = dataclasses.replace(settings_for(stack, records), deadline_s=8)
    files = releases["v2"]
    release = load_release(files.modelfile, files.verdict, files.cases)
    start = time.monotonic()

    with pytest.raises(PipelineError, match=r"push .*v2-drip: not done within its deadline of 8s; cut"):
        deploy(release, ["v2-drip"], settings, GateParams())

    assert time.monotonic() - start < 40  # the push alone stops at 8 s; before it, staging and the served check
    assert stack.ollama_proxy.count("POST", "^/api/push") == 1
    assert_v1_still_live(stack, live)


# --- malformed answers: one clear error, never a traceback ---


@pytest.mark.parametrize(
    ("method", "path", "body", "message"),
    [
        ("GET", "^/api/version", b'{"v": 1}', r"GET /api/version: the answer's 'version' is missing, expected a str"),
        ("GET", "^/api/version", b"[1, 2]", r"version: the answer is JSON list, not an object"),
        ("GET", "^/api/tags", b'{"models": [{"name": 1}]}', r"GET /api/tags: the answer's 'name' is a int"),
        ("POST", "^/api/chat", b'{"message": "hi"}', r"chat with .*: the answer's 'message' is a str, expected a dict"),
        ("GET", "^/api/tags", b"not json", r"list models: the answer is not JSON: b'not json'"),
    ],
)
def test_a_malformed_ollama_answer_is_one_clear_error(stack, releases, records, live, method, path, body, message):
    stack.ollama_proxy.add(Fault(method, path, "rewrite", rewrite=lambda _: body))

    with pytest.raises(PipelineError, match=message):
        deploy_v2(stack, releases, records, "v2-malformed")

    assert_v1_still_live(stack, live)


def test_a_registry_digest_that_is_not_sha256_hex_is_refused_before_use(stack, releases, records, live):
    """A manifest naming `sha256:../../x` would become a file path in rollback: refused at parse time."""
    stack.registry_proxy.add(
        Fault(
            "GET",
            "/manifests/latest$",
            "rewrite",
            rewrite=lambda b: re.sub(rb'"sha256:[0-9a-f]{64}"', b'"sha256:../../etc/passwd"', b, count=1),
        )
    )

    with pytest.raises(
        PipelineError, match=r"manifest latest: .*digest 'sha256:\.\./\.\./etc/passwd' is not sha256:<64 hex"
    ):
        deploy_v2(stack, releases, records, "v2-bad-name")

    assert_v1_still_live(stack, live)
