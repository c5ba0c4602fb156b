"""The prepare stage's core, shared with `python -m pipeline.data`: read the sources, check everything,
mix and split, measure. Pure apart from reading the input files and loading the tokenizer.

Errors (all reported at once, `file:line: field: reason`, before any model trains): every row problem,
exact duplicates, train/eval overlap, gate prompts in the training data, secrets and personal data,
over-length conversations. Warnings: near-duplicates (metrics/data.json lists both places).
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.cases import load_cases
from pipeline.common import PipelineError
from pipeline.data_checks import control_token_errors, review
from pipeline.data_stats import length_summary
from pipeline.dataset import Example, length_check, without_duplicates
from pipeline.models import load_tokenizer, token_counter
from pipeline.params import Params
from pipeline.sensitive import load_allowlist
from pipeline.sources import SourceRows, default_sources, load_source, mix_and_split


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


@dataclass(frozen=True)
class Prepared:
    splits: dict[str, list[list[dict]]]  # "train"/"eval" -> conversations as message lists
    metrics: dict  # metrics/data.json
    lengths: dict[str, list[int]]  # source path -> token length of each of its conversations (the histogram)
    warnings: list[str]  # near-duplicates, `file:line: ...`


def read_sources(
    params: Params, train_path: Path | None, eval_path: Path | None, errors: list[str]
) -> list[SourceRows]:
    """data.sources, or the --train/--eval pair when it is null (today's layout, the default)."""
    if params.data.sources is None:
        if train_path is None or eval_path is None:
            raise PipelineError("data.sources is null: give the training and eval files (--train, --eval)")
        sources = default_sources(train_path, eval_path)
    elif train_path is not None or eval_path is not None:
        raise PipelineError(
            "params.yaml: data.sources is set: drop --train/--eval from the prepare command (dvc.yaml) and list "
            "the sources' paths as the stage's deps"
        )
    else:
        sources = params.data.sources
    loaded = [load_source(source, errors) for source in sources]
    train_sources = [rows for rows in loaded if rows.source.role == "train"]
    if len(train_sources) > 1:  # a conversation copied from one source into another
        without_duplicates([e for rows in train_sources for e in rows.examples], errors)
    if params.data.eval_fraction and any(rows.source.role == "eval" for rows in loaded):
        errors.append(
            "params.yaml: data.eval_fraction: an eval source is given, so nothing is held out of the train sources "
            "(set data.eval_fraction: 0, or give no eval source)"
        )
    mix_and_split(loaded, params.data)
    return loaded


def prepare(
    params: Params,
    train_path: Path | None,
    eval_path: Path | None,
    cases_path: Path,
    allowlist_path: Path | None = None,
) -> Prepared:
    """Everything prepare writes; raises one PipelineError listing every problem.
    `allowlist_path`: deliberate example secrets/addresses (pipeline.sensitive); missing = none allowed."""
    errors: list[str] = []
    loaded = read_sources(params, train_path, eval_path, errors)
    cases = load_cases(cases_path, errors)
    held = {id(e) for rows in loaded for e in rows.eval}
    unique_train = [e for rows in loaded if rows.source.role == "train" for e in rows.examples if id(e) not in held]
    evaluation = [e for rows in loaded for e in rows.eval]
    checks = params.data
    allowlist = load_allowlist(allowlist_path)
    named = str(allowlist_path or "an allowlist file (--allowlist)")
    found = review(unique_train, evaluation, cases, str(cases_path), checks, allowlist, named)
    errors.extend(found.errors)
    if not unique_train:
        errors.append(f"{train_path or 'data.sources'}: no valid conversations")
        raise data_error(errors)  # nothing to measure lengths with
    with tempfile.TemporaryDirectory() as scratch:
        # the `tiny` base builds its tokenizer from the training text: each conversation once, in order
        corpus = [m["content"] for example in unique_train for m in example.messages]
        tokenizer = load_tokenizer(params.base, corpus, Path(scratch))
        count = token_counter(tokenizer)
        every_row = {id(e): e for rows in loaded for e in rows.examples}.values()  # a weighted row once
        errors.extend(control_token_errors(list(every_row), tokenizer.all_special_tokens))
        measured: dict[int, int] = {}  # id(messages) -> tokens: a weighted or shared conversation counts once

        def tokens(messages: list[dict]) -> int:
            if id(messages) not in measured:
                measured[id(messages)] = count(messages)
            return measured[id(messages)]

        dropped_ids: set[int] = set()
        for rows in loaded:
            kept, _, _ = length_check(
                rows.examples, tokens, checks.max_seq_length, drop=checks.drop_too_long, errors=errors
            )
            kept_ids = set(map(id, kept))
            dropped_ids |= {id(e) for e in rows.examples if id(e) not in kept_ids}
        per_source = {rows.source.path: [tokens(e.messages) for e in rows.examples] for rows in loaded}
    if errors:
        raise data_error(errors)
    splits_examples = {
        "train": [e for rows in loaded for e in rows.train if id(e) not in dropped_ids],
        "eval": [e for rows in loaded for e in rows.eval if id(e) not in dropped_ids],
    }
    dropped = {
        "train": sum(1 for rows in loaded for e in rows.train if id(e) in dropped_ids),
        "eval": sum(1 for rows in loaded for e in rows.eval if id(e) in dropped_ids),
    }
    near = [pair.as_dict() for pair in found.near_duplicates]
    overlap = [pair.as_dict() for pair in found.near_overlap]
    metrics = {
        name: split_stats(examples, [measured[id(e.messages)] for e in examples], dropped[name])
        for name, examples in splits_examples.items()
    }
    metrics["cases"] = {kind: sum(1 for c in cases if c.kind == kind) for kind in ("learn", "keep")}
    metrics["sources"] = {
        rows.source.path: {
            "format": rows.source.format,
            "role": rows.source.role,
            "weight": rows.source.weight,
            "rows_in": rows.rows_in,
            "conversations": len(rows.examples),
            "rows_used": sum(1 for e in [*rows.train, *rows.eval] if id(e) not in dropped_ids),
            "held_out": len(rows.eval) if rows.source.role == "train" else 0,
            "tokens": length_summary(per_source[rows.source.path], checks.max_seq_length),
        }
        for rows in loaded
    }
    metrics["near_duplicates"] = {
        "threshold": checks.near_duplicate_threshold,
        "train_pairs": len(near),
        "train_eval_pairs": len(overlap),
        "train": near,
        "train_eval": overlap,
    }
    splits = {name: [e.messages for e in examples] for name, examples in splits_examples.items()}
    return Prepared(splits, metrics, per_source, found.warnings())
