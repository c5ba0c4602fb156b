"""Wall time of the gate, this checkout against an earlier one, on the same models.

    python -m bench.gate --before 515e899 [--rounds 2]

Runs the gate of the earlier revision (a temporary git worktree) and of this checkout, each with its own
cases and params, on the models in this repository (models/base, models/merged, models/gguf: run
`dvc repro quantize base_answers` first), alternating, so both see the same machine. A checkout with
stage baseline (the base's measurement, kept between retrains) runs `python -m pipeline.baseline` first,
timed on its own: a retrain pays for the gate alone, a fresh run for both. The ratios after/before are
the figures that count. Results: a Markdown line on stdout and bench/results/gate-<base.model>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

import yaml

from bench.common import RESULTS, ROOT, machine, measure_tree


def has_baseline_stage(checkout: Path) -> bool:
    return (checkout / "pipeline" / "baseline.py").is_file()


def model_args(checkout: Path) -> list[str]:
    return ["--cases", str(checkout / "data/gate_cases.jsonl"), "--params", str(checkout / "params.yaml")]


def baseline_command(checkout: Path, out: Path) -> list[str]:
    """Stage baseline of `checkout` (it has one) on this repository's base model, into `out`."""
    return [sys.executable, "-m", "pipeline.baseline", *model_args(checkout), "--base", str(ROOT / "models/base"),
            "--probes", str(ROOT / "data/base_answers/probes.jsonl"), "--out", str(out / "baseline.json")]  # fmt: skip


def gate_command(checkout: Path, out: Path) -> list[str]:
    """The gate CLI of `checkout`, with its own cases and params, on this repository's models, into `out`."""
    help_text = subprocess.run(
        [sys.executable, "-m", "pipeline.gate", "--help"], cwd=checkout, capture_output=True, text=True, check=True
    ).stdout
    models = [*model_args(checkout), "--merged", str(ROOT / "models/merged"), "--gguf-dir", str(ROOT / "models/gguf")]
    if has_baseline_stage(checkout):
        models += ["--baseline", str(out / "baseline.json")]
    else:
        models += ["--base", str(ROOT / "models/base")]
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
    times: dict[str, list[float]] = {"before": [], "after": [], "before_baseline": [], "after_baseline": []}
    with tempfile.TemporaryDirectory(prefix="bench-gate-") as tmp:
        earlier = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(earlier), args.before], cwd=ROOT, check=True)
        try:
            for _ in range(args.rounds):
                for name, checkout in (("before", earlier), ("after", ROOT)):
                    out = Path(tmp) / f"out-{name}"
                    out.mkdir(exist_ok=True)
                    if has_baseline_stage(checkout):
                        wall, _ = measure_tree(baseline_command(checkout, out), checkout)
                        times[f"{name}_baseline"].append(round(wall, 1))
                    wall, _ = measure_tree(gate_command(checkout, out), checkout)
                    times[name].append(round(wall, 1))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(earlier)], cwd=ROOT, check=True)
    before, after = median(times["before"]), median(times["after"])
    baseline = median(times["after_baseline"]) if times["after_baseline"] else 0.0
    result = {"model": model, "before_revision": args.before, "seconds": times,
              "ratio_retrain": round(after / before, 2), "ratio_fresh": round((after + baseline) / before, 2),
              "machine": machine()}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"gate-{model}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"| {model} | gate before ({args.before}) {before:.0f} s | after: gate {after:.0f} s "
        f"(ratio {result['ratio_retrain']}), baseline {baseline:.0f} s, both {after + baseline:.0f} s "
        f"(ratio {result['ratio_fresh']}) |"
    )


if __name__ == "__main__":
    main()
