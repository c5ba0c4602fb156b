"""Helpers shared by every stage: logging, atomic writes, JSON Lines, seeding and deterministic torch."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class PipelineError(Exception):
    """An error with a message meant for the user; stage CLIs print it without a traceback."""


def get_logger(name: str) -> logging.Logger:
    logging.basicConfig(level=os.environ.get("PIPELINE_LOG_LEVEL", "INFO"), format="%(name)s: %(message)s")
    return logging.getLogger(name)


def run_cli(main, argv: list[str] | None = None) -> int:
    """Run a stage's main; a PipelineError becomes one clear line on stderr and exit status 1."""
    try:
        main(argv)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _temp_sibling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` that replaces it only if the block succeeds: readers
    never see half a file, and a failed write leaves the previous file (or none) in place."""
    path = Path(path)
    # a device or a pipe (`--metrics /dev/null`): written through, never replaced by a rename, which as
    # root would turn /dev/null into a regular file for every process after
    special = path.exists() and not path.is_file()
    tmp = _temp_sibling(Path(tempfile.gettempdir()) / path.name if special else path)
    try:
        yield tmp
        if special:
            with open(path, "wb") as target:
                target.write(tmp.read_bytes())
            return
        tmp.chmod(0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write to a temporary file next to `path`, then rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp creates 0700
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def deterministic_torch(seed: int, cpu_threads: int | None = None) -> None:
    """Seed everything and make torch as deterministic as it allows: deterministic kernels where torch has
    them (a warning, not an error, for an op without one) and, when given, a fixed CPU thread count (the
    count changes how reductions are split). The same inputs then give the same model on the same kind
    of machine; precision (bf16 or not) still depends on the machine, see train.precision."""
    import torch

    # cuBLAS is deterministic only with a fixed workspace (read when CUDA starts; harmless on CPU)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    seed_everything(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if cpu_threads is not None:
        torch.set_num_threads(cpu_threads)


def file_sha256_hex(path: str | Path) -> str:
    """The sha256 of a file, hex, read in blocks (GGUFs are large)."""
    import hashlib

    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
