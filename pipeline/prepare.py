"""Stage `prepare`: validate the dataset and the gate cases, write the prepared splits.

    python -m pipeline.prepare --train data/train.jsonl --eval data/eval.jsonl \
        --cases data/gate_cases.jsonl --out data/prepared --metrics metrics/data.json

Every problem in every file is reported at once as `file:line: reason`, before any model trains.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from pipeline.cases import load_cases
from pipeline.common import PipelineError, get_logger, run_cli, write_json_atomic, write_jsonl_atomic
from pipeline.data_checks import contamination_errors, sensitive_data_errors
from pipeline.dataset import Example, length_check, load_conversations, overlap_errors
from pipeline.models import load_tokenizer, token_counter
from pipeline.params import Params, load_params
from pipeline.sensitive import load_allowlist

PARAMS = ("data", "base.model", "base.revision", "base.trust_remote_code")

log = get_logger("prepare")


def split_stats(examples: list[Example], lengths: list[int], dropped: int) -> dict:
    ordered = sorted(lengths)
    return {
        "conversations": len(examples),
        "multi_turn": sum(1 for e in examples if sum(m["role"] == "assistant" for m in e.messages) > 1),
        "with_system": sum(1 for e in examples if e.messages[0]["role"] == "system"),
        "from_llama2_text": sum(1 for e in examples if e.legacy),
        "dropped_too_long": dropped,
        "tokens": {
            "total": sum(ordered),
            "min": ordered[0] if ordered else 0,
            "mean": round(statistics.fmean(ordered), 1) if ordered else 0,
            "median": statistics.median(ordered) if ordered else 0,
            "max": ordered[-1] if ordered else 0,
        },
    }


def data_error(errors: list[str]) -> PipelineError:
    return PipelineError(f"{len(errors)} problem(s) in the data:\n  " + "\n  ".join(errors))


def prepare(
    params: Params, train_path: Path, eval_path: Path, cases_path: Path, allowlist_path: Path | None = None
) -> tuple[dict, dict]:
    """(prepared splits as message lists, metrics); raises one PipelineError listing every problem.
    `allowlist_path`: deliberate example secrets/addresses (pipeline.sensitive); missing = none allowed."""
    errors: list[str] = []
    train = load_conversations(train_path, errors)
    evaluation = load_conversations(eval_path, errors)
    cases = load_cases(cases_path, errors)
    errors.extend(overlap_errors(train, evaluation))
    checks = params.data
    errors.extend(
        contamination_errors(train, cases, str(cases_path), checks.near_duplicate_threshold, checks.allow_gate_cases)
    )
    allowlist = load_allowlist(allowlist_path)
    errors.extend(sensitive_data_errors([*train, *evaluation], allowlist, str(allowlist_path or "an allowlist file")))
    if not train:
        errors.append(f"{train_path}: no valid conversations")
        raise data_error(errors)  # nothing to measure lengths with
    with tempfile.TemporaryDirectory() as scratch:
        corpus = [m["content"] for example in train for m in example.messages]
        count = token_counter(load_tokenizer(params.base, corpus, Path(scratch)))
        limit, drop = params.data.max_seq_length, params.data.drop_too_long
        train, train_lengths, train_dropped = length_check(train, count, limit, drop=drop, errors=errors)
        evaluation, eval_lengths, eval_dropped = length_check(evaluation, count, limit, drop=drop, errors=errors)
    if errors:
        raise data_error(errors)
    metrics = {
        "train": split_stats(train, train_lengths, train_dropped),
        "eval": split_stats(evaluation, eval_lengths, eval_dropped),
        "cases": {kind: sum(1 for c in cases if c.kind == kind) for kind in ("learn", "keep")},
    }
    splits = {"train": [e.messages for e in train], "eval": [e.messages for e in evaluation]}
    return splits, metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--train", type=Path, required=True, help="training conversations (JSON Lines)")
    parser.add_argument("--eval", type=Path, required=True, help="held-out conversations for eval loss")
    parser.add_argument("--cases", type=Path, required=True, help="the gate's evaluation cases")
    parser.add_argument(
        "--allowlist", type=Path, help="deliberate example secrets or addresses, one per line (see pipeline.sensitive)"
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for train.jsonl and eval.jsonl")
    parser.add_argument("--metrics", type=Path, required=True, help="where to write the data metrics (JSON)")
    args = parser.parse_args(argv)

    splits, metrics = prepare(load_params(args.params), args.train, args.eval, args.cases, args.allowlist)
    for name, conversations in splits.items():
        write_jsonl_atomic(args.out / f"{name}.jsonl", [{"messages": m} for m in conversations])
    write_json_atomic(args.metrics, metrics)
    log.info(
        "train: %d conversations (%d tokens), eval: %d, cases: %d learn / %d keep",
        metrics["train"]["conversations"],
        metrics["train"]["tokens"]["total"],
        metrics["eval"]["conversations"],
        metrics["cases"]["learn"],
        metrics["cases"]["keep"],
    )


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
