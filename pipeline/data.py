"""Dataset tooling without DVC: prepare's checks, its statistics, and converting a dataset to messages.

    python -m pipeline.data check                # every error and warning prepare would give, exit 1 on errors
    python -m pipeline.data stats [--plot PATH]  # metrics/data.json's numbers (per source), and the histogram
    python -m pipeline.data convert --format alpaca --input their.json --output data/theirs.jsonl \
        [--column prompt=question --column response=answer] [--role human=user]

check and stats read data.sources from params.yaml, or data/train.jsonl and data/eval.jsonl when it
is null; convert writes the messages JSON Lines that prepare reads (to move a dataset into the repo).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import get_args

from pipeline.common import PipelineError, get_logger, run_cli, write_jsonl_atomic
from pipeline.data_stats import write_histogram
from pipeline.params import SourceFormat, SourceParams, load_params
from pipeline.preparation import Prepared, prepare
from pipeline.sources import load_source

log = get_logger("data")


def mapping(pairs: list[str], option: str) -> dict[str, str]:
    """`a=b` pairs from the command line."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise PipelineError(f"{option} {pair!r}: expected NAME=VALUE")
        result[key] = value
    return result


def convert(source: SourceParams, output: Path) -> int:
    """Write the source as messages JSON Lines; every row problem stops it (nothing is written)."""
    errors: list[str] = []
    rows = load_source(source, errors)
    if errors:
        raise PipelineError(f"{len(errors)} problem(s) in {source.path}:\n  " + "\n  ".join(errors))
    write_jsonl_atomic(output, [{"messages": example.messages} for example in rows.examples])
    return len(rows.examples)


def prepared(args: argparse.Namespace) -> Prepared:
    params = load_params(args.params)
    default = params.data.sources is None
    train = (args.train or Path("data/train.jsonl")) if default else args.train
    evaluation = (args.eval or Path("data/eval.jsonl")) if default else args.eval
    return prepare(params, train, evaluation, args.cases, args.allowlist)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, about in (("check", "prepare's checks: errors exit 1"), ("stats", "prepare's statistics as JSON")):
        command = commands.add_parser(name, help=about, description=about)
        command.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
        command.add_argument("--train", type=Path, help="training file when data.sources is null (data/train.jsonl)")
        command.add_argument("--eval", type=Path, help="eval file when data.sources is null (data/eval.jsonl)")
        command.add_argument("--cases", type=Path, default=Path("data/gate_cases.jsonl"), help="the gate's cases")
        command.add_argument(
            "--allowlist", type=Path, default=Path("data/sensitive_allowlist.txt"), help="allowed example secrets"
        )
        if name == "stats":
            command.add_argument("--plot", type=Path, help="also write the token-length histogram (PNG) here")
    convert_command = commands.add_parser("convert", help="any supported format to messages JSON Lines")
    convert_command.add_argument("--format", required=True, choices=get_args(SourceFormat), help="the input's format")
    convert_command.add_argument("--input", type=Path, required=True, help="file or directory to read")
    convert_command.add_argument("--output", type=Path, required=True, help="messages JSON Lines to write")
    convert_command.add_argument(
        "--column", action="append", default=[], help="FIELD=COLUMN (prompt, response, system, messages)"
    )
    convert_command.add_argument("--role", action="append", default=[], help="ShareGPT FROM=ROLE, e.g. bot=assistant")
    args = parser.parse_args(argv)

    if args.command == "convert":
        source = SourceParams(
            path=str(args.input),
            format=args.format,
            columns=mapping(args.column, "--column"),
            roles=mapping(args.role, "--role"),
        )
        log.info("wrote %d conversations to %s", convert(source, args.output), args.output)
        return
    result = prepared(args)
    for warning in result.warnings:
        log.warning("%s", warning)
    if args.command == "stats":
        print(json.dumps(result.metrics, indent=2, sort_keys=True))
        if args.plot:
            write_histogram(result.lengths, load_params(args.params).data.max_seq_length, args.plot)
        return
    metrics = result.metrics
    log.info(
        "ok: %d training and %d eval conversations from %d source(s), %d near-duplicate warning(s)",
        metrics["train"]["conversations"],
        metrics["eval"]["conversations"],
        len(metrics["sources"]),
        len(result.warnings),
    )


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
