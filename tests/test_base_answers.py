"""Stage base_answers and what it feeds: the general prompt files, replay into training, the step budget."""

from __future__ import annotations

import json

import pytest

from pipeline import base_answers
from pipeline.base_answers import replayable
from pipeline.common import PipelineError, read_jsonl
from pipeline.params import TrainParams
from pipeline.prompts import BaseAnswer, load_prompts, prompts_or_raise, read_base_answers
from pipeline.train import replay_mix, step_budget
from tests.conftest import DATA


def test_the_committed_general_prompts_are_valid_and_probes_differ_from_replay():
    probes = prompts_or_raise(DATA / "general" / "probes.jsonl")
    replay = prompts_or_raise(DATA / "general" / "replay.jsonl")
    assert len(probes) >= 40 and len(replay) >= 40
    assert not {p.prompt for p in probes} & {p.prompt for p in replay}  # forgetting is measured on unseen prompts
    assert sum("Python" in p.prompt for p in probes) >= 3  # code in other languages must stay in that language


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "a"}', "prompt: required, a non-empty string"),
        ('{"id": "a", "prompt": " "}', "prompt: required, a non-empty string"),
        ('{"id": "a", "prompt": "Hi", "answer": "x"}', "answer: unknown key (known: id, prompt)"),
        ('{"id": "first", "prompt": "Hi"}', "id: duplicate id 'first' (first on line 1)"),
        ('{"id": "b", "prompt": "What is 2 + 2?"}', "prompt: same prompt as line 1"),
        ('["a"]', "expected a JSON object"),
        ('{"id": "b", "prompt": ', "invalid JSON"),
    ],
)
def test_each_bad_prompt_names_its_line_and_field(tmp_path, line, message):
    path = tmp_path / "probes.jsonl"
    path.write_text('{"id": "first", "prompt": "What is 2 + 2?"}\n' + line + "\n")
    errors: list[str] = []
    load_prompts(path, errors)
    assert len(errors) == 1 and errors[0].startswith(f"{path}:2: {message}")


def test_a_cut_replay_answer_keeps_its_complete_paragraphs_or_is_dropped():
    code = "```python\ndef f():\n    return 1\n```"
    cut = BaseAnswer("r", "Write f.", code + "\n\nThis function retur", finished=False)
    assert replayable(cut) == BaseAnswer("r", "Write f.", code, finished=False)
    assert replayable(BaseAnswer("r", "p", "One long sentence that was cut in the mid", False)) is None
    assert replayable(BaseAnswer("r", "p", "Short.\n\n" + "x" * 80, False)) is None  # too little left
    done = BaseAnswer("r", "p", "Paris.", True)
    assert replayable(done) is done and replayable(BaseAnswer("r", "p", "", True)) is None


def test_replay_is_a_share_of_the_training_conversations_in_file_order():
    rows = [{"messages": [i]} for i in range(10)]
    assert replay_mix(rows, 0.5, 8) == rows[:4]
    assert replay_mix(rows, 2.0, 8) == rows  # never more than there are
    assert replay_mix(rows, 0.0, 8) == []


def test_the_step_budget_gives_a_small_dataset_more_passes_but_never_more_than_epochs():
    budget = TrainParams(epochs=12, max_steps=42, batch_size=8)
    assert step_budget(budget, 84) == 42  # 11 steps per epoch: 42 steps, under 4 passes
    assert step_budget(budget, 25) == 42  # 4 steps per epoch: 42 steps, over 10 passes
    assert step_budget(budget, 8) == 12  # 1 step per epoch: capped at 12 epochs
    assert step_budget(TrainParams(epochs=6, max_steps=-1), 84) == -1  # exactly `epochs` epochs


def test_with_cycles_the_budget_is_that_many_cycles_of_the_step_budget():
    cycling = TrainParams(epochs=12, max_steps=42, batch_size=8, cycles=3)
    assert step_budget(cycling, 84) == 126  # 3 cycles of 42 steps
    assert step_budget(cycling, 8) == 36  # a cycle is still at most 12 passes: 3 cycles of 12 steps
    assert step_budget(TrainParams(epochs=2, max_steps=-1, batch_size=8, cycles=2), 84) == 44  # 2 x 2 epochs of 11


def test_the_stage_writes_probe_answers_and_replay_conversations_from_the_base(tiny_base, tmp_path):
    probes, replay = tmp_path / "probes.jsonl", tmp_path / "replay.jsonl"
    probes.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Question {i}?"}) + "\n" for i in range(3)))
    replay.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Task {i}."}) + "\n" for i in range(3)))
    params = tmp_path / "params.yaml"
    params.write_text("base_answers:\n  max_new_tokens: 8\n")
    out, metrics = tmp_path / "answers", tmp_path / "metrics.json"
    argv = ["--params", str(params), "--base", str(tiny_base), "--probes", str(probes), "--replay", str(replay),
            "--out", str(out), "--metrics", str(metrics)]  # fmt: skip
    base_answers.main(argv)
    answers = read_base_answers(out / "probes.jsonl")
    assert [a.id for a in answers] == ["p0", "p1", "p2"] and all(a.answer for a in answers)
    counts = json.loads(metrics.read_text())
    assert counts["probes"] == 3 and counts["replay"] + counts["replay_dropped_unfinished"] == 3
    for row in read_jsonl(out / "replay.jsonl"):
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    first = (out / "probes.jsonl").read_bytes()
    base_answers.main(argv)
    assert (out / "probes.jsonl").read_bytes() == first  # greedy: the same answers every run


def test_a_missing_base_answers_file_says_which_stage_to_run(tmp_path):
    with pytest.raises(PipelineError, match=r"not found; run the base_answers stage first \(dvc repro base_answers\)"):
        read_base_answers(tmp_path / "probes.jsonl")
