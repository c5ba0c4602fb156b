"""What every benchmark shares: where results go, how a command is timed, what machine ran it."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def machine() -> dict:
    """The figures' machine: results differ across CPUs by more than across runs, so name the CPU and
    whether it has the bf16 matmul units (AMX / AVX512-BF16) that training's bf16 autocast needs."""
    model, flags = "", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "cpu": model,
        "bf16_matmul": bool(flags & {"amx_bf16", "avx512_bf16"}),
    }


def measure_tree(command: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB of the process tree); raises if the command fails."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read().decode()[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def measure_process(command: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of `command`; raises if it fails.

    The peak is the process's own VmHWM, polled from /proc after its exec: getrusage's ru_maxrss
    would include the parent's memory (the child is forked from it), which here holds a model.
    """
    argv = "\0".join(command).encode()
    started = time.perf_counter()
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr)
        peak_kib = 0
        while process.poll() is None:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{process.pid}/cmdline").read_bytes().rstrip(b"\0") == argv:  # exec'd
                    status = Path(f"/proc/{process.pid}/status").read_text()
                    peak_kib = max(
                        [peak_kib] + [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")]
                    )
            time.sleep(0.02)
        wall = time.perf_counter() - started
        if process.returncode != 0:
            stderr.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed:\n{stderr.read().decode()[-3000:]}")
    return wall, peak_kib / 1024


def table(header: list[str], rows: list[list], text_columns: int = 2) -> str:
    """A Markdown table; the first `text_columns` left-aligned, the others (numbers) right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * text_columns + "---:|" * (len(header) - text_columns)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])
