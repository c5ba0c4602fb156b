"""Decisions the CI jobs take from DVC's view of this commit.

    python -m pipeline.ci stale     # exit 0: dvc.lock is current; exit 3: stale, and what and why

`retrain` uses it to skip training when nothing the model depends on changed (a README-only merge
costs a `dvc status`); `deploy` uses it to refuse a commit whose dvc.lock does not describe a trained
model (the retrain job commits the lock; that commit's pipeline deploys). Stale also: a committed output
edited by hand (the gate's verdict, metrics or report no longer match their md5 in dvc.lock) and a
dvc.lock entry no pipeline run wrote (a stage or output dvc.yaml does not declare, a dependency whose
md5 is not what its producing stage recorded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.common import run_cli
from pipeline.dvc_status import downstream_of, dvc_status, stale_stages, untrusted_lock

STALE_EXIT = 3  # not an error: the job shows it as an allowed failure (allow_failure: exit_codes)


def stale(cwd: Path) -> int:
    status = dvc_status(cwd)
    stages, problems = stale_stages(cwd, status), untrusted_lock(cwd, status)
    if not stages and not problems:
        print("dvc.lock is current: every stage's code, data, params and command match it")
        return 0
    if stages:
        after = downstream_of(stages, cwd)
        print(f"dvc.lock is stale: inputs changed for {', '.join(stages)}", end="")
        print(f"; downstream: {', '.join(after)}" if after else "")
    if problems:
        print("dvc.lock is stale: not what a run of the pipeline wrote:")
        for problem in problems:
            print(f"  {problem}")
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
