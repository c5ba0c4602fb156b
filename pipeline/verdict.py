"""The gate's rules and its verdict: what the gate writes and modelfile, deploy and rollback read.

Evidence per model (`Evidence`): each case's keyword score and forbidden words (pipeline/cases.py),
each case reference's likelihood, and the likelihood of the base's own answers to the general probes.
`judge` says why a model may not ship, against the base (before) and the merged HF model; `Verdict`
is models/gate/verdict.json as a typed record.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean

from pipeline.cases import Case
from pipeline.common import PipelineError, write_json_atomic
from pipeline.params import GateParams

VERDICT = Path("models/gate/verdict.json")
KINDS = ("learn", "keep")


@dataclass(frozen=True)
class Evidence:
    """What the gate measured on one model."""

    name: str  # before | merged | f16 | q8_0 | ...
    answers: dict[str, str]
    scores: dict[str, float]  # keyword score per case id, 0..1
    forbidden: dict[str, tuple[str, ...]] = field(default_factory=dict)  # case id -> forbidden words answered
    nll: dict[str, float] = field(default_factory=dict)  # case id -> reference NLL (cases with a reference)
    probe_nll: dict[str, float] = field(default_factory=dict)  # probe id -> NLL of the base's own answer


def kind_mean(cases: Iterable[Case], values: dict[str, float], kind: str) -> float | None:
    found = [values[case.id] for case in cases if case.kind == kind and case.id in values]
    return mean(found) if found else None


def forgetting(before: Evidence, after: Evidence) -> float | None:
    """Mean rise (nats/token) of the NLL of the base's own probe answers: how much of the base was lost."""
    if not before.probe_nll:
        return None
    return mean(after.probe_nll[probe] - before.probe_nll[probe] for probe in before.probe_nll)


def likelihood_holds(case: Case, before: Evidence, after: Evidence, rules: GateParams) -> bool | None:
    """The case's own likelihood rule (None: it has no reference): learn fell enough, keep rose little enough."""
    if case.id not in before.nll:
        return None
    change = after.nll[case.id] - before.nll[case.id]
    return -change >= rules.learn_min_nll_drop if case.kind == "learn" else change <= rules.keep_max_nll_rise


def unstable_cases(cases: list[Case], variants: list[Evidence], tolerance: float) -> list[str]:
    """Cases whose keyword score differs between two variants of one fine-tune (merged, GGUFs) whose reference
    NLLs agree within `tolerance`: between those two the model did not change on this case, its greedy answer
    flipped. One such pair is enough (f16 and q8_0 alike while q4_k_m's rounding moved further still says the
    keywords are noise here)."""
    unstable = []
    for case in cases:
        measured = [(variant.scores[case.id], variant.nll[case.id]) for variant in variants if case.id in variant.nll]
        if len(measured) == len(variants) and any(
            score_a != score_b and abs(nll_a - nll_b) <= tolerance
            for (score_a, nll_a), (score_b, nll_b) in itertools.combinations(measured, 2)
        ):
            unstable.append(case.id)
    return unstable


def decided_scores(
    cases: list[Case], before: Evidence, after: Evidence, unstable: Iterable[str], rules: GateParams
) -> dict[str, float]:
    """The keyword scores the rules use: as answered, except unstable cases, counted as `rules.unstable` says."""
    scores = dict(after.scores)
    by_id = {case.id: case for case in cases}
    for case_id in unstable:
        if rules.unstable == "fail":
            scores[case_id] = 0.0
        elif rules.unstable == "likelihood":
            scores[case_id] = 1.0 if likelihood_holds(by_id[case_id], before, after, rules) else 0.0
    return scores


def judge_keywords(
    cases: list[Case],
    before: dict[str, float],
    after: dict[str, float],
    rules: GateParams,
    forbidden: dict[str, tuple[str, ...]] | None = None,
    merged: dict[str, float] | None = None,
) -> list[str]:
    """Why keyword scores (per case id, 0..1) may not ship; empty: they may. Also the served check's rules."""
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
    if keep_after is not None and keep_after < keep_before - rules.keep_max_drop - 1e-9:
        dropped = [c.id for c in cases if c.kind == "keep" and after[c.id] < before[c.id]]
        reasons.append(
            f"keep: mean score fell {keep_before:.3f} -> {keep_after:.3f} (more than keep_max_drop "
            f"{rules.keep_max_drop}); regressed: {', '.join(dropped)}"
        )
    if merged is not None:
        overall_merged, overall_after = mean(merged.values()), mean(after[c] for c in merged)
        if overall_after < overall_merged - rules.gguf_max_drop - 1e-9:
            reasons.append(
                f"gguf: mean score {overall_after:.3f} below the merged model's {overall_merged:.3f} "
                f"by more than gguf_max_drop {rules.gguf_max_drop}"
            )
    for case_id, words in (forbidden or {}).items():
        if words:
            reasons.append(f"forbidden: case {case_id} answered with {', '.join(map(repr, words))}")
    return reasons


def judge_likelihood(cases: list[Case], before: Evidence, after: Evidence, rules: GateParams) -> list[str]:
    """Why the reference likelihoods and the forgetting measure may not ship; empty: they may."""
    reasons = []
    learn_before, learn_after = kind_mean(cases, before.nll, "learn"), kind_mean(cases, after.nll, "learn")
    if learn_before is not None and learn_before - learn_after < rules.learn_min_nll_drop:
        reasons.append(
            f"learn: reference NLL {learn_before:.3f} -> {learn_after:.3f} nats/token, fell less than "
            f"learn_min_nll_drop {rules.learn_min_nll_drop}"
        )
    keep_before, keep_after = kind_mean(cases, before.nll, "keep"), kind_mean(cases, after.nll, "keep")
    if keep_before is not None and keep_after - keep_before > rules.keep_max_nll_rise:
        risen = [c.id for c in cases if c.kind == "keep" and likelihood_holds(c, before, after, rules) is False]
        reasons.append(
            f"keep: reference NLL rose {keep_before:.3f} -> {keep_after:.3f} nats/token (more than "
            f"keep_max_nll_rise {rules.keep_max_nll_rise}); most risen: {', '.join(risen) or 'none alone'}"
        )
    lost = forgetting(before, after)
    if lost is not None and lost > rules.max_forgetting:
        worst = sorted(before.probe_nll, key=lambda p: before.probe_nll[p] - after.probe_nll[p])[:3]
        reasons.append(
            f"forgetting: the base's own answers to {len(before.probe_nll)} general probes are {lost:.3f} "
            f"nats/token less likely (more than max_forgetting {rules.max_forgetting}); most forgotten: "
            f"{', '.join(worst)}"
        )
    return reasons


def judge(
    cases: list[Case],
    before: Evidence,
    after: Evidence,
    rules: GateParams,
    merged: dict[str, float] | None = None,
    unstable: Iterable[str] = (),
) -> list[str]:
    """Why `after` may not ship (empty: it may): keyword rules on the decided scores, then likelihood rules.
    `merged`: the merged HF model's decided scores, for the GGUF rule."""
    scores = decided_scores(cases, before, after, unstable, rules)
    return judge_keywords(cases, before.scores, scores, rules, after.forbidden, merged) + judge_likelihood(
        cases, before, after, rules
    )


def sampling_options(gate: GateParams) -> dict:
    """Greedy decoding as Ollama's /api/chat options: what deploy's served check sends."""
    return {
        "temperature": 0,
        "top_k": 1,
        "seed": gate.seed,
        "num_predict": gate.max_new_tokens,
        "repeat_penalty": 1.0,  # Ollama's default 1.1 would change greedy answers
    }


# --- the verdict file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseVerdict:
    id: str
    kind: str
    before: float  # keyword scores: the base, the merged HF model, the judged GGUF as answered
    merged: float
    after: float
    answer: str  # the judged GGUF's greedy answer
    decided: float  # the score the rules used: `after`, unless the case was unstable
    unstable: bool = False
    nll_before: float | None = None
    nll_after: float | None = None

    @property
    def passed(self) -> bool:
        return self.decided == 1.0


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: tuple[str, ...]
    quant: str  # the GGUF judged: the one that ships when passed
    gguf: str
    gguf_sha256: str
    family: str  # chat family of pipeline.ollama_template
    system: str | None
    options: dict  # Ollama /api/chat options the gate's answers correspond to
    cases: tuple[CaseVerdict, ...]
    forgetting: float | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        data["cases"] = [{**asdict(case), "passed": case.passed} for case in self.cases]
        return data

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def from_json(cls, data: object, path: Path) -> Verdict:
        """A verdict, also one written before the likelihood evidence existed (rollback reads old tags)."""
        if not isinstance(data, dict) or not isinstance(data.get("passed"), bool):
            raise PipelineError(f"{path}: not a gate verdict (no boolean 'passed')")
        try:
            cases = tuple(
                CaseVerdict(
                    id=row["id"],
                    kind=row["kind"],
                    before=float(row["before"]),
                    merged=float(row.get("merged", row["after"])),
                    after=float(row["after"]),
                    answer=row.get("answer", ""),
                    decided=float(row.get("decided", row["after"])),
                    unstable=bool(row.get("unstable", False)),
                    nll_before=row.get("nll_before"),
                    nll_after=row.get("nll_after"),
                )
                for row in data.get("cases", [])
            )
            return cls(
                passed=data["passed"],
                reasons=tuple(data.get("reasons") or ()),
                quant=data.get("quant", ""),
                gguf=data.get("gguf", ""),
                gguf_sha256=data.get("gguf_sha256", ""),
                family=data.get("family", ""),
                system=data.get("system"),
                options=dict(data.get("options") or {}),
                cases=cases,
                forgetting=data.get("forgetting"),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise PipelineError(f"{path}: not a gate verdict ({type(error).__name__}: {error})") from None


def read_verdict(path: str | Path = VERDICT) -> Verdict:
    """The gate's verdict, passed or not; a PipelineError unless it exists and reads."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: no gate verdict; run the gate first (dvc repro gate)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PipelineError(f"{path}: unreadable gate verdict: {error}") from None
    return Verdict.from_json(data, path)


def load_verdict(path: str | Path = VERDICT) -> Verdict:
    """The gate's verdict; a PipelineError unless it exists, reads, and says passed."""
    verdict = read_verdict(path)
    if not verdict.passed:
        raise PipelineError(
            f"{path}: the gate failed, refusing to ship: {'; '.join(verdict.reasons) or 'no reason recorded'}"
        )
    return verdict
