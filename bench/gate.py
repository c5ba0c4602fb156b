"""Wall time of the gate stage, this checkout against an earlier one, on the same models.

    python -m bench.gate --before 515e899 [--rounds 2]

Runs `python -m pipeline.gate` of the earlier revision (a temporary git worktree) and of this checkout,
each with its own cases and params, on the models in this repository (models/base, models/merged,
models/gguf: run `dvc repro quantize base_answers` first), alternating, so both see the same machine;
the ratio after/before is the figure that counts. Results: a Markdown line on stdout and
bench/results/gate-<base.model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

import yaml

from bench.pipeline import RESULTS, ROOT, measure


def gate_command(checkout: Path, out: Path) -> list[str]:
    """The gate CLI of `checkout`, with its own cases and params, on this repository's models, into `out`."""
    help_text = subprocess.run(
        [sys.executable, "-m", "pipeline.gate", "--help"], cwd=checkout, capture_output=True, text=True, check=True
    ).stdout
    models = ["--base", str(ROOT / "models/base"), "--merged", str(ROOT / "models/merged"),
              "--gguf-dir", str(ROOT / "models/gguf"), "--cases", str(checkout / "data/gate_cases.jsonl"),
              "--params", str(checkout / "params.yaml")]  # fmt: skip
    if "--probes" in help_text:
        models += ["--probes", str(ROOT / "data/base_answers/probes.jsonl")]
    outputs = ["--metrics", str(out / "gate.json"), "--report", str(out / "gate.md"),
               "--verdict", str(out / "verdict.json")]  # fmt: skip
    # a failed gate exits 1; its time counts all the same
    return ["bash", "-c", '"$@" || [ $? -eq 1 ]', "gate", sys.executable, "-m", "pipeline.gate", *models, *outputs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gate", description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="git revision of the earlier gate")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each, alternating (default: %(default)s)")
    args = parser.parse_args(argv)
    model = yaml.safe_load((ROOT / "params.yaml").read_text())["base"]["model"]
    times: dict[str, list[float]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="bench-gate-") as tmp:
        earlier = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(earlier), args.before], cwd=ROOT, check=True)
        try:
            for _ in range(args.rounds):
                for name, checkout in (("before", earlier), ("after", ROOT)):
                    out = Path(tmp) / f"out-{name}"
                    out.mkdir(exist_ok=True)
                    wall, _ = measure(gate_command(checkout, out), checkout)
                    times[name].append(round(wall, 1))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(earlier)], cwd=ROOT, check=True)
    before, after = median(times["before"]), median(times["after"])
    result = {"model": model, "before_revision": args.before, "seconds": times, "ratio": round(after / before, 2),
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor()}}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"gate-{model}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"| {model} | gate before ({args.before}) {before:.0f} s | after {after:.0f} s | ratio {result['ratio']} |")


if __name__ == "__main__":
    main()
