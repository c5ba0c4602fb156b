"""The gate's rules (pipeline/verdict.py): keyword and likelihood rules, forgetting, unstable cases, the
verdict file."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.cases import Case
from pipeline.common import PipelineError
from pipeline.gate import decide, report_markdown
from pipeline.params import GateParams
from pipeline.verdict import (
    Evidence,
    Verdict,
    decided_scores,
    forgetting,
    judge,
    judge_keywords,
    load_verdict,
    read_verdict,
    unstable_cases,
)

CASES = [
    Case(id="l1", kind="learn", prompt="p", expect=("PROC",), reference="PROC main:"),
    Case(id="l2", kind="learn", prompt="p", expect=("GET",), reference="GET"),
    Case(id="k1", kind="keep", prompt="p", expect=("Paris",), reference="Paris."),
    Case(id="k2", kind="keep", prompt="p", expect=("7",), reference="7 days."),
]
BEFORE = {"l1": 0.0, "l2": 0.0, "k1": 1.0, "k2": 1.0}
RULES = GateParams(learn_min_score=0.75, learn_min_gain=0.5, keep_max_drop=0.125)


def evidence(name: str, scores: dict, nll: dict | None = None, probes: dict | None = None, **kw) -> Evidence:
    answers = {case_id: f"answer {case_id}" for case_id in scores}
    return Evidence(name, answers, scores, nll=nll or {}, probe_nll=probes or {}, **kw)


BASE = evidence("before", BEFORE, {"l1": 4.0, "l2": 4.0, "k1": 0.5, "k2": 0.5}, {"p1": 1.0, "p2": 2.0, "p3": 1.5})
GOOD_NLL = {"l1": 1.0, "l2": 1.5, "k1": 0.5, "k2": 0.6}
GOOD_PROBES = {"p1": 1.1, "p2": 2.1, "p3": 1.6}
ALL_PASS = {"l1": 1.0, "l2": 1.0, "k1": 1.0, "k2": 1.0}


def test_a_model_that_learned_kept_and_forgot_little_passes():
    assert judge(CASES, BASE, evidence("q8_0", ALL_PASS, GOOD_NLL, GOOD_PROBES), RULES) == []


def test_learning_too_little_fails_with_score_and_gain():
    reasons = judge_keywords(CASES, BEFORE, {"l1": 0.5, "l2": 0.0, "k1": 1.0, "k2": 1.0}, RULES)
    assert reasons == [
        "learn: mean score 0.250 < learn_min_score 0.75",
        "learn: gain over the base +0.250 < learn_min_gain 0.5",
    ]


def test_a_regressed_keep_case_beyond_the_tolerance_fails_and_is_named():
    reasons = judge_keywords(CASES, BEFORE, {"l1": 1.0, "l2": 1.0, "k1": 1.0, "k2": 0.0}, RULES)
    assert reasons == ["keep: mean score fell 1.000 -> 0.500 (more than keep_max_drop 0.125); regressed: k2"]
    assert (
        judge_keywords(CASES, BEFORE, {"l1": 1.0, "l2": 1.0, "k1": 1.0, "k2": 0.0}, GateParams(keep_max_drop=0.5)) == []
    )


def test_with_no_keep_tolerance_any_regressed_keep_case_fails():
    rules = GateParams(keep_max_drop=0.0)
    assert judge_keywords(CASES, BEFORE, ALL_PASS, rules) == []
    assert judge_keywords(CASES, BEFORE, {**ALL_PASS, "k1": 0.0}, rules)[0].startswith("keep: mean score fell 1.000")


def test_a_gguf_that_lost_the_fine_tune_against_the_merged_model_fails():
    after = {"l1": 1.0, "l2": 0.5, "k1": 1.0, "k2": 0.5}
    reasons = judge_keywords(CASES, BEFORE, after, GateParams(learn_min_score=0.5, keep_max_drop=1), merged=ALL_PASS)
    assert reasons == ["gguf: mean score 0.750 below the merged model's 1.000 by more than gguf_max_drop 0.125"]


def test_a_forbidden_keyword_fails_the_gate():
    assert judge_keywords(CASES, BEFORE, ALL_PASS, RULES, forbidden={"l1": ("def ",), "l2": ()}) == [
        "forbidden: case l1 answered with 'def '"
    ]


def test_a_learn_reference_that_did_not_become_likely_fails_the_likelihood_rule():
    after = evidence("f16", ALL_PASS, {**GOOD_NLL, "l1": 3.9, "l2": 3.8}, GOOD_PROBES)
    assert judge(CASES, BASE, after, RULES) == [
        "learn: reference NLL 4.000 -> 3.850 nats/token, fell less than learn_min_nll_drop 0.5"
    ]


def test_a_keep_reference_that_became_unlikely_fails_and_names_the_case():
    after = evidence("f16", ALL_PASS, {**GOOD_NLL, "k2": 1.5}, GOOD_PROBES)
    assert judge(CASES, BASE, after, RULES) == [
        "keep: reference NLL rose 0.500 -> 1.000 nats/token (more than keep_max_nll_rise 0.25); most risen: k2"
    ]


def test_forgetting_is_the_mean_rise_of_the_base_answers_nll_and_fails_beyond_max_forgetting():
    after = evidence("f16", ALL_PASS, GOOD_NLL, {"p1": 1.9, "p2": 2.2, "p3": 2.4})
    assert forgetting(BASE, after) == pytest.approx((0.9 + 0.2 + 0.9) / 3)
    assert judge(CASES, BASE, after, RULES) == [
        "forgetting: the base's own answers to 3 general probes are 0.667 nats/token less likely (more than "
        "max_forgetting 0.25); most forgotten: p1, p3, p2"
    ]
    assert judge(CASES, BASE, after, GateParams(max_forgetting=0.7)) == []


def test_a_case_whose_keyword_score_flips_while_the_likelihoods_agree_is_unstable():
    merged = evidence("merged", ALL_PASS, GOOD_NLL)
    q8 = evidence("q8_0", ALL_PASS, {**GOOD_NLL, "l2": 1.55})
    q4 = evidence("q4_k_m", {**ALL_PASS, "l2": 0.0}, {**GOOD_NLL, "l2": 1.58})
    assert unstable_cases(CASES, [merged, q8, q4], tolerance=0.1) == ["l2"]
    # the same flip with likelihoods that disagree is a real difference between the models
    far = evidence("q4_k_m", {**ALL_PASS, "l2": 0.0}, {**GOOD_NLL, "l2": 3.0})
    assert unstable_cases(CASES, [merged, q8, far], tolerance=0.1) == []


def test_one_pair_of_variants_that_agree_on_the_likelihood_but_not_the_keywords_makes_a_case_unstable():
    # f16 and q8_0 are the same model on l2 (NLL 1.50 / 1.52) yet answer differently; q4_k_m's rounding moved it
    f16 = evidence("f16", ALL_PASS, {**GOOD_NLL, "l2": 1.50})
    q8 = evidence("q8_0", {**ALL_PASS, "l2": 0.0}, {**GOOD_NLL, "l2": 1.52})
    q4 = evidence("q4_k_m", ALL_PASS, {**GOOD_NLL, "l2": 1.75})
    assert unstable_cases(CASES, [f16, q8, q4], tolerance=0.1) == ["l2"]
    # the flip is only between variants that are far apart: a real difference
    assert unstable_cases(CASES, [f16, evidence("q8_0", ALL_PASS, {**GOOD_NLL, "l2": 1.52}),
                                  evidence("q4_k_m", {**ALL_PASS, "l2": 0.0}, {**GOOD_NLL, "l2": 1.75})],
                          tolerance=0.1) == []  # fmt: skip


def test_unstable_cases_count_as_the_rule_set_says():
    q4 = evidence("q4_k_m", {**ALL_PASS, "l2": 0.0}, {**GOOD_NLL, "l2": 1.58}, GOOD_PROBES)
    decided = {mode: decided_scores(CASES, BASE, q4, ["l2"], GateParams(unstable=mode))["l2"] for mode in
               ("likelihood", "keywords", "fail")}  # fmt: skip
    assert decided == {"likelihood": 1.0, "keywords": 0.0, "fail": 0.0}  # 4.0 -> 1.58 fell by more than 0.5


def test_the_verdict_reports_a_flipping_case_as_unstable_and_decides_it_by_likelihood(tmp_path):
    gguf = tmp_path / "model-q4_k_m.gguf"
    gguf.write_bytes(b"GGUF")
    evidences = {
        "before": BASE,
        "merged": evidence("merged", ALL_PASS, GOOD_NLL, GOOD_PROBES),
        "q8_0": evidence("q8_0", ALL_PASS, {**GOOD_NLL, "l2": 1.55}, GOOD_PROBES),
        "q4_k_m": evidence("q4_k_m", {**ALL_PASS, "l2": 0.0}, {**GOOD_NLL, "l2": 1.58}, GOOD_PROBES),
    }
    result = decide(CASES, evidences, {"q8_0": 2000, "q4_k_m": 1000}, dataclasses.replace(RULES, ship="q4_k_m"))
    assert result.unstable == ["l2"] and result.shipped == "q4_k_m"  # as answered, 0.5 < learn_min_score
    verdict = result.verdict(gguf, "chatml", None, RULES)
    row = next(c for c in verdict.cases if c.id == "l2")
    assert (row.after, row.decided, row.unstable, row.passed) == (0.0, 1.0, True, True)
    assert (row.nll_before, row.nll_after) == (4.0, 1.58)
    assert result.metrics()["unstable"] == 1
    report = report_markdown(result)
    assert "Unstable (keyword score differs between two variants whose reference NLLs agree): l2." in report
    assert "| l2 | learn | 0.00 | 1.00* | 1.00* | 0.00* | 4.000 → 1.580 |" in report

    strict = decide(CASES, evidences, {"q8_0": 2000, "q4_k_m": 1000}, GateParams(unstable="keywords"))
    assert strict.shipped == "q8_0" and strict.reasons["q4_k_m"][0] == "learn: mean score 0.500 < learn_min_score 0.75"


def test_auto_ships_the_smallest_gguf_that_passes_on_its_answers_as_given_before_one_that_needs_unstable_cases():
    evidences = {
        "before": BASE,
        "merged": evidence("merged", ALL_PASS, GOOD_NLL, GOOD_PROBES),
        "q8_0": evidence("q8_0", ALL_PASS, {**GOOD_NLL, "l2": 1.55}, GOOD_PROBES),
        "q4_k_m": evidence("q4_k_m", {**ALL_PASS, "l2": 0.0}, {**GOOD_NLL, "l2": 1.58}, GOOD_PROBES),
    }
    result = decide(CASES, evidences, {"q8_0": 2000, "q4_k_m": 1000}, RULES)
    assert result.reasons["q4_k_m"] == [] and result.as_answered["q4_k_m"] != []  # passes only as decided
    assert result.shipped == result.judged == "q8_0"
    assert result.choice_note == (
        "`q4_k_m` passed too, but only with unstable cases decided by their likelihood; `q8_0` passes on its "
        "answers as given."
    )
    assert result.choice_note in report_markdown(result)
    # when no GGUF passes as answered, the smallest that passes as decided ships
    evidences["q8_0"] = evidence("q8_0", {**ALL_PASS, "l2": 0.0}, {**GOOD_NLL, "l2": 1.55}, GOOD_PROBES)
    fallback = decide(CASES, evidences, {"q8_0": 2000, "q4_k_m": 1000}, RULES)
    assert fallback.shipped == "q4_k_m" and fallback.choice_note is None


def test_the_verdict_file_round_trips_and_deploy_refuses_a_missing_or_failed_one(tmp_path):
    path = tmp_path / "verdict.json"
    with pytest.raises(PipelineError, match="no gate verdict; run the gate first"):
        load_verdict(path)
    path.write_text(json.dumps({"passed": False, "reasons": ["keep: mean score fell"]}))
    with pytest.raises(PipelineError, match="the gate failed, refusing to ship: keep: mean score fell"):
        load_verdict(path)
    assert read_verdict(path).passed is False
    path.write_text("{")
    with pytest.raises(PipelineError, match="unreadable gate verdict"):
        load_verdict(path)
    path.write_text(json.dumps({"passed": True, "cases": [{"id": "x"}]}))
    with pytest.raises(PipelineError, match=r"not a gate verdict \(KeyError: 'kind'\)"):
        load_verdict(path)

    gguf = tmp_path / "model-q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    evidences = {"before": BASE, **{n: evidence(n, ALL_PASS, GOOD_NLL, GOOD_PROBES) for n in ("merged", "q8_0")}}
    verdict = decide(CASES, evidences, {"q8_0": 4}, RULES).verdict(gguf, "chatml", None, RULES)
    verdict.write(path)
    assert load_verdict(path) == verdict and verdict.forgetting == pytest.approx(0.1)


def test_a_verdict_written_before_the_likelihood_evidence_still_reads(tmp_path):
    """Rollback reads the verdicts of older tags."""
    path = tmp_path / "verdict.json"
    old = {"passed": True, "reasons": [], "quant": "q4_k_m", "gguf": "models/gguf/model-q4_k_m.gguf",
           "gguf_sha256": "ab", "family": "chatml-smollm2", "system": None, "options": {"top_k": 1},
           "cases": [{"id": "k1", "kind": "keep", "before": 1.0, "merged": 1.0, "after": 1.0, "passed": True,
                      "answer": "Paris"}]}  # fmt: skip
    path.write_text(json.dumps(old))
    verdict = load_verdict(path)
    assert isinstance(verdict, Verdict) and verdict.forgetting is None
    assert verdict.cases[0].decided == 1.0 and verdict.cases[0].unstable is False and verdict.cases[0].nll_after is None


def test_a_failed_gate_fails_the_stage_except_in_a_sweep_where_it_is_recorded(tmp_path, monkeypatch, caplog):
    """LLM_GITOPS_GATE_NO_FAIL=1 (set by pipeline.sweep): the failing verdict is written and the stage exits 0,
    so DVC records the experiment; without it the stage fails. The verdict says failed either way."""
    from pipeline import gate

    (tmp_path / "gguf").mkdir()
    for name in ("f16", "q8_0"):
        (tmp_path / "gguf" / f"model-{name}.gguf").write_bytes(b"GGUF")
    (tmp_path / "params.yaml").write_text("quantize:\n  types: [q8_0]\n")
    (tmp_path / "cases.jsonl").write_text(
        "".join(json.dumps({"id": c.id, "kind": c.kind, "prompt": "p", "expect": list(c.expect)}) + "\n" for c in CASES)
    )
    (tmp_path / "probes.jsonl").write_text(json.dumps({"id": "p1", "prompt": "q", "answer": "a", "finished": True}))
    failing = {"before": BASE, **{n: evidence(n, BEFORE, GOOD_NLL, GOOD_PROBES) for n in ("merged", "f16", "q8_0")}}

    def measured(cases, probes, base, merged, ggufs, rules, system):
        result = decide(cases, failing, {"f16": 8, "q8_0": 4}, rules)
        return result, result.verdict(ggufs[result.judged], "chatml", system, rules)

    monkeypatch.setattr(gate, "run_gate", measured)
    argv = ["--params", str(tmp_path / "params.yaml"), "--cases", str(tmp_path / "cases.jsonl"),
            "--probes", str(tmp_path / "probes.jsonl"), "--gguf-dir", str(tmp_path / "gguf"),
            "--metrics", str(tmp_path / "gate.json"), "--report", str(tmp_path / "gate.md"),
            "--verdict", str(tmp_path / "verdict.json")]  # fmt: skip
    monkeypatch.delenv("LLM_GITOPS_GATE_NO_FAIL", raising=False)
    with pytest.raises(PipelineError, match="gate failed:\n  no GGUF passed the gate"):
        gate.main(argv)
    (tmp_path / "verdict.json").unlink()
    monkeypatch.setenv("LLM_GITOPS_GATE_NO_FAIL", "1")
    gate.main(argv)  # returns: exit 0
    assert read_verdict(tmp_path / "verdict.json").passed is False
    assert json.loads((tmp_path / "gate.json").read_text())["passed"] is False
    assert "exit 0 so the sweep records this point" in caplog.text
