"""A scratch copy of the project as a git repository, for tests that need git history and DVC."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git(repo: Path, *args: str) -> str:
    identity = ["-c", "user.name=Test", "-c", "user.email=test@example.com"]
    return subprocess.run(["git", *identity, *args], cwd=repo, capture_output=True, text=True, check=True).stdout


def copy_project(repo: Path) -> Path:
    """The project's files as `git ls-files` sees them (tracked and new, not ignored), committed as `main`,
    with the `tiny` base model so data validation takes seconds."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, map(os.fsdecode, files)):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("  model: smollm2 ", "  model: tiny    ", 1))
    assert "  model: tiny " in params.read_text()
    git(repo.parent, "init", "-q", "-b", "main", str(repo))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "main")
    return repo
