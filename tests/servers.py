"""Real servers for the deploy tests: Ollama built from source, Debian's docker-registry, a fault proxy.

- Ollama v0.11.4, built once per machine with `go install` (Go's module and build caches keep it; the
  binary lands in `$(go env GOBIN)` or `$(go env GOPATH)/bin`). v0.11.4 is the last release whose module
  zip builds as is (later ones keep C headers under a `vendor/` directory that module zips drop, and from
  0.30 the engine needs a CMake build that fetches llama.cpp). `-ldflags -X ...version.Version` makes it
  report its version (a plain `go install` says 0.0.0, which deploy refuses). First build here: 4m45s
  on 2 cores; a rebuild with a warm cache (only the link): 10s.
- Other releases for the deploy and rollback tests: OLLAMA_TEST_VERSIONS (e.g. 0.17.4, whose module zip lacks
  llama.cpp's vendored headers: they are laid over its source from the tag, sha256-pinned; README "Ollama
  versions" has what runs and what does not).
- The registry: Debian's `docker-registry` (distribution 2.8, what `registry:2` runs), apt-installed if
  missing, started on 127.0.0.1 with a temporary storage directory and no auth.
- FaultProxy: a small HTTP proxy in front of either, forwarding byte for byte (the `Host` header too, so the
  registry's absolute upload `Location`s point back at the proxy) and injecting faults on request: an HTTP
  5xx, a stream cut after its first line, a rewritten body (wrong digest), a hook that stops a server.
  It records every request it sees, so tests can prove what was (not) sent.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

OLLAMA_VERSION = "0.11.4"
OLLAMA_MODULE = "github.com/ollama/ollama"
PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def go_bin_dir() -> Path:
    gobin = subprocess.run(["go", "env", "GOBIN"], capture_output=True, text=True, check=True).stdout.strip()
    if gobin:
        return Path(gobin)
    gopath = subprocess.run(["go", "env", "GOPATH"], capture_output=True, text=True, check=True).stdout.strip()
    return Path(gopath.split(os.pathsep)[0]) / "bin"


# sha256 of the binaries the build below gives (Go's builds are reproducible for one toolchain, and with
# -trimpath for any GOPATH): a cached binary is run only if it is one of these, never because it prints the
# right version (any script can). Another Go toolchain builds another binary: add its digest here after
# building it once from the source.
OLLAMA_SHA256 = {
    "ed481198e0c199ed35d60ec56156715698d3143428bd06a2e1fee0d8a89a8ac2",  # v0.11.4, -trimpath, go1.26.8 linux/amd64
    # v0.17.4 with its vendored headers, built with -trimpath, go1.26.8 linux/amd64
    "51dd9e7215a0723efe64dfae7d2ef653df6fe482ad5f662e1b4b93c62f2edd96",
}


def trusted_ollama(binary: Path, pinned: set[str] = OLLAMA_SHA256) -> bool:
    """Whether `binary` is a pinned Ollama build (by its sha256; its own output proves nothing)."""
    import hashlib

    return binary.is_file() and hashlib.sha256(binary.read_bytes()).hexdigest() in pinned


# The releases the deploy and rollback tests run against (README "Ollama versions"): OLLAMA_VERSION, which
# every other test uses, and those OLLAMA_TEST_VERSIONS adds (comma-separated; buildable and passing: 0.17.4.
# Not in the default: its first build takes 35 min on 2 cores and needs four headers from GitHub).
OLLAMA_VERSIONS = tuple(
    dict.fromkeys([OLLAMA_VERSION, *filter(None, os.environ.get("OLLAMA_TEST_VERSIONS", "").split(","))])
)
TOOL_CACHE = Path(os.environ.get("LLM_GITOPS_CACHE", Path.home() / ".cache" / "llm-gitops"))
# Files a release's build needs that its module zip lacks: Go leaves every `vendor/` directory out of module
# zips, and llama.cpp keeps headers (nlohmann/json, stb_image, miniaudio) in llama/llama.cpp/vendor/. Taken
# from the release's git tree at its tag, checked by sha256, kept in the tool cache (ollama-vendor/<version>/),
# and laid over the module's source (checked by Go's checksum database) before `go build`.
VENDORED = "llama/llama.cpp/vendor/"
VENDORED_HEADERS = {
    "0.17.4": {
        VENDORED + "miniaudio/miniaudio.h": "05b75871465913f1e3f5b05f0dcca1d487f3099e653477e071acc40317e68f38",
        VENDORED + "nlohmann/json.hpp": "aaf127c04cb31c406e5b04a63f1ae89369fccde6d8fa7cdda1ed4f32dfc5de63",
        VENDORED + "nlohmann/json_fwd.hpp": "fb6aa70cbece087f37ab4685c182b287c53be54f785f981b9db9d30d2d028b37",
        VENDORED + "stb/stb_image.h": "594c2fe35d49488b4382dbfaec8f98366defca819d916ac95becf3e75f4200b3",
    },
}


def _sha256_file(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def vendored_header(version: str, path: str, sha256: str) -> Path:
    """A header of `version`'s git tree from the tool cache, else downloaded from the tag; sha256-checked."""
    cached = TOOL_CACHE / "ollama-vendor" / version / path
    if cached.is_file() and _sha256_file(cached) == sha256:
        return cached
    url = f"https://raw.githubusercontent.com/ollama/ollama/v{version}/{path}"
    try:
        response = requests.get(url, timeout=60)
        response.raise_for_status()
    except requests.RequestException as error:
        pytest.skip(
            f"Ollama {version} needs {path} from its git tag, which its module zip lacks: not in the tool cache and "
            f"not downloadable here ({type(error).__name__}); put the file of tag v{version} at {cached}"
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(response.content)
    if _sha256_file(cached) != sha256:
        cached.unlink()
        pytest.fail(f"{url}: sha256 is not the pinned {sha256}")
    return cached


def ensure_ollama(version: str = OLLAMA_VERSION) -> Path:
    """The `ollama` binary of `version`, built from the Go module proxy if missing or not pinned (minutes
    the first time; with Go's build cache, seconds). A binary built here from the module (checked by Go's
    checksum database) is trusted; one found in the cache only if its sha256 is pinned. A release listed in
    VENDORED_HEADERS is built from a copy of its module source with those headers laid over it."""
    if version in VENDORED_HEADERS:
        return _build_with_headers(version)
    binary = go_bin_dir() / "ollama"
    if trusted_ollama(binary):
        return binary
    command = [
        "go",
        "install",
        "-trimpath",  # without it the binary holds GOPATH's paths, and each cache location builds another
        "-ldflags",
        f"-X {OLLAMA_MODULE}/version.Version={version}",
        f"{OLLAMA_MODULE}@v{version}",
    ]
    _go(command, version, None)
    return binary


def _go(command: list[str], version: str, cwd: Path | None) -> None:
    start = time.monotonic()
    build = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env={**os.environ, "CGO_ENABLED": "1"})
    if build.returncode != 0:
        pytest.fail(f"building Ollama {version} failed:\n{build.stderr[-3000:]}")
    print(f"built Ollama {version} in {time.monotonic() - start:.0f}s")


def _build_with_headers(version: str) -> Path:
    import json

    home = TOOL_CACHE / f"ollama-{version}"
    binary = home / "ollama"
    if trusted_ollama(binary):
        return binary
    headers = {path: vendored_header(version, path, sha) for path, sha in VENDORED_HEADERS[version].items()}
    download = subprocess.run(
        ["go", "mod", "download", "-json", f"{OLLAMA_MODULE}@v{version}"], capture_output=True, text=True
    )
    if download.returncode != 0:
        pytest.fail(f"go mod download of Ollama {version} failed:\n{download.stdout[-2000:]}{download.stderr[-2000:]}")
    source = home / "src"
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(json.loads(download.stdout)["Dir"], source)
    for path, header in headers.items():
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(header, source / path)
    for path in source.rglob("*"):  # the module cache is read-only; go build writes nothing there, but rmtree must
        path.chmod(path.stat().st_mode | 0o200)
    ldflags = f"-X {OLLAMA_MODULE}/version.Version={version}"
    _go(["go", "build", "-trimpath", "-ldflags", ldflags, "-o", str(binary), "."], version, source)
    return binary


def ensure_registry() -> Path:
    """Debian's docker-registry (distribution registry 2.8), apt-installed if missing (CI runs as root)."""
    found = shutil.which("docker-registry")
    if found:
        return Path(found)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "docker-registry"]
    if subprocess.run(install, capture_output=True, env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, check=True)
        subprocess.run(install, capture_output=True, env=env, check=True)
    return Path(shutil.which("docker-registry") or "/usr/bin/docker-registry")


def _client_env(port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_ENV}
    return {**env, "OLLAMA_HOST": f"127.0.0.1:{port}", "NO_PROXY": "127.0.0.1,localhost"}


def _wait_until(ready: Callable[[], bool], what: str, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if ready():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start within {timeout_s}s:\n{log.read_text()[-2000:]}")


class Server:
    """A server process of ours: started, stopped (SIGTERM) or killed (SIGKILL), restarted with the same state."""

    name = "server"

    def __init__(self, binary: Path, workdir: Path):
        self.binary, self.workdir = binary, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.log = workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k not in PROXY_ENV}

    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            # its own process group: `ollama serve` starts `ollama runner` children that must go with it
            self.process = subprocess.Popen(
                self.command(), env=self.env(), stdout=log, stderr=log, cwd=self.workdir, start_new_session=True
            )
        _wait_until(self.ready, self.name, self.log)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the server; then nothing of its process group (model runners) outlives it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class OllamaServer(Server):
    name = "ollama"

    def __init__(self, binary: Path, workdir: Path):
        super().__init__(binary, workdir)
        self.models = workdir / "models"
        self.models.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        return [str(self.binary), "serve"]

    def env(self) -> dict[str, str]:
        return {**_client_env(self.port), "OLLAMA_MODELS": str(self.models), "OLLAMA_NUM_PARALLEL": "1"}

    def ready(self) -> bool:
        return requests.get(f"http://{self.address}/api/version", timeout=2).ok

    def cli(self, *args: str, timeout: float = 120, host: str | None = None) -> subprocess.CompletedProcess:
        """The `ollama` command line as a user runs it against this server (or `host`)."""
        env = {**_client_env(self.port), "OLLAMA_HOST": host or self.address}
        return subprocess.run([str(self.binary), *args], env=env, capture_output=True, text=True, timeout=timeout)


class RegistryServer(Server):
    name = "registry"

    def __init__(self, binary: Path, workdir: Path, delete: bool = True):
        super().__init__(binary, workdir)
        self.storage = workdir / "storage"
        self.config = workdir / "config.yml"
        # deletes enabled, as retention needs (the doctor's test runs one without)
        self.config.write_text(
            "version: 0.1\nlog:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            f"  delete:\n    enabled: {'true' if delete else 'false'}\n"
            f"http:\n  addr: {self.address}\n"
        )
        self.read_only = False  # restarted with storage.maintenance.readonly (as for garbage-collect)

    def env(self) -> dict[str, str]:
        readonly = {"REGISTRY_STORAGE_MAINTENANCE_READONLY": '{"enabled":true}'} if self.read_only else {}
        return {**super().env(), **readonly}

    def command(self) -> list[str]:
        return [str(self.binary), "serve", str(self.config)]

    def ready(self) -> bool:
        return requests.get(f"http://{self.address}/v2/", timeout=2).status_code == 200


# --- fault proxy ---

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class Fault:
    method: str
    path: str  # regular expression searched in the request path
    # "status" | "cut" (after the first streamed line) | "rewrite" (response body) | "corrupt" | "before" |
    # "stall" (after the first streamed line, silence for hold_s) | "drip" (the first line again every
    # 0.2 s, for hold_s: a server streaming progress forever)
    kind: str
    status: int = 503
    times: int | None = None  # how many matching requests it hits; None: all
    skip: int = 0  # matching requests let through untouched before it starts hitting
    hook: Callable[[], None] | None = None  # "before": run before forwarding; "cut": run after the first line
    rewrite: Callable[[bytes], bytes] | None = None
    body: str | None = None  # also a regular expression the request body must contain (e.g. a copy's destination)
    hold_s: float = 30.0


class FaultProxy:
    """Forwards to 127.0.0.1:<upstream port>; faults added with `add` hit matching requests."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.faults: list[Fault] = []
        self.seen: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self.server.daemon_threads = True
        self.server.proxy = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()
            self.seen.clear()

    def count(self, method: str, path: str = "") -> int:
        with self.lock:
            return sum(1 for m, p in self.seen if m == method and re.search(path, p))

    def _match(self, method: str, path: str, body: bytes = b"") -> Fault | None:
        with self.lock:
            self.seen.append((method, path))
            for fault in self.faults:
                if fault.body is not None and not re.search(fault.body, body.decode("utf-8", "replace")):
                    continue
                if fault.method == method and re.search(fault.path, path) and fault.times != 0:
                    if fault.skip > 0:
                        fault.skip -= 1
                        continue
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _forward(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._read_body()
        fault = proxy._match(self.command, self.path, body)
        if fault and fault.kind == "status":
            self._answer(fault.status, b'{"error":"injected fault: HTTP %d"}' % fault.status)
            return
        if fault and fault.kind == "before" and fault.hook:
            fault.hook()
        if fault and fault.kind == "corrupt" and body:
            body = body[:-1] + bytes([body[-1] ^ 0xFF])
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=600)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
        except OSError as error:
            self._answer(502, b'{"error":"proxy: upstream unreachable: %s"}' % type(error).__name__.encode())
            return
        try:
            self._relay(response, fault)
        except OSError:
            self.close_connection = True
        finally:
            upstream.close()

    def _relay(self, response: http.client.HTTPResponse, fault: Fault | None) -> None:
        self.send_response(response.status, response.reason)
        passed = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
        no_body = self.command == "HEAD" or response.status in (204, 304)
        if fault and fault.kind == "rewrite" and fault.rewrite and not no_body:
            data = fault.rewrite(response.read())
            for key, value in passed:
                if key.lower() != "content-length":
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True
            return
        for key, value in passed:
            self.send_header(key, value)
        self.send_header("Connection", "close")
        self.close_connection = True
        if no_body:
            self.end_headers()
            return
        if response.getheader("Content-Length") is not None:
            self.end_headers()
            if fault and fault.kind == "cut":  # half the body, then the connection goes
                self.wfile.write(response.read(int(response.getheader("Content-Length")) // 2))
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            while block := response.read(1 << 16):
                self.wfile.write(block)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if fault and fault.kind == "cut":
            self._chunk(response.readline())
            if fault.hook:
                fault.hook()
            self.connection.shutdown(socket.SHUT_RDWR)  # no final chunk: the client sees a cut stream
            return
        if fault and fault.kind in ("stall", "drip"):
            first = response.readline()
            self._chunk(first)
            end = time.monotonic() + fault.hold_s
            while time.monotonic() < end:  # until the client gives up (a write fails) or hold_s passes
                time.sleep(0.2)
                if fault.kind == "drip":
                    self._chunk(first)
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        while line := response.readline():
            self._chunk(line)
        self.wfile.write(b"0\r\n\r\n")

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward


# --- fixtures: one Ollama server and one registry per test module, each behind its own proxy ---


@dataclass
class Stack:
    ollama: OllamaServer
    registry: RegistryServer
    ollama_proxy: FaultProxy
    registry_proxy: FaultProxy

    @property
    def ollama_url(self) -> str:
        return f"http://{self.ollama_proxy.address}"

    def clear_faults(self) -> None:
        self.ollama_proxy.clear()
        self.registry_proxy.clear()

    def ensure_running(self) -> None:
        for server in (self.ollama, self.registry):
            if not server.running:
                server.start()


@pytest.fixture(scope="session")
def ollama_binary() -> Path:
    return ensure_ollama()


@pytest.fixture(scope="module", name="ollama_binary", params=OLLAMA_VERSIONS, ids=lambda v: f"ollama-{v}")
def each_ollama(request) -> Path:
    """Imported by a test module, its tests run against every release in OLLAMA_VERSIONS (module by module)."""
    return ensure_ollama(request.param)


@pytest.fixture(scope="session")
def registry_binary() -> Path:
    return ensure_registry()


@contextlib.contextmanager
def running_stack(ollama_binary: Path, registry_binary: Path, workdir: Path) -> Iterator[Stack]:
    ollama = OllamaServer(ollama_binary, workdir / "ollama")
    registry = RegistryServer(registry_binary, workdir / "registry")
    ollama.start()
    registry.start()
    ollama_proxy, registry_proxy = FaultProxy(ollama.port), FaultProxy(registry.port)
    try:
        yield Stack(ollama, registry, ollama_proxy, registry_proxy)
    finally:
        for proxy in (ollama_proxy, registry_proxy):
            proxy.close()
        ollama.stop()
        registry.stop()


@pytest.fixture(scope="module")
def stack(ollama_binary, registry_binary, tmp_path_factory) -> Iterator[Stack]:
    """A real Ollama and a real registry for this test module, each reached through a FaultProxy."""
    with running_stack(ollama_binary, registry_binary, tmp_path_factory.mktemp("stack")) as running:
        yield running


# --- releases: what the pipeline hands to deploy (Modelfile + GGUF + gate verdict + cases) for the tiny model ---

# Llama-2 [INST] as Ollama's Go TEMPLATE, for the single-turn cases below (the modelfile stage derives and
# proves the full one); Ollama adds BOS itself.
LLAMA2_TEMPLATE = (
    '{{- range .Messages }}{{- if eq .Role "user" }}[INST] {{ if $.System }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n'
    "{{ end }}{{ .Content }} [/INST]{{- end }}{{- end }}"
)
# ChatML: a template the tiny model was not trained with.
CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)
NUM_PREDICT = 16
GATE_OPTIONS = {"temperature": 0, "top_k": 1, "seed": 42, "num_predict": NUM_PREDICT}
PROMPTS = (
    ("hello-chris", None, "Write a Hello Chris program in Psion OPL."),
    ("wait-key-system", "You are an expert Psion OPL programmer.", "How do I wait for a key press in OPL?"),
    ("loop", None, "How do I write a loop in Psion OPL?"),
    ("local-string", None, "How do I declare a local string variable in Psion OPL?"),
)


@dataclass(frozen=True)
class ReleaseFiles:
    root: Path
    modelfile: Path
    verdict: Path
    cases: Path
    gguf: Path
    prompts: tuple[str, ...]  # the cases' prompts, in order


def gate_answers(gguf: Path) -> dict[str, str]:
    """What the gate does on the GGUF: each prompt in llama.cpp, with the chat template the model was trained
    with (the GGUF's own Jinja), greedy, the gate's options (llama.cpp's repeat_penalty is 1.0)."""
    from llama_cpp import Llama

    model = Llama(str(gguf), n_ctx=512, seed=42, verbose=False)
    answers = {}
    for case_id, system, prompt in PROMPTS:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        result = model.create_chat_completion(
            messages, max_tokens=NUM_PREDICT, temperature=0, top_k=1, seed=42, repeat_penalty=1.0
        )
        answers[case_id] = result["choices"][0]["message"]["content"]
    model.close()
    return answers


def write_release(
    root: Path, gguf: Path, answers: dict[str, str], template: str = LLAMA2_TEMPLATE, passed: bool = True
) -> ReleaseFiles:
    """A release directory laid out as the pipeline's: models/release/Modelfile (FROM ../gguf/<gguf>), the GGUF,
    models/gate/verdict.json and data/gate_cases.jsonl. Each case expects a word of llama.cpp's answer, so the
    gate passed on the GGUF, and the served model passes only if Ollama prompts it the same way."""
    import hashlib
    import json

    (root / "models" / "gguf").mkdir(parents=True, exist_ok=True)
    shipped = root / "models" / "gguf" / gguf.name
    shutil.copyfile(gguf, shipped)
    modelfile = root / "models" / "release" / "Modelfile"
    modelfile.parent.mkdir(parents=True, exist_ok=True)
    # num_predict: the tiny model rarely stops by itself, and `ollama run` by hand should
    modelfile.write_text(f'FROM ../gguf/{gguf.name}\nTEMPLATE """{template}"""\nPARAMETER num_predict 32\n')
    cases, verdict_cases = [], []
    for case_id, system, prompt in PROMPTS:
        words = re.findall(r"[A-Za-z0-9]{2,}", answers[case_id])
        if not words:
            continue
        case = {"id": case_id, "kind": "learn", "prompt": prompt, "expect": [words[0]], "case_sensitive": True}
        if system:
            case["system"] = system
        cases.append(case)
        verdict_cases.append(
            {
                "id": case_id,
                "kind": "learn",
                "before": 0.0,
                "merged": 1.0,
                "after": 1.0,
                "passed": True,
                "answer": answers[case_id],
            }
        )
    assert len(cases) >= 2, f"the tiny model answered too few prompts with a word: {answers}"
    (root / "data").mkdir(exist_ok=True)
    cases_file = root / "data" / "gate_cases.jsonl"
    cases_file.write_text("".join(json.dumps(case) + "\n" for case in cases))
    verdict = root / "models" / "gate" / "verdict.json"
    verdict.parent.mkdir(parents=True, exist_ok=True)
    verdict.write_text(
        json.dumps(
            {
                "passed": passed,
                "reasons": [] if passed else ["learn: mean score 0.000 < learn_min_score 0.75"],
                "quant": gguf.stem.removeprefix("model-"),
                "gguf": f"models/gguf/{gguf.name}",
                "gguf_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
                "options": GATE_OPTIONS,
                "cases": verdict_cases,
            }
        )
    )
    return ReleaseFiles(root, modelfile, verdict, cases_file, shipped, tuple(c["prompt"] for c in cases))


@dataclass(frozen=True)
class TinyModel:
    gguf: Path
    answers: dict[str, str]
    quantization: str  # as Ollama's /api/tags reports it


# What the fine-tuned tiny model (v2) answers to PROMPTS: memorised, so each token wins by several nats.
TRAINED_ANSWERS = {
    "hello-chris": 'PROC main:\n  PRINT "Hello Chris"\n  GET\nENDP',
    "wait-key-system": "Use GET: it waits for a key press and returns its code.",
    "loop": "Use DO ... UNTIL, or WHILE ... ENDWH.",
    "local-string": "LOCAL name$(20) declares a string of up to 20 characters.",
}
TRAIN_STEPS = 150  # full-batch AdamW steps: the loss is below 0.01 from about step 100 (8 s on 2 cores)


def fine_tune_tiny(merged: Path, out: Path) -> Path:
    """The tiny model fine-tuned (all weights, deterministically) until it answers PROMPTS with TRAINED_ANSWERS
    under its Llama-2 template; saved as stage merge saves. A random model's next tokens win by hundredths of a
    logit, so another llama.cpp build's q8_0 kernels (Ollama 0.17.4's) pick other tokens than llama-cpp-python;
    a trained model's do not, as with the real fine-tunes deploy ships."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.vocab import save_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    rows = []
    for case_id, system, prompt in PROMPTS:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(" " + TRAINED_ANSWERS[case_id], add_special_tokens=False)["input_ids"]
        answer_ids.append(tokenizer.eos_token_id)
        rows.append((torch.tensor([prompt_ids + answer_ids]), torch.tensor([[-100] * len(prompt_ids) + answer_ids])))
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(TRAIN_STEPS):
        for input_ids, labels in rows:
            model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.to(torch.float16).save_pretrained(out)
    save_tokenizer(tokenizer, out)
    shutil.copyfile(merged / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def tiny_versions(tiny_merged, tmp_path_factory) -> dict[str, TinyModel]:
    """Two versions of the tiny model to deploy and roll back between: v1 the random model in f16 (f16 answers
    are the same in every llama.cpp build measured), v2 the fine-tuned one in q8_0."""
    from pipeline.convert import convert
    from pipeline.params import ConvertParams

    out = tmp_path_factory.mktemp("tiny-versions")
    trained = fine_tune_tiny(tiny_merged, out / "trained")
    versions = {}
    for version, model, outtype in (("v1", tiny_merged, "f16"), ("v2", trained, "q8_0")):
        gguf = out / f"model-{outtype}.gguf"
        convert(model, gguf, ConvertParams(outtype=outtype))
        versions[version] = TinyModel(gguf, gate_answers(gguf), outtype.upper())
    assert versions["v2"].answers["hello-chris"].strip() == TRAINED_ANSWERS["hello-chris"]
    return versions


@pytest.fixture(scope="module")
def releases(tiny_versions, tmp_path_factory) -> dict:
    """Each tiny version as a release (Modelfile, gate verdict, cases), per test module."""
    root = tmp_path_factory.mktemp("releases")
    return {
        version: write_release(root / version, model.gguf, model.answers) for version, model in tiny_versions.items()
    }


@pytest.fixture(scope="module")
def records(ollama_binary, tmp_path_factory) -> Path:
    """A fresh deployment-records file per test module, and per Ollama release where the module runs against
    each (rollback's work directory sits beside it: one release's downloads must not serve the next's)."""
    return tmp_path_factory.mktemp("records") / "records.jsonl"
