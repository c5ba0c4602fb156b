"""The runner doctor on this machine (no GPU here): every check reports PASS/FAIL/SKIP with a fix, none crashes.

Most checks talk to local doubles that answer as the services' APIs are documented (Ollama
`GET /api/version` -> {"version": ...}; Docker Registry HTTP API v2 `GET /v2/` -> 200 with
`Docker-Distribution-API-Version: registry/2.0`, or 401 with `WWW-Authenticate` when it wants a login).
Whether the registry allows deletes (retention's need) is checked against the real Debian docker-registry,
with deletes on and off. GitLab's runner settings come from tests/gitlab_api_double.py, which follows
GitLab's Runners and Resource group API documentation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from gitlab_api_double import GitLabRigDouble, GitLabState, RigSettings, runner_details

from pipeline import doctor
from tests.servers import RegistryServer

ROOT = Path(__file__).resolve().parent.parent
STATUS_LINE = r"^(PASS|FAIL|SKIP) [a-z-]+: .+"


class Double:
    """A local HTTP server answering GET `path` with (status, headers, JSON body)."""

    def __init__(self, routes: dict[str, tuple[int, dict, object]]):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                status, headers, body = routes.get(self.path, (404, {}, {"errors": [{"code": "NOT_FOUND"}]}))
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_DELETE = do_GET  # unknown paths: 404, as a registry with deletes enabled answers an unknown manifest

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.address = f"127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


OLLAMA = {"/api/version": (200, {}, {"version": "0.12.6"})}
REGISTRY = {"/v2/": (200, {"Docker-Distribution-API-Version": "registry/2.0"}, {})}
REGISTRY_WITH_LOGIN = {
    "/v2/": (
        401,
        {"Docker-Distribution-API-Version": "registry/2.0", "WWW-Authenticate": 'Basic realm="Registry Realm"'},
        {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
    )
}


@pytest.fixture
def services():
    doubles = [Double(OLLAMA), Double(REGISTRY)]
    yield doubles
    for double in doubles:
        double.close()


def closed_port() -> str:
    """An address where nothing listens (bound, then released)."""
    probe = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    address = f"127.0.0.1:{probe.server_address[1]}"
    probe.server_close()
    return address


@pytest.fixture
def dvc_project(tmp_path) -> Path:
    """A DVC project whose default remote is a local directory (as the NAS mount is on the rig)."""
    project, store = tmp_path / "project", tmp_path / "nas-store"
    project.mkdir()
    store.mkdir()
    bin_dir = Path(sys.executable).parent
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([bin_dir / "dvc", "init", "-q"], cwd=project, check=True)
    subprocess.run([bin_dir / "dvc", "remote", "add", "-d", "nas-mount", str(store)], cwd=project, check=True)
    return project


SETTINGS = ("OLLAMA_HOST", "DEPLOY_REGISTRY", "DVC_REMOTE", "GITLAB_TOKEN", "GITLAB_REPORT_TOKEN", "CI_API_V4_URL")


def run_doctor(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in (*SETTINGS, "CI_PROJECT_ID")}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base['PATH']}"
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "pipeline.doctor", *args],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def lines_of(output: str) -> dict[str, str]:
    return {line.split(":")[0].split()[1]: line for line in output.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")}


def test_every_check_reports_on_this_machine_and_a_missing_gpu_fails_with_fixes(services, dvc_project):
    ollama, registry = services
    result = run_doctor(dvc_project, {"OLLAMA_HOST": ollama.address, "DEPLOY_REGISTRY": registry.address})
    assert "Traceback" not in result.stdout + result.stderr
    reported = lines_of(result.stdout)
    assert list(reported) == list(doctor.CHECKS)
    assert reported["ollama"] == f"PASS ollama: http://{ollama.address} 0.12.6"
    assert reported["registry"].startswith(f"PASS registry: http://{registry.address}/v2/ answers")
    assert reported["dvc-remote"].startswith("PASS dvc-remote: nas-mount: ")
    assert reported["disk-builds"].startswith("PASS disk-builds: ") or "want >= 50 GiB" in reported["disk-builds"]
    if shutil.which("nvidia-smi") is None:  # this machine: no GPU, so the run fails, clearly
        assert reported["gpu-driver"] == "FAIL gpu-driver: nvidia-smi not found: no NVIDIA driver on this machine"
        assert reported["torch-cuda"].startswith("FAIL torch-cuda: torch ")
        assert reported["torch-cuda"].endswith("sees no CUDA device")
        assert reported["bitsandbytes"].startswith("SKIP bitsandbytes: no CUDA device")
        assert result.returncode == 1
        assert "     fix: install the NVIDIA driver" in result.stdout
        assert "failed: gpu-driver, torch-cuda" in result.stdout.splitlines()[-1]
    assert reported["gitlab-runners"] == f"SKIP gitlab-runners: {doctor.NO_TOKEN}"  # no token given


def test_unreachable_services_and_a_missing_mount_fail_with_a_fix_each(dvc_project, tmp_path):
    (tmp_path / "nas-store").rmdir()  # the NAS share is not mounted
    dead = closed_port()
    env = {"OLLAMA_HOST": f"http://{dead}", "DEPLOY_REGISTRY": dead}
    result = run_doctor(dvc_project, env, "--only", "dvc-remote", "ollama", "registry")
    assert result.returncode == 1
    reported = lines_of(result.stdout)
    assert reported["dvc-remote"] == f"FAIL dvc-remote: nas-mount: {tmp_path / 'nas-store'} does not exist"
    assert reported["ollama"] == f"FAIL ollama: http://{dead}: ConnectionError"
    assert reported["registry"] == f"FAIL registry: {dead}: https: ConnectionError; http: ConnectionError"
    fixes = [line for line in result.stdout.splitlines() if line.startswith("     fix: ")]
    assert len(fixes) == 3
    assert "mount the NAS share" in fixes[0]


def test_unset_service_variables_fail_and_say_what_to_set(dvc_project):
    result = run_doctor(dvc_project, {}, "--only", "ollama", "registry")
    assert result.returncode == 1
    assert "FAIL ollama: OLLAMA_HOST is not set\n     fix: set OLLAMA_HOST" in result.stdout
    assert "FAIL registry: DEPLOY_REGISTRY is not set\n     fix: set DEPLOY_REGISTRY=host:port" in result.stdout


def test_a_registry_that_wants_a_login_fails_because_ollama_push_cannot_log_in(dvc_project):
    registry = Double(REGISTRY_WITH_LOGIN)
    try:
        result = run_doctor(dvc_project, {"DEPLOY_REGISTRY": registry.address}, "--only", "registry")
    finally:
        registry.close()
    assert result.returncode == 1
    assert f"FAIL registry: http://{registry.address}/v2/ wants authentication" in result.stdout
    assert "`ollama push` cannot log in to a plain registry" in result.stdout


def test_too_little_disk_fails_and_passing_checks_exit_zero(dvc_project):
    full = run_doctor(dvc_project, {}, "--only", "disk-builds", "disk-dvc-cache", "--min-free-gib", "1e9")
    assert full.returncode == 1
    assert "FAIL disk-builds: " in full.stdout
    assert "want >= 1e+09 GiB" in full.stdout
    fine = run_doctor(dvc_project, {}, "--only", "disk-builds", "dvc-remote", "--min-free-gib", "0")
    assert fine.returncode == 0, fine.stdout
    assert fine.stdout.splitlines()[-1] == "2 of 2 checks did not fail"


def test_a_check_that_breaks_is_reported_as_a_failure_not_a_traceback(monkeypatch, capsys):
    def broken(options):
        raise KeyError("nvidia")

    monkeypatch.setitem(doctor.CHECKS, "gpu-driver", broken)
    results = doctor.run_checks(["gpu-driver"], SimpleNamespace(min_free_gib=1))
    assert results[0][1].status == "FAIL"
    assert capsys.readouterr().out.startswith("FAIL gpu-driver: the check itself broke: KeyError: 'nvidia'")


def test_a_bare_ollama_host_means_port_11434_for_the_doctor_as_for_deploy(monkeypatch):
    from pipeline.http_retry import RetryPolicy
    from pipeline.ollama_client import OllamaClient

    asked: list[str] = []

    def fake_get(url: str) -> SimpleNamespace:
        asked.append(url)
        return SimpleNamespace(ok=True, status_code=200, json=lambda: {"version": "0.11.4"})

    monkeypatch.setattr(doctor, "http_get", fake_get)
    monkeypatch.setenv("OLLAMA_HOST", "gpu-box, workstation:8080")
    assert doctor.check_ollama(None) == doctor.passed("http://gpu-box:11434 0.11.4, http://workstation:8080 0.11.4")
    assert asked == ["http://gpu-box:11434/api/version", "http://workstation:8080/api/version"]
    assert OllamaClient("gpu-box", RetryPolicy()).url == "http://gpu-box:11434"


def test_an_ollama_host_that_is_not_a_host_fails_with_the_forms_to_use(monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "ftp://gpu-box")
    result = doctor.check_ollama(None)
    assert result.status == "FAIL"
    assert result.detail == "OLLAMA_HOST: Ollama host 'ftp://gpu-box': expected host, host:port or http(s)://host:port"


# --- through the GitLab API: tests/gitlab_api_double.py answers as GitLab's Runners and Resource group APIs
# are documented (GET /projects/:id/runners?tag_list=, GET /runners/:id, GET /projects/:id/resource_groups/:key)

GITLAB_CHECKS = ("--only", "gitlab-runners", "gitlab-resource-groups")
TOKEN = "glpat-doctor-test"


def gitlab_env(api) -> dict[str, str]:
    return {"GITLAB_TOKEN": TOKEN, "CI_API_V4_URL": api.url, "CI_PROJECT_ID": "ml/llm-gitops"}


def rig_settings(**changes) -> RigSettings:
    """The rig as runner/README.md sets it up: gpu protected, the candidate not, both groups oldest first."""
    settings = {
        "protected": runner_details(12, "gpu-rig", ["gpu"], "ref_protected"),
        "candidate": runner_details(13, "gpu-rig-candidate", ["gpu-candidate"]),
        "groups": {"production": "oldest_first", "gpu-rig": "oldest_first"},
        **changes,
    }
    other = runner_details(14, "shared cpu", ["cpu"])
    return RigSettings([settings["protected"], settings["candidate"], other], settings["groups"])


def gitlab_state() -> GitLabState:
    return GitLabState(token=TOKEN, user={"id": 5, "username": "maintainer"})


def test_gitlab_settings_pass_when_only_protected_runners_carry_gpu_and_deploys_run_oldest_first(dvc_project):
    state = gitlab_state()
    with GitLabRigDouble(state, rig_settings()) as api:
        result = run_doctor(dvc_project, gitlab_env(api), *GITLAB_CHECKS)
    assert result.returncode == 0, result.stdout + result.stderr
    reported = lines_of(result.stdout)
    assert reported["gitlab-runners"] == (
        "PASS gitlab-runners: gpu: runner #12 (gpu-rig) protected; "
        "gpu-candidate: runner #13 (gpu-rig-candidate), without gpu"
    )
    assert reported["gitlab-resource-groups"] == (
        "PASS gitlab-resource-groups: production oldest_first, gpu-rig oldest_first"
    )
    assert ("GET", "/api/v4/projects/ml%2Fllm-gitops/runners?tag_list=gpu") in state.requests
    assert ("GET", "/api/v4/runners/12") in state.requests
    assert ("GET", "/api/v4/projects/ml%2Fllm-gitops/resource_groups/production") in state.requests
    assert TOKEN not in result.stdout + result.stderr


def test_an_unprotected_gpu_runner_a_candidate_with_the_gpu_tag_and_unordered_deploys_fail(dvc_project):
    rig = rig_settings(
        protected=runner_details(12, "gpu-rig", ["gpu"], "not_protected"),
        candidate=runner_details(13, "gpu-rig-candidate", ["gpu-candidate", "gpu"]),
        groups={"production": "unordered"},
    )
    with GitLabRigDouble(gitlab_state(), rig) as api:
        result = run_doctor(dvc_project, gitlab_env(api), *GITLAB_CHECKS)
    assert result.returncode == 1
    reported = lines_of(result.stdout)
    assert reported["gitlab-runners"] == (
        "FAIL gitlab-runners: runner #12 (gpu-rig) has tag gpu but is not protected (access_level not_protected): "
        "a merge request's job could run on it; "
        "runner #13 (gpu-rig-candidate) has tag gpu but is not protected (access_level not_protected): "
        "a merge request's job could run on it; "
        "runner #13 (gpu-rig-candidate) has both gpu-candidate and gpu: merge request code could run where "
        "the protected jobs run"
    )
    assert reported["gitlab-resource-groups"] == (
        "FAIL gitlab-resource-groups: production: process_mode unordered, want oldest_first; "
        "gpu-rig: no such resource group yet (GitLab creates it when its first job runs)"
    )
    fixes = [line for line in result.stdout.splitlines() if line.startswith("     fix: ")]
    assert fixes[0].startswith("     fix: in GitLab (Settings > CI/CD > Runners")
    assert "process_mode=oldest_first" in fixes[1]


def test_no_gpu_runner_and_a_protected_candidate_fail(dvc_project):
    rig = RigSettings([runner_details(13, "gpu-rig-candidate", ["gpu-candidate"], "ref_protected")], {})
    with GitLabRigDouble(gitlab_state(), rig) as api:
        result = run_doctor(dvc_project, gitlab_env(api), "--only", "gitlab-runners")
    assert lines_of(result.stdout)["gitlab-runners"] == (
        "FAIL gitlab-runners: no runner of this project has tag gpu; "
        "runner #13 (gpu-rig-candidate) (gpu-candidate) is protected: merge requests never get it"
    )


def test_a_refused_token_and_an_unknown_project_are_one_line_each_with_a_fix(dvc_project):
    with GitLabRigDouble(gitlab_state(), rig_settings()) as api:
        refused = run_doctor(dvc_project, {**gitlab_env(api), "GITLAB_TOKEN": "glpat-wrong"}, *GITLAB_CHECKS)
        unknown = run_doctor(dvc_project, {**gitlab_env(api), "CI_PROJECT_ID": "999"}, *GITLAB_CHECKS)
    assert "Traceback" not in refused.stderr + unknown.stderr
    assert lines_of(refused.stdout)["gitlab-runners"] == "FAIL gitlab-runners: GitLab API: HTTP 401: 401 Unauthorized"
    assert "     fix: the token is invalid or expired" in refused.stdout
    assert "glpat-wrong" not in refused.stdout + refused.stderr
    assert lines_of(unknown.stdout)["gitlab-resource-groups"] == (
        "FAIL gitlab-resource-groups: GitLab API: HTTP 404: 404 Project Not Found"
    )


def test_the_doctor_checks_the_tags_and_resource_groups_that_gitlab_ci_yml_uses():
    ci = yaml.safe_load((ROOT / ".gitlab-ci.yml").read_text())
    assert ci[".rig"]["tags"] == [doctor.PROTECTED_TAG] and ci[".candidate"]["tags"] == [doctor.CANDIDATE_TAG]
    groups = {job["resource_group"] for job in ci.values() if isinstance(job, dict) and "resource_group" in job}
    assert groups == set(doctor.RESOURCE_GROUPS)


@pytest.mark.parametrize("delete", [True, False], ids=["deletes-enabled", "deletes-disabled"])
def test_the_registry_check_says_whether_retention_can_delete(dvc_project, registry_binary, tmp_path, delete):
    """Against Debian's docker-registry (distribution 2.8): with `storage.delete.enabled: false` a DELETE of
    a manifest answers 405 UNSUPPORTED, and the doctor says how to turn deletes on."""
    registry = RegistryServer(registry_binary, tmp_path / "registry", delete=delete)
    registry.start()
    try:
        result = run_doctor(dvc_project, {"DEPLOY_REGISTRY": registry.address}, "--only", "registry")
    finally:
        registry.stop()

    answers = f"http://{registry.address}/v2/ answers (Docker registry API v2, no authentication)"
    if delete:
        assert result.returncode == 0
        assert f"PASS registry: {answers}; deletes enabled" in result.stdout
    else:
        assert result.returncode == 1
        assert f"FAIL registry: {answers}, but refuses deletes (HTTP 405)" in result.stdout
        assert "fix: the registry has deletes disabled; enable them with `storage: delete: enabled: true`" in (
            result.stdout
        )
        assert "REGISTRY_STORAGE_DELETE_ENABLED=true" in result.stdout
