"""The base model's measurement, kept by stage baseline between retrains (pipeline/evidence.py): the gate
reads it back only when it was made for the same cases, probes and decoding params."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.cases import Case
from pipeline.common import PipelineError
from pipeline.evidence import Measurement, read_baseline, score, write_baseline
from pipeline.prompts import BaseAnswer

CASES = [
    Case(id="keep-week", kind="keep", prompt="How many days are in a week?", expect=("7",), reference="7 days."),
    Case(id="learn-proc", kind="learn", prompt="How does an OPL procedure start?", expect=("PROC",)),
]
PROBES = [BaseAnswer("probe-spain", "What is the capital of Spain?", "Madrid.", finished=True)]
DECODING = {"max_new_tokens": 96, "seed": 42}
MEASURED = Measurement(
    name="before",
    answers={"keep-week": "A week has 7 days.", "learn-proc": "I do not know OPL."},
    nll={"keep-week": 0.61},
    probe_nll={"probe-spain": 0.35},
)


@pytest.fixture
def baseline_file(tmp_path):
    path = tmp_path / "models" / "baseline" / "evidence.json"
    write_baseline(path, MEASURED, CASES, PROBES, DECODING)
    return path


def test_the_measurement_reads_back_as_written_and_is_scored_by_the_cases_as_they_are_now(baseline_file):
    assert read_baseline(baseline_file, CASES, PROBES, DECODING) == MEASURED
    # keywords are not part of what was measured: a case that now expects "seven" rescores the same answer
    stricter = [dataclasses.replace(CASES[0], expect=("seven",)), CASES[1]]
    evidence = score(stricter, read_baseline(baseline_file, stricter, PROBES, DECODING))
    assert evidence.scores == {"keep-week": 0.0, "learn-proc": 0.0}
    assert evidence.nll == {"keep-week": 0.61} and evidence.probe_nll == {"probe-spain": 0.35}


def test_a_case_whose_prompt_or_reference_changed_since_the_measurement_is_refused_by_name(baseline_file):
    reworded = [dataclasses.replace(CASES[0], reference="Seven days."), CASES[1]]
    with pytest.raises(PipelineError, match=r"case 'keep-week' was not measured as .* \(run: dvc repro baseline\)"):
        read_baseline(baseline_file, reworded, PROBES, DECODING)
    added = [*CASES, Case(id="keep-new", kind="keep", prompt="What is 3 + 3?", expect=("6",))]
    with pytest.raises(PipelineError, match="case 'keep-new' was not measured"):
        read_baseline(baseline_file, added, PROBES, DECODING)


def test_other_probe_answers_or_decoding_params_are_refused(baseline_file):
    other_answer = [BaseAnswer("probe-spain", "What is the capital of Spain?", "Barcelona.", finished=True)]
    with pytest.raises(PipelineError, match="probe 'probe-spain' was not measured"):
        read_baseline(baseline_file, CASES, other_answer, DECODING)
    with pytest.raises(PipelineError, match=r"measured with .*'max_new_tokens': 96.*the gate decodes with .*64"):
        read_baseline(baseline_file, CASES, PROBES, {**DECODING, "max_new_tokens": 64})


def test_a_missing_or_foreign_file_names_itself_and_the_stage_to_run(tmp_path):
    with pytest.raises(PipelineError, match=r"evidence.json: not found \(run: dvc repro baseline\)"):
        read_baseline(tmp_path / "evidence.json", CASES, PROBES, DECODING)
    (tmp_path / "verdict.json").write_text('{"passed": true}')
    with pytest.raises(PipelineError, match=r"verdict.json: not a baseline measurement"):
        read_baseline(tmp_path / "verdict.json", CASES, PROBES, DECODING)
