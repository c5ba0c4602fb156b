"""Stage gate: may this model ship? Before/after keyword scores on the gate cases.

    python -m pipeline.gate

Scores every case of data/gate_cases.jsonl (pipeline/cases.py) with greedy answers from
- before: the base model (models/base, its own chat template);
- merged: the fine-tuned HF model (models/merged), to measure what conversion and quantization lose;
- each GGUF the pipeline produced, run in llama.cpp with the prompt rendered exactly as Ollama renders it
  from the Modelfile TEMPLATE.
Rules (params.yaml gate): learn cases must reach a score and gain over the base; keep cases must not
drop below the base by more than a tolerance (the overtraining check); a GGUF must not lose more than a
tolerance against the merged model; no answer may contain a forbidden keyword.

Writes metrics/gate.json (DVC metrics), reports/gate.md and models/gate/verdict.json, which the deploy
command requires to say passed. A failed gate writes all three, then exits 1 with the reasons.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

from pipeline.cases import Case
from pipeline.common import PipelineError
from pipeline.params import GateParams

VERDICT = Path("models/gate/verdict.json")


def kind_mean(cases: list[Case], scores: dict[str, float], kind: str) -> float | None:
    values = [scores[case.id] for case in cases if case.kind == kind]
    return mean(values) if values else None


def judge(
    cases: list[Case],
    before: dict[str, float],
    after: dict[str, float],
    rules: GateParams,
    forbidden: dict[str, tuple[str, ...]] | None = None,
    merged: dict[str, float] | None = None,
) -> list[str]:
    """Why `after` may not ship (empty: it may). Scores are per case id, 0..1 (Case.score)."""
    reasons = []
    learn_before, learn_after = kind_mean(cases, before, "learn"), kind_mean(cases, after, "learn")
    if learn_after is not None:
        if learn_after < rules.learn_min_score:
            reasons.append(f"learn: mean score {learn_after:.3f} < learn_min_score {rules.learn_min_score}")
        if learn_after - learn_before < rules.learn_min_gain:
            reasons.append(
                f"learn: gain over the base {learn_after - learn_before:+.3f} < learn_min_gain {rules.learn_min_gain}"
            )
    keep_before, keep_after = kind_mean(cases, before, "keep"), kind_mean(cases, after, "keep")
    if keep_after is not None and keep_after < keep_before - rules.keep_max_drop:
        dropped = [c.id for c in cases if c.kind == "keep" and after[c.id] < before[c.id]]
        reasons.append(
            f"keep: mean score fell {keep_before:.3f} -> {keep_after:.3f} (more than keep_max_drop "
            f"{rules.keep_max_drop}); regressed: {', '.join(dropped)}"
        )
    if merged is not None:
        overall_merged, overall_after = mean(merged.values()), mean(after[c] for c in merged)
        if overall_after < overall_merged - rules.gguf_max_drop:
            reasons.append(
                f"gguf: mean score {overall_after:.3f} below the merged model's {overall_merged:.3f} "
                f"by more than gguf_max_drop {rules.gguf_max_drop}"
            )
    for case_id, words in (forbidden or {}).items():
        if words:
            reasons.append(f"forbidden: case {case_id} answered with {', '.join(map(repr, words))}")
    return reasons


def load_verdict(path: str | Path = VERDICT) -> dict:
    """The gate's verdict; a PipelineError unless it exists, reads, and says passed."""
    path = Path(path)
    try:
        verdict = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: no gate verdict; run the gate first (dvc repro gate)") from None
    except (OSError, json.JSONDecodeError) as error:
        raise PipelineError(f"{path}: unreadable gate verdict: {error}") from None
    if not isinstance(verdict, dict) or not isinstance(verdict.get("passed"), bool):
        raise PipelineError(f"{path}: not a gate verdict (no boolean 'passed')")
    if not verdict["passed"]:
        reasons = "; ".join(verdict.get("reasons") or ["no reason recorded"])
        raise PipelineError(f"{path}: the gate failed, refusing to ship: {reasons}")
    return verdict
