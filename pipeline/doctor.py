"""Is this machine ready to be the GPU runner? One line per check, with a fix for each failure.

    python -m pipeline.doctor [--min-free-gib 50] [--only NAME ...]

Each check prints `PASS|FAIL|SKIP name: detail`, a failure adds `  fix: ...`. The exit status is 1 when a
check fails, 0 otherwise; a check that cannot run reports why instead of a traceback. Reads the runner's
environment: CUDA_VISIBLE_DEVICES, CI_BUILDS_DIR, DVC_CACHE_DIR, OLLAMA_HOST (comma-separated hosts),
DEPLOY_REGISTRY (host:port). With GITLAB_TOKEN (Maintainer role, read_api), CI_API_V4_URL and CI_PROJECT_ID
it also checks through the GitLab API that the `gpu` runners are protected, that the candidate runner does
not carry the `gpu` tag, and that the resource groups process jobs oldest first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.common import PipelineError, run_cli
from pipeline.gitlab_api import gitlab_settings
from pipeline.ollama_client import host_url, hosts_from_env
from pipeline.registry_client import DELETE_DISABLED, PROBE_DIGEST

TIMEOUT_S = 5
PROBE_TIMEOUT_S = 180  # importing torch and initialising CUDA can take a while on a cold machine


@dataclass(frozen=True)
class Result:
    status: str  # PASS | FAIL | SKIP
    detail: str
    fix: str = ""


def passed(detail: str) -> Result:
    return Result("PASS", detail)


def failed(detail: str, fix: str) -> Result:
    return Result("FAIL", detail, fix)


def skipped(detail: str) -> Result:
    return Result("SKIP", detail)


def command(args: list[str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess | None:
    """The finished process, or None when the program is missing; a hang becomes exit status 124."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return None
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, 124, "", f"timed out after {timeout:g} s")


def last_line(process: subprocess.CompletedProcess) -> str:
    lines = (process.stderr or process.stdout).strip().splitlines()
    return lines[-1][:300] if lines else f"exit status {process.returncode}"


# --- GPU ---


def check_driver(options) -> Result:
    query = "--query-gpu=index,name,driver_version,memory.total"
    process = command(["nvidia-smi", query, "--format=csv,noheader"])
    if process is None:
        return failed(
            "nvidia-smi not found: no NVIDIA driver on this machine",
            "install the NVIDIA driver (Debian: apt install nvidia-driver; or the CUDA repository's "
            "cuda-drivers), reboot, and check that `nvidia-smi` lists the card",
        )
    if process.returncode != 0:
        return failed(
            f"nvidia-smi failed: {last_line(process)}",
            "the driver does not talk to the card: reboot after a driver update, or match the kernel module "
            "and the user-space driver versions (dmesg | grep -i nvidia)",
        )
    gpus = [line.strip() for line in process.stdout.strip().splitlines()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    chosen = f"; CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "; CUDA_VISIBLE_DEVICES unset (all cards)"
    return passed(" | ".join(gpus) + chosen)


TORCH_PROBE = """
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA device")
index = torch.cuda.current_device()
major, minor = torch.cuda.get_device_capability(index)
x = torch.ones(256, 256, device="cuda")
assert float((x @ x)[0, 0]) == 256.0
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s), "
      f"using {torch.cuda.get_device_name(index)} (sm_{major}{minor}), bf16 {torch.cuda.is_bf16_supported()}")
"""


def check_torch(options) -> Result:
    process = command([sys.executable, "-c", TORCH_PROBE], timeout=PROBE_TIMEOUT_S)
    if process is None or process.returncode != 0:
        return failed(
            last_line(process) if process else "cannot start Python",
            "install a CUDA build of torch that the driver supports (`make setup` on the rig; the driver's "
            "CUDA version in `nvidia-smi` must be >= torch.version.cuda), and check CUDA_VISIBLE_DEVICES",
        )
    return passed(process.stdout.strip())


BNB_PROBE = """
import torch
if not torch.cuda.is_available():
    raise SystemExit(3)
import bitsandbytes
import bitsandbytes.functional as F
weights = torch.randn(64, 64, device="cuda", dtype=torch.float16)
packed, state = F.quantize_4bit(weights, quant_type="nf4")
error = (F.dequantize_4bit(packed, state) - weights).abs().mean().item()
assert error < 0.2, error
print(f"bitsandbytes {bitsandbytes.__version__}: NF4 round trip on CUDA, mean error {error:.3f}")
"""


def check_bitsandbytes(options) -> Result:
    process = command([sys.executable, "-c", BNB_PROBE], timeout=PROBE_TIMEOUT_S)
    if process is not None and process.returncode == 3:
        return skipped("no CUDA device for torch (see the torch check): QLoRA's 4-bit kernels need one")
    if process is None or process.returncode != 0:
        return failed(
            last_line(process) if process else "cannot start Python",
            "reinstall bitsandbytes for this CUDA (`make setup`); `python -m bitsandbytes` prints its diagnosis",
        )
    return passed(process.stdout.strip())


# --- disk ---


def dvc_cache_dir() -> Path:
    configured = os.environ.get("DVC_CACHE_DIR")
    if configured:
        return Path(configured)
    process = command(["dvc", "cache", "dir"], timeout=30)
    if process is not None and process.returncode == 0 and process.stdout.strip():
        return Path(process.stdout.strip())
    return Path(".dvc/cache")


def free_space(name: str, path: Path, min_gib: float) -> Result:
    existing = next((p for p in [path, *path.resolve().parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free / 2**30
    where = str(path) if existing == path else f"{path} (not created yet; measured at {existing})"
    if free < min_gib:
        return failed(
            f"{free:.1f} GiB free in {where}, want >= {min_gib:g} GiB",
            f"free space on that filesystem, or move {name} to a larger disk (runner/README.md)",
        )
    return passed(f"{free:.1f} GiB free in {where}")


def check_build_disk(options) -> Result:
    return free_space("the builds directory", Path(os.environ.get("CI_BUILDS_DIR") or Path.cwd()), options.min_free_gib)


def check_cache_disk(options) -> Result:
    return free_space("DVC_CACHE_DIR", dvc_cache_dir(), options.min_free_gib)


# --- services ---

DEFAULT_PORTS = {"ssh": 22, "http": 80, "https": 443, "webdav": 80, "webdavs": 443}


def reachable(host: str, port: int) -> str | None:
    """None when a TCP connection opens, else why not."""
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S):
            return None
    except OSError as error:
        return f"{type(error).__name__}: {error.strerror or error}"


def dvc_config() -> dict[str, str] | Result:
    """`dvc config --list`: every level (repo, then local) as key=value lines, a later level overriding."""
    listed = command(["dvc", "config", "--list"], timeout=30)
    if listed is None:
        return failed("dvc not found", "run inside the project's virtualenv (`make setup`; source .ci/env)")
    if listed.returncode != 0:
        return failed(last_line(listed), "run the doctor from the project's checkout (where .dvc/ is)")
    return dict(line.split("=", 1) for line in listed.stdout.splitlines() if "=" in line)


def check_dvc_remote(options) -> Result:
    config = dvc_config()
    if isinstance(config, Result):
        return config
    remotes = {key[7:-4]: value for key, value in config.items() if key.startswith("remote.") and key.endswith(".url")}
    name = os.environ.get("DVC_REMOTE") or config.get("core.remote", "")
    if not name or name not in remotes:
        return failed(
            f"no default DVC remote (configured: {', '.join(remotes) or 'none'})",
            "dvc remote default <name>, or set DVC_REMOTE in the runner's environment",
        )
    url = remotes[name]
    parts = urlsplit(url)
    if parts.scheme in ("", "file"):
        path = Path(parts.path if parts.scheme else url)
        if not path.is_dir():
            return failed(
                f"{name}: {path} does not exist",
                "mount the NAS share there (NFS/SMB, e.g. in /etc/fstab) or point the remote at the mount: "
                f"dvc remote modify --local {name} url <path>",
            )
        if not os.access(path, os.W_OK):
            return failed(f"{name}: {path} is not writable", "give the runner's user write access to the share")
        return passed(f"{name}: {path} (local path, writable)")
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return skipped(f"{name}: {url}: not checked ({parts.scheme} remotes are tested by `dvc push` itself)")
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    problem = reachable(parts.hostname, port)
    if problem:
        return failed(
            f"{name}: {parts.hostname}:{port} unreachable ({problem})",
            "check the NAS's address, that its SSH/WebDAV service is on, and the firewall",
        )
    return passed(f"{name}: {parts.hostname}:{port} reachable (TCP; credentials are tested by `dvc push`)")


def http_get(url: str):
    import requests

    return requests.get(url, timeout=TIMEOUT_S)


def check_ollama(options) -> Result:
    hosts = hosts_from_env(os.environ)
    if not hosts:
        return failed("OLLAMA_HOST is not set", "set OLLAMA_HOST (comma-separated, e.g. http://gpu-box:11434)")
    results = []
    for host in hosts:
        try:
            base = host_url(host)  # deploy's reading of it: a bare host means port 11434
        except PipelineError as error:
            return failed(f"OLLAMA_HOST: {error}", "use host, host:port or http://host:port, comma-separated")
        try:
            response = http_get(f"{base}/api/version")
            version = response.json().get("version") if response.ok else None
        except Exception as error:  # connection refused, DNS, not JSON: all mean "not an Ollama here"
            return failed(
                f"{base}: {type(error).__name__}",
                "start Ollama there (systemctl start ollama) and listen beyond localhost (OLLAMA_HOST=0.0.0.0)",
            )
        if not version:
            return failed(f"{base}/api/version: HTTP {response.status_code}, no version", "is this an Ollama server?")
        results.append(f"{base} {version}")
    return passed(", ".join(results))


def check_registry(options) -> Result:
    registry = os.environ.get("DEPLOY_REGISTRY", "").strip()
    if not registry:
        return failed("DEPLOY_REGISTRY is not set", "set DEPLOY_REGISTRY=host:port (a protected CI variable)")
    problems = []
    for scheme in ("https", "http"):
        try:
            response = http_get(f"{scheme}://{registry}/v2/")
        except Exception as error:  # TLS on a plain-HTTP registry, refused, DNS
            problems.append(f"{scheme}: {type(error).__name__}")
            continue
        if response.status_code == 200:
            return registry_deletes(f"{scheme}://{registry}")
        if response.status_code == 401:
            return failed(
                f"{scheme}://{registry}/v2/ wants authentication",
                "`ollama push` cannot log in to a plain registry: allow anonymous push from the rig "
                "(network-restricted), or deploy without the registry",
            )
        problems.append(f"{scheme}: HTTP {response.status_code}")
    return failed(f"{registry}: {'; '.join(problems)}", "start the registry (docker run -p 5000:5000 registry:2)")


# --- GitLab: the trust boundary as GitLab holds it (runner settings live in GitLab, not on this machine) ---

PROTECTED_TAG = "gpu"  # .gitlab-ci.yml's .rig: retrain, commit-lock, deploy, rollback, the sweep
CANDIDATE_TAG = "gpu-candidate"  # .gitlab-ci.yml's .candidate: merge request candidates
RESOURCE_GROUPS = ("production", "gpu-rig")  # .gitlab-ci.yml's resource_group values
NO_TOKEN = "no GITLAB_TOKEN (with CI_API_V4_URL and CI_PROJECT_ID): not checked through the GitLab API"
RUNNER_FIX = (
    f"in GitLab (Settings > CI/CD > Runners, edit the runner; or PUT /runners/:id): every `{PROTECTED_TAG}` "
    f"runner Protected (access_level ref_protected); the candidate runner tagged `{CANDIDATE_TAG}` only, "
    "not protected (runner/README.md)"
)
API_FIXES = {
    401: "the token is invalid or expired: use a project access token with read_api",
    403: "the token needs the Maintainer role and read_api (runner settings are for maintainers)",
    404: "check CI_API_V4_URL and CI_PROJECT_ID, and that the token's user is a member of the project",
}


def gitlab_project():
    """(python-gitlab client, the project, not fetched), or None without a token."""
    settings = gitlab_settings(dict(os.environ))
    if settings is None:
        return None
    import gitlab

    client = gitlab.Gitlab(settings.url, private_token=settings.token, timeout=TIMEOUT_S)
    return client, client.projects.get(settings.project, lazy=True)


def api_failure(error: Exception) -> Result:
    """One line for a refused or failed request (GitLab's message, never the token)."""
    import gitlab

    if isinstance(error, gitlab.GitlabError):
        fix = API_FIXES.get(error.response_code, "see GitLab's answer above")
        return failed(f"GitLab API: HTTP {error.response_code}: {error.error_message}", fix)
    return failed(f"GitLab API: {type(error).__name__}", "check CI_API_V4_URL: is GitLab reachable from here?")


def describe_runner(runner: dict) -> str:
    return f"runner #{runner.get('id')} ({runner.get('description') or 'no description'})"


def runner_problems(protected: list[dict], candidates: list[dict]) -> list[str]:
    """What breaks the boundary, from the runners' details (GET /runners/:id) found by tag."""
    problems = [] if protected else [f"no runner of this project has tag {PROTECTED_TAG}"]
    for runner in protected:
        if runner.get("access_level") != "ref_protected":
            problems.append(
                f"{describe_runner(runner)} has tag {PROTECTED_TAG} but is not protected "
                f"(access_level {runner.get('access_level')}): a merge request's job could run on it"
            )
    for runner in candidates:
        if PROTECTED_TAG in (runner.get("tag_list") or []):
            problems.append(
                f"{describe_runner(runner)} has both {CANDIDATE_TAG} and {PROTECTED_TAG}: merge request code "
                "could run where the protected jobs run"
            )
        if runner.get("access_level") == "ref_protected":
            problems.append(f"{describe_runner(runner)} ({CANDIDATE_TAG}) is protected: merge requests never get it")
    return problems


def check_gitlab_runners(options) -> Result:
    connected = gitlab_project()
    if connected is None:
        return skipped(NO_TOKEN)
    client, project = connected
    try:
        found = {
            tag: [client.runners.get(r.id).attributes for r in project.runners.list(tag_list=[tag], get_all=True)]
            for tag in (PROTECTED_TAG, CANDIDATE_TAG)
        }
    except Exception as error:  # refused, unreachable: one line, not a traceback
        return api_failure(error)
    problems = runner_problems(found[PROTECTED_TAG], found[CANDIDATE_TAG])
    if problems:
        return failed("; ".join(problems), RUNNER_FIX)
    candidates = ", ".join(describe_runner(r) for r in found[CANDIDATE_TAG]) or "none (no candidate training)"
    protected = ", ".join(describe_runner(r) for r in found[PROTECTED_TAG])
    return passed(f"{PROTECTED_TAG}: {protected} protected; {CANDIDATE_TAG}: {candidates}, without {PROTECTED_TAG}")


def check_gitlab_resource_groups(options) -> Result:
    import gitlab

    connected = gitlab_project()
    if connected is None:
        return skipped(NO_TOKEN)
    _, project = connected
    modes, problems = [], []
    for key in RESOURCE_GROUPS:
        try:
            mode = project.resource_groups.get(key).attributes.get("process_mode")
        except gitlab.GitlabGetError as error:
            if error.response_code != 404 or "Project" in str(error.error_message):
                return api_failure(error)
            problems.append(f"{key}: no such resource group yet (GitLab creates it when its first job runs)")
            continue
        except Exception as error:
            return api_failure(error)
        modes.append(f"{key} {mode}")
        if mode != "oldest_first":
            problems.append(f"{key}: process_mode {mode}, want oldest_first")
    if problems:
        return failed(
            "; ".join(problems),
            "PUT /projects/:id/resource_groups/<key> with process_mode=oldest_first (once the group exists), so "
            "a queued older deploy never runs after a newer one and moves `latest` back",
        )
    return passed(", ".join(modes))


def registry_deletes(base: str) -> Result:
    """Retention deletes old versions' manifests: a DELETE of a digest no manifest has changes nothing and
    answers 404 MANIFEST_UNKNOWN when deletes are enabled, 405 UNSUPPORTED when not."""
    import requests

    answers = f"{base}/v2/ answers (Docker registry API v2, no authentication)"
    response = requests.delete(f"{base}/v2/doctor/probe/manifests/{PROBE_DIGEST}", timeout=TIMEOUT_S)
    if response.status_code == 405:
        return failed(f"{answers}, but refuses deletes (HTTP 405): retention cannot remove versions", DELETE_DISABLED)
    if response.status_code != 404:
        return failed(f"{answers}; a DELETE of a manifest answers HTTP {response.status_code}", DELETE_DISABLED)
    return passed(f"{answers}; deletes enabled (retention can remove old versions)")


CHECKS: dict[str, Callable] = {
    "gpu-driver": check_driver,
    "torch-cuda": check_torch,
    "bitsandbytes": check_bitsandbytes,
    "disk-builds": check_build_disk,
    "disk-dvc-cache": check_cache_disk,
    "dvc-remote": check_dvc_remote,
    "ollama": check_ollama,
    "registry": check_registry,
    "gitlab-runners": check_gitlab_runners,
    "gitlab-resource-groups": check_gitlab_resource_groups,
}


def run_checks(names: list[str], options) -> list[tuple[str, Result]]:
    results = []
    for name in names:
        try:
            result = CHECKS[name](options)
        except Exception as error:  # a check must never end the doctor
            result = failed(f"the check itself broke: {type(error).__name__}: {error}", "report this as a bug")
        results.append((name, result))
        print(f"{result.status} {name}: {result.detail}", flush=True)
        if result.fix:
            print(f"     fix: {result.fix}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.doctor", description=__doc__.split("\n")[0])
    parser.add_argument("--min-free-gib", type=float, default=50, help="free space wanted per disk (default 50)")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), help="run only these checks")
    args = parser.parse_args(argv)
    results = run_checks(args.only or list(CHECKS), args)
    failures = [name for name, result in results if result.status == "FAIL"]
    print(
        f"{len(results) - len(failures)} of {len(results)} checks did not fail"
        + (f"; failed: {', '.join(failures)}" if failures else "")
    )
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
