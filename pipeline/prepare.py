"""Stage `prepare`: validate the dataset and the gate cases, write the prepared splits.

    python -m pipeline.prepare --train data/train.jsonl --eval data/eval.jsonl \
        --cases data/gate_cases.jsonl --allowlist data/sensitive_allowlist.txt \
        --out data/prepared --metrics metrics/data.json --lengths-plot reports/data_lengths.png

Every problem in every file is reported at once as `file:line: reason`, before any model trains
(pipeline/preparation.py). With `data.sources` in params.yaml, --train and --eval are left out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cases import LEARN_CASES_FILE, learn_rows
from pipeline.common import get_logger, run_cli, write_json_atomic, write_jsonl_atomic
from pipeline.data_stats import write_histogram
from pipeline.params import load_params
from pipeline.preparation import prepare

PARAMS = ("data", "base.model", "base.revision", "base.trust_remote_code", "base.chat_template")

log = get_logger("prepare")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--train", type=Path, help="training conversations (JSON Lines), when data.sources is null")
    parser.add_argument("--eval", type=Path, help="held-out conversations for eval loss, when data.sources is null")
    parser.add_argument("--cases", type=Path, required=True, help="the gate's evaluation cases")
    parser.add_argument(
        "--allowlist", type=Path, help="deliberate example secrets or addresses, one per line (see pipeline.sensitive)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for train.jsonl, eval.jsonl and learn_cases.jsonl"
    )
    parser.add_argument("--metrics", type=Path, required=True, help="where to write the data metrics (JSON)")
    parser.add_argument("--lengths-plot", type=Path, help="token-length histogram per source (PNG)")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    prepared = prepare(params, args.train, args.eval, args.cases, args.allowlist)
    for warning in prepared.warnings:
        log.warning("%s", warning)
    for name, conversations in prepared.splits.items():
        write_jsonl_atomic(args.out / f"{name}.jsonl", [{"messages": m} for m in conversations])
    write_jsonl_atomic(args.out / LEARN_CASES_FILE, learn_rows(args.cases))
    write_json_atomic(args.metrics, prepared.metrics)
    if args.lengths_plot:
        write_histogram(prepared.lengths, params.data.max_seq_length, args.lengths_plot)
    metrics = prepared.metrics
    log.info(
        "train: %d conversations (%d tokens), eval: %d, cases: %d learn / %d keep, near-duplicates: %d",
        metrics["train"]["conversations"],
        metrics["train"]["tokens"]["total"],
        metrics["eval"]["conversations"],
        metrics["cases"]["learn"],
        metrics["cases"]["keep"],
        len(prepared.warnings),
    )


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
