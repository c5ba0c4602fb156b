"""runner/register.sh and its config template, rendered without gitlab-runner (DRY_RUN=1 changes nothing)."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REGISTER = ROOT / "runner" / "register.sh"


def register(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "DVC_CACHE_DIR", "HF_HOME")}
    return subprocess.run(["bash", str(REGISTER)], env={**clean, **env}, capture_output=True, text=True, timeout=60)


def test_rendered_config_runs_one_job_on_the_chosen_card_with_the_dvc_cache_outside_the_builds():
    result = register(
        DRY_RUN="1", GITLAB_URL="https://gitlab.example.com", RUNNER_TOKEN="glrt-t0ken", CUDA_VISIBLE_DEVICES="1"
    )
    assert result.returncode == 0, result.stderr
    assert "glrt-t0ken" not in result.stdout  # the dry run never shows the token
    config = tomllib.loads(result.stdout)
    assert config["concurrent"] == 1
    (runner,) = config["runners"]
    assert (runner["url"], runner["executor"], runner["limit"]) == ("https://gitlab.example.com", "shell", 1)
    environment = dict(item.split("=", 1) for item in runner["environment"])
    assert environment["CUDA_VISIBLE_DEVICES"] == "1"
    assert environment["DVC_CACHE_DIR"] == "/srv/dvc-cache"
    assert not environment["DVC_CACHE_DIR"].startswith(runner["builds_dir"] + "/")
    assert environment["GIT_CLEAN_FLAGS"] == "-ffdx -e .dvc/cache -e .cache/"
    assert runner["docker"]["gpus"] == "all"
    assert "/srv/dvc-cache:/srv/dvc-cache" in runner["docker"]["volumes"]
    settings = [line for line in result.stdout.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in settings if "@" in line]  # every placeholder was filled


def test_register_refuses_old_registration_tokens_and_a_cache_inside_the_builds():
    old = register(GITLAB_URL="https://gitlab.example.com", RUNNER_TOKEN="GR1348941abc")
    assert old.returncode == 1
    assert "registration token (deprecated flow)" in old.stderr
    inside = register(
        GITLAB_URL="https://gitlab.example.com", RUNNER_TOKEN="glrt-x", BUILDS_DIR="/srv/b", DVC_CACHE_DIR="/srv/b/dvc"
    )
    assert inside.returncode == 1
    assert "DVC_CACHE_DIR must be outside BUILDS_DIR" in inside.stderr


def test_both_runners_are_rendered_the_candidate_in_a_container_with_read_only_shared_mounts():
    """The protected runner (gpu) and the candidate runner (gpu-candidate): MR code gets a docker executor,
    its own build and cache directories, and the rig's DVC cache and model downloads only read-only."""
    result = register(
        DRY_RUN="1", GITLAB_URL="https://gitlab.example.com", RUNNER_TOKEN="glrt-prot", CANDIDATE_TOKEN="glrt-cand"
    )
    assert result.returncode == 0, result.stderr
    assert "glrt-prot" not in result.stdout and "glrt-cand" not in result.stdout
    protected, candidate = tomllib.loads(result.stdout)["runners"]
    assert (protected["name"], candidate["name"]) == ("gpu-rig", "gpu-rig-candidate")
    assert candidate["executor"] == "docker" and candidate["docker"]["privileged"] is False
    assert candidate["builds_dir"] != protected["builds_dir"]
    volumes = candidate["docker"]["volumes"]
    assert "/srv/dvc-cache:/srv/rig-dvc-cache:ro" in volumes and "/srv/hf:/srv/rig-hf:ro" in volumes
    writable = [v.split(":")[0] for v in volumes if not v.endswith(":ro")]
    shared = {"/srv/dvc-cache", "/srv/hf", protected["builds_dir"]}
    assert writable == ["/srv/gitlab-runner/candidate-cache"] and not any(w in shared for w in writable)
    # the key that signs the train stage's checkpoint records: the protected runner's only, hidden like a token
    keys = [
        dict(item.split("=", 1) for item in r["environment"]).get("LLM_GITOPS_CHECKPOINT_KEY")
        for r in (protected, candidate)
    ]
    assert keys == ["…(hidden)", None]
    same = register(GITLAB_URL="https://gitlab.example.com", RUNNER_TOKEN="glrt-x", CANDIDATE_TOKEN="glrt-x")
    assert same.returncode == 1 and "CANDIDATE_TOKEN must be another runner" in same.stderr
