"""Wall time and peak memory of the GGUF stages (convert, then quantize per type), per base model.

    python -m bench.gguf --model tiny --model smollm2

For each model, the base is materialised and saved the way merge saves a model (train's `<pad>`
token added, embeddings resized, fp16 safetensors); then `python -m pipeline.convert` and
`python -m pipeline.quantize` (every type of params.yaml, one process each) run on it like the DVC
stages do. Peak memory is the largest resident set of each process. Results: a Markdown table on
stdout and bench/results/gguf-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from bench.common import RESULTS, ROOT, machine, measure_process, table


def merged_like(model: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.dataset import corpus_texts
    from pipeline.models import materialise
    from pipeline.params import BaseParams
    from pipeline.vocab import ensure_pad_token

    base = out.parent / "base"
    materialise(BaseParams(model=model), corpus_texts(ROOT / "data" / "train.jsonl"), base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    weights = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ensure_pad_token(tokenizer, weights, "<pad>")
    weights.to(torch.float16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    if (base / "tokenizer.model").is_file():
        shutil.copyfile(base / "tokenizer.model", out / "tokenizer.model")


def bench_model(model: str) -> dict:
    types = yaml.safe_load((ROOT / "params.yaml").read_text())["quantize"]["types"]
    with tempfile.TemporaryDirectory(prefix=f"bench-gguf-{model}-") as tmp:
        work = Path(tmp)
        merged_like(model, work / "merged")
        cli = ("--params", str(ROOT / "params.yaml"))
        f16 = work / "model-f16.gguf"
        steps = [("convert", ["pipeline.convert", *cli, "--model", str(work / "merged"), "--out", str(f16)])]
        steps += [
            (
                f"quantize {t}",
                ["pipeline.quantize", *cli, "--type", t, "--model", str(f16), "--out", str(work / f"model-{t}.gguf")],
            )
            for t in types
        ]
        rows = []
        for name, args in steps:
            metrics = work / f"{name.replace(' ', '-')}.json"
            wall, peak = measure_process([sys.executable, "-m", *args, "--metrics", str(metrics)], ROOT)
            size = Path(args[args.index("--out") + 1]).stat().st_size / 1e6
            rows.append({"step": name, "wall_s": round(wall, 1), "peak_rss_mib": round(peak), "mb": round(size, 1)})
            print(f"  {model:8} {name:16} {wall:6.1f} s  {peak:6.0f} MiB  {size:7.1f} MB", file=sys.stderr)
        checkpoint = sum(p.stat().st_size for p in (work / "merged").glob("*.safetensors"))
    return {
        "model": model,
        "machine": machine(),
        "checkpoint_mb": round(checkpoint / 1e6, 1),
        "steps": rows,
    }


def markdown(results: list[dict]) -> str:
    return table(
        ["model (fp16 checkpoint)", "step", "wall (s)", "peak RSS (MiB)", "output (MB)"],
        [
            [f"{result['model']} ({result['checkpoint_mb']} MB)", r["step"], r["wall_s"], r["peak_rss_mib"], r["mb"]]
            for result in results
            for r in result["steps"]
        ],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gguf", description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True, help="base.model to benchmark (repeatable)")
    args = parser.parse_args(argv)
    results = [bench_model(model) for model in args.model]
    RESULTS.mkdir(parents=True, exist_ok=True)
    for result in results:
        (RESULTS / f"gguf-{result['model']}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
