"""Stage base_answers: the base model's own greedy answers to general prompts.

    python -m pipeline.base_answers --base models/base --probes data/general/probes.jsonl \
        --replay data/general/replay.jsonl --out data/base_answers --metrics metrics/base_answers.json

Writes data/base_answers/probes.jsonl (every probe and the base's answer, cut at max_new_tokens if
need be: the gate's forgetting references) and data/base_answers/replay.jsonl (the replay prompts the
base answered, as training conversations for `train.replay`). An answer cut at max_new_tokens would
teach the model to stop mid-sentence, so a cut replay answer keeps its complete paragraphs (up to the
last blank line: a code block and its closing fence usually end one) when they are at least half of it,
and is dropped (counted) otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.common import atomic_directory, get_logger, run_cli, write_json_atomic, write_jsonl_atomic
from pipeline.hf_evaluator import HFModel
from pipeline.params import load_params
from pipeline.prompts import BaseAnswer, Prompt, base_answer_rows, prompts_or_raise

PARAMS = ("base_answers",)
log = get_logger("base_answers")


MIN_KEPT_SHARE = 0.5  # of a cut answer, what its complete paragraphs must keep for it to be replayed


def replayable(answer: BaseAnswer) -> BaseAnswer | None:
    """The answer as training may replay it: finished, or cut back to its last complete paragraph."""
    if answer.finished:
        return answer if answer.answer else None
    complete = answer.answer[: answer.answer.rfind("\n\n")].rstrip() if "\n\n" in answer.answer else ""
    if len(complete) < MIN_KEPT_SHARE * len(answer.answer):
        return None
    return BaseAnswer(answer.id, answer.prompt, complete, finished=False)


def answer_all(model: HFModel, prompts: list[Prompt], max_new_tokens: int, label: str) -> list[BaseAnswer]:
    from tqdm import tqdm

    with tqdm(total=len(prompts), desc=f"base answers {label}", unit="prompt") as bar:
        answers = model.answers([p.messages() for p in prompts], max_new_tokens, bar.update)
    return [BaseAnswer(p.id, p.prompt, a.text, a.finished) for p, a in zip(prompts, answers, strict=True)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.base_answers", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--base", type=Path, required=True, help="base model directory (stage base)")
    parser.add_argument("--probes", type=Path, required=True, help="general prompts for the forgetting measure")
    parser.add_argument("--replay", type=Path, required=True, help="general prompts whose answers training replays")
    parser.add_argument("--out", type=Path, required=True, help="directory for probes.jsonl and replay.jsonl")
    parser.add_argument("--metrics", type=Path, required=True, help="counts (JSON)")
    args = parser.parse_args(argv)

    params = load_params(args.params).base_answers
    probes, replay = prompts_or_raise(args.probes), prompts_or_raise(args.replay)
    model = HFModel(args.base, seed=params.seed, name="base")
    probe_answers = answer_all(model, probes, params.max_new_tokens, "probes")
    replay_answers = answer_all(model, replay, params.max_new_tokens, "replay")
    kept = [kept for answer in replay_answers if (kept := replayable(answer)) is not None]
    with atomic_directory(args.out) as tmp:
        write_jsonl_atomic(tmp / "probes.jsonl", base_answer_rows(probe_answers))
        write_jsonl_atomic(tmp / "replay.jsonl", [answer.conversation() for answer in kept])
    metrics = {
        "probes": len(probe_answers),
        "probes_cut_at_max_new_tokens": sum(not a.finished for a in probe_answers),
        "replay": len(kept),
        "replay_cut_to_paragraphs": sum(not a.finished for a in kept),
        "replay_dropped_unfinished": len(replay_answers) - len(kept),
    }
    write_json_atomic(args.metrics, metrics)
    log.info("base answers: %s", metrics)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
