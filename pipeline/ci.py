"""Decisions the CI jobs take from DVC's view of this commit.

    python -m pipeline.ci stale     # exit 0: dvc.lock is current; exit 3: these stages would rerun

`retrain` uses it to skip training when nothing the model depends on changed (a README-only merge
costs a `dvc status`); `deploy` uses it to refuse a commit whose dvc.lock does not describe a trained
model (the retrain job commits the lock; that commit's pipeline deploys).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.common import run_cli
from pipeline.dvc_status import downstream_of, stale_stages

STALE_EXIT = 3  # not an error: the job shows it as an allowed failure (allow_failure: exit_codes)


def stale(cwd: Path) -> int:
    stages = stale_stages(cwd)
    if not stages:
        print("dvc.lock is current: every stage's code, data, params and command match it")
        return 0
    after = downstream_of(stages, cwd)
    print(f"dvc.lock is stale: inputs changed for {', '.join(stages)}", end="")
    print(f"; downstream: {', '.join(after)}" if after else "")
    return STALE_EXIT


COMMANDS = {"stale": stale}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.ci", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=sorted(COMMANDS), help="stale: is dvc.lock current for this commit?")
    args = parser.parse_args(argv)
    code = COMMANDS[args.command](Path.cwd())
    if code:
        sys.exit(code)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
