"""Stage `base`: materialise the base model (weights + tokenizer) as a local safetensors directory.

python -m pipeline.base --corpus data/train.jsonl --out models/base
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.common import atomic_directory, get_logger, run_cli, write_json_atomic
from pipeline.dataset import corpus_texts
from pipeline.models import materialise
from pipeline.params import load_params

PARAMS = ("base",)
SUMMARY = "base.json"

log = get_logger("base")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.base", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--corpus", type=Path, required=True, help="conversations the tiny tokenizer is trained on")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the model to")
    args = parser.parse_args(argv)

    base = load_params(args.params).base
    log.info("materialising base model %r into %s", base.model, args.out)
    with atomic_directory(args.out) as tmp:
        summary = materialise(base, corpus_texts(args.corpus), tmp)
        write_json_atomic(tmp / SUMMARY, summary)
    log.info("%s: %s parameters, vocab %s", base.model, f"{summary['parameters']:,}", summary["vocab_size"])


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
