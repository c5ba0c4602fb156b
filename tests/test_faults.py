"""Faults around the real Ollama and registry while deploying v2 over a live v1: each ends in one clear error
(after retries where retrying is safe), `latest` stays on v1 in the registry and in Ollama, and v1 still answers.

Faults are injected by FaultProxy (tests/servers.py) in front of the real servers, or by stopping/killing the
real server processes at a chosen request.
"""

from __future__ import annotations

import pytest
import requests

from pipeline.common import PipelineError
from pipeline.deploy import deploy, load_release
from pipeline.params import GateParams
from pipeline.release import Record
from tests.servers import Fault
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
