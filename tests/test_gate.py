"""The gate's rules and verdict file."""

from __future__ import annotations

import json

import pytest

from pipeline.cases import Case
from pipeline.common import PipelineError
from pipeline.gate import judge, load_verdict
from pipeline.params import GateParams

CASES = [
    Case(id="l1", kind="learn", prompt="p", expect=("PROC",)),
    Case(id="l2", kind="learn", prompt="p", expect=("GET",)),
    Case(id="k1", kind="keep", prompt="p", expect=("Paris",)),
    Case(id="k2", kind="keep", prompt="p", expect=("7",)),
]
BEFORE = {"l1": 0.0, "l2": 0.0, "k1": 1.0, "k2": 1.0}


def test_a_model_that_learned_and_kept_passes():
    assert judge(CASES, BEFORE, {"l1": 1.0, "l2": 1.0, "k1": 1.0, "k2": 1.0}, GateParams()) == []


def test_learning_too_little_fails_with_score_and_gain():
    reasons = judge(CASES, BEFORE, {"l1": 0.5, "l2": 0.0, "k1": 1.0, "k2": 1.0}, GateParams())
    assert reasons == [
        "learn: mean score 0.250 < learn_min_score 0.75",
        "learn: gain over the base +0.250 < learn_min_gain 0.5",
    ]


def test_a_regressed_keep_case_beyond_the_tolerance_fails_and_is_named():
    reasons = judge(CASES, BEFORE, {"l1": 1.0, "l2": 1.0, "k1": 1.0, "k2": 0.0}, GateParams())
    assert reasons == ["keep: mean score fell 1.000 -> 0.500 (more than keep_max_drop 0.125); regressed: k2"]
    assert judge(CASES, BEFORE, {"l1": 1.0, "l2": 1.0, "k1": 1.0, "k2": 0.0}, GateParams(keep_max_drop=0.5)) == []


def test_a_gguf_that_lost_the_fine_tune_against_the_merged_model_fails():
    merged = {"l1": 1.0, "l2": 1.0, "k1": 1.0, "k2": 1.0}
    after = {"l1": 1.0, "l2": 0.5, "k1": 1.0, "k2": 0.5}
    reasons = judge(CASES, BEFORE, after, GateParams(learn_min_score=0.5, keep_max_drop=1), merged=merged)
    assert reasons == ["gguf: mean score 0.750 below the merged model's 1.000 by more than gguf_max_drop 0.125"]


def test_a_forbidden_keyword_fails_the_gate():
    after = {"l1": 1.0, "l2": 1.0, "k1": 1.0, "k2": 1.0}
    assert judge(CASES, BEFORE, after, GateParams(), forbidden={"l1": ("def ",), "l2": ()}) == [
        "forbidden: case l1 answered with 'def '"
    ]


def test_deploy_refuses_a_missing_or_failed_verdict(tmp_path):
    path = tmp_path / "verdict.json"
    with pytest.raises(PipelineError, match="no gate verdict; run the gate first"):
        load_verdict(path)
    path.write_text(json.dumps({"passed": False, "reasons": ["keep: mean score fell"]}))
    with pytest.raises(PipelineError, match="the gate failed, refusing to ship: keep: mean score fell"):
        load_verdict(path)
    path.write_text("{")
    with pytest.raises(PipelineError, match="unreadable gate verdict"):
        load_verdict(path)
    path.write_text(json.dumps({"passed": True, "quant": "q8_0"}))
    assert load_verdict(path)["quant"] == "q8_0"
