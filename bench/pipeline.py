"""Wall time and peak memory of each pipeline stage, per base model.

    python -m bench.pipeline --model tiny --model smollm2

Each model runs `dvc repro -s <stage>` stage by stage in a fresh copy of the repository (so DVC's
own hashing and caching are part of the figures). Peak memory is the largest resident set of the
stage's process tree. Results: a Markdown table on stdout and bench/results/<model>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.common import RESULTS, ROOT, machine, measure_tree

# tiny (a random 2-layer Llama) learns nothing the committed gate cases ask, so on tiny the gate only has
# to run: its thresholds are opened. tests/test_gate_stage.py proves the gate's judgement itself.
PLUMBING_GATE = {
    "learn_min_score": "0.0",
    "learn_min_gain": "0.0",
    "keep_max_drop": "1.0",
    "gguf_max_drop": "1.0",
    "learn_min_nll_drop": "0.0",
    "keep_max_nll_rise": "100.0",
    "max_forgetting": "100.0",
    "fit_learn": "null",  # ...and training does not wait for tiny to learn them (train.fit_learn)
}


def copy_repository(model: str, into: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and not name.startswith("bench/results/"):
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, into / name)
    params = yaml.safe_load((into / "params.yaml").read_text())
    text = (into / "params.yaml").read_text().replace(f"model: {params['base']['model']} ", f"model: {model} ")
    if model == "tiny":
        for key, value in PLUMBING_GATE.items():
            text = re.sub(rf"^(  {key}:\s*)\S+", rf"\g<1>{value}", text, flags=re.MULTILINE)
    (into / "params.yaml").write_text(text)
    (into / "dvc.lock").unlink(missing_ok=True)
    for command in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid", "commit", "-qm", "bench"],
    ):
        subprocess.run(command, cwd=into, check=True)


def bench_model(model: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-{model}-") as tmp:
        work = Path(tmp)
        copy_repository(model, work)
        stages = list(yaml.safe_load((work / "dvc.yaml").read_text())["stages"])
        rows = []
        for stage in stages:
            wall, peak = measure_tree(["dvc", "repro", "--single-item", stage], work)
            rows.append({"stage": stage, "wall_s": round(wall, 1), "peak_rss_mib": round(peak)})
            print(f"  {model:8} {stage:10} {wall:7.1f} s  {peak:7.0f} MiB", file=sys.stderr, flush=True)
        train = json.loads((work / "metrics" / "train.json").read_text())
    return {
        "model": model,
        "machine": machine(),
        "stages": rows,
        "total_wall_s": round(sum(r["wall_s"] for r in rows), 1),
        "train_tokens_per_second": train["tokens_per_second"],
        "train_steps": train["steps"],
    }


def markdown(results: list[dict]) -> str:
    lines = ["| model | stage | wall (s) | peak RSS (MiB) |", "|---|---|---:|---:|"]
    for result in results:
        lines += [
            f"| {result['model']} | {r['stage']} | {r['wall_s']} | {r['peak_rss_mib']} |" for r in result["stages"]
        ]
        lines.append(f"| {result['model']} | **total** | **{result['total_wall_s']}** | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True, help="base.model to benchmark (repeatable)")
    args = parser.parse_args(argv)
    results = [bench_model(model) for model in args.model]
    RESULTS.mkdir(parents=True, exist_ok=True)
    for result in results:
        (RESULTS / f"{result['model']}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
