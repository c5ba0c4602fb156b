"""What the gate measures on one model, and the base model's measurement kept between retrains.

`measure` runs a model (pipeline/evaluators.py) over the gate cases and the general probes: greedy
answers, the NLL of each case's reference, the NLL of the base's own answer to each probe. `score`
turns a measurement into the `Evidence` the rules read (keyword scores from the cases as they are now).

The base's measurement changes only with the base, the cases' conversations and references, the probes
and the gate's decoding params, not when the fine-tune is retrained: stage `baseline` writes it once
(`write_baseline`) and the gate reads it back (`read_baseline`), which refuses a file measured for other
inputs, naming the first one that differs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.cases import Case
from pipeline.common import PipelineError, write_json_atomic
from pipeline.evaluators import Evaluator
from pipeline.params import GateParams
from pipeline.prompts import BaseAnswer
from pipeline.verdict import Evidence

BASELINE = Path("models/baseline/evidence.json")


@dataclass(frozen=True)
class Measurement:
    """One model's raw results, before the cases' keyword rules score its answers."""

    name: str
    answers: dict[str, str]  # case id -> greedy answer
    nll: dict[str, float]  # case id -> reference NLL (cases with a reference)
    probe_nll: dict[str, float]  # probe id -> NLL of the base's own answer


def measure(
    model: Evaluator, cases: list[Case], probes: list[BaseAnswer], gate: GateParams, progress: Callable[[int], None]
) -> Measurement:
    conversations = [case.messages() for case in cases]
    answers, nll = model.cases(conversations, [case.reference for case in cases], gate.max_new_tokens, progress)
    probe_answers = [p.answer for p in probes]
    probe_nll = model.nll([p.messages() for p in probes], probe_answers, progress, gate.probe_max_tokens)
    return Measurement(
        name=model.name,
        answers={case.id: answer.text for case, answer in zip(cases, answers, strict=True)},
        nll={case.id: round(value, 4) for case, value in zip(cases, nll, strict=True) if value is not None},
        probe_nll={probe.id: round(value, 4) for probe, value in zip(probes, probe_nll, strict=True)},
    )


def score(cases: list[Case], measured: Measurement) -> Evidence:
    results = {case.id: case.score(measured.answers[case.id]) for case in cases}
    return Evidence(
        name=measured.name,
        answers=dict(measured.answers),
        scores={case_id: round(result.score, 4) for case_id, result in results.items()},
        forbidden={case_id: result.forbidden for case_id, result in results.items() if result.forbidden},
        nll=dict(measured.nll),
        probe_nll=dict(measured.probe_nll),
    )


def decoding(gate: GateParams) -> dict:
    """The gate params a measurement depends on (the rules' thresholds do not change what is measured)."""
    return {"max_new_tokens": gate.max_new_tokens, "seed": gate.seed, "probe_max_tokens": gate.probe_max_tokens}


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def case_input(case: Case) -> str:
    """What the model was given for a case: its conversation and its reference (not its keywords)."""
    return _digest({"messages": case.messages(), "reference": case.reference})


def probe_input(probe: BaseAnswer) -> str:
    return _digest({"prompt": probe.prompt, "answer": probe.answer})


def write_baseline(
    path: Path, measured: Measurement, cases: list[Case], probes: list[BaseAnswer], decoding: dict
) -> None:
    def case_row(case: Case) -> dict:
        return {"input": case_input(case), "answer": measured.answers[case.id], "nll": measured.nll.get(case.id)}

    write_json_atomic(
        path,
        {
            "model": measured.name,
            "decoding": decoding,
            "cases": {case.id: case_row(case) for case in cases},
            "probes": {p.id: {"input": probe_input(p), "nll": measured.probe_nll[p.id]} for p in probes},
        },
    )


def read_baseline(path: Path, cases: list[Case], probes: list[BaseAnswer], decoding: dict) -> Measurement:
    """The base's measurement, refused when it was made for other cases, probes or decoding params."""
    rerun = "(run: dvc repro baseline)"
    try:
        stored = json.loads(Path(path).read_text(encoding="utf-8"))
        stored_cases, stored_probes = stored["cases"], stored["probes"]
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found {rerun}") from None
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise PipelineError(f"{path}: not a baseline measurement ({error}) {rerun}") from None
    if stored.get("decoding") != decoding:
        raise PipelineError(f"{path}: measured with {stored.get('decoding')}, the gate decodes with {decoding} {rerun}")
    for case in cases:
        if stored_cases.get(case.id, {}).get("input") != case_input(case):
            raise PipelineError(f"{path}: case {case.id!r} was not measured as data/gate_cases.jsonl has it {rerun}")
    for probe in probes:
        if stored_probes.get(probe.id, {}).get("input") != probe_input(probe):
            raise PipelineError(f"{path}: probe {probe.id!r} was not measured as the probes file has it {rerun}")
    return Measurement(
        name=stored.get("model", "before"),
        answers={case.id: stored_cases[case.id]["answer"] for case in cases},
        nll={case.id: stored_cases[case.id]["nll"] for case in cases if case.reference},
        probe_nll={probe.id: stored_probes[probe.id]["nll"] for probe in probes},
    )
