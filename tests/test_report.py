"""The MR report on a scratch copy of the project (real git, real DVC), branch `mr` against `main`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from scratch_project import copy_project, git

from pipeline.common import PipelineError
from pipeline.dataset import parse_example
from pipeline.dvc_status import downstream_of, is_input_change, stale_stages
from pipeline.plots import sweep_png as sweep_picture
from pipeline.report import (
    build_report,
    cases_section,
    dataset_section,
    lengths_picture,
    make_counter,
    pictures_of,
    word_counter,
)

ROOT = Path(__file__).resolve().parent.parent
WORDS = word_counter("test")
ADDED = {
    "messages": [
        {"role": "user", "content": "How do I make the Psion beep?"},
        {"role": "assistant", "content": "BEEP 5,300"},
    ]
}


@pytest.fixture(scope="module")
def main_repo(tmp_path_factory) -> Path:
    return copy_project(tmp_path_factory.mktemp("report") / "main")


@pytest.fixture
def repo(main_repo, tmp_path, monkeypatch) -> Path:
    """A clone of the scratch project on a new branch `mr`; `main` is the target. DVC is on PATH."""
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(main_repo), str(clone))
    git(clone, "checkout", "-q", "-b", "mr")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return clone


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_rows(path: Path, data: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in data))


def commit(repo: Path, message: str = "change") -> None:
    git(repo, "commit", "-q", "-a", "-m", message)


def words(messages: list[dict]) -> int:
    return sum(len(m["content"].split()) for m in messages)


def messages_of(row: dict) -> list[dict]:
    """Both dataset formats (chat, legacy Llama-2 text) as messages."""
    return parse_example(row)[0]


def test_conversations_are_matched_by_question_into_added_removed_and_changed(repo):
    train = repo / "data" / "train.jsonl"
    before = rows(train)
    after = [dict(row) for row in before]
    removed = after.pop(2)
    assert "messages" in removed and "messages" in after[0]
    changed = after[0]
    changed["messages"] = [*changed["messages"][:-1], {"role": "assistant", "content": "PROC main: ENDP"}]
    after.append(ADDED)
    write_rows(train, after)
    commit(repo)

    text = "\n".join(dataset_section("origin/main", repo, lambda corpus: WORDS))
    total_before = sum(words(messages_of(r)) for r in before)
    total_after = sum(words(messages_of(r)) for r in after)
    assert (
        f"| `data/train.jsonl` | {len(before)} → {len(before)} | 1 | 1 | 1 | {total_before} → {total_after} "
        f"({total_after - total_before:+d}) |" in text
    )
    assert "| `data/eval.jsonl` | 9 → 9 | 0 | 0 | 0 |" in text
    assert f"| added | {len(after)} | How do I make the Psion beep? | +{words(ADDED['messages'])} |" in text
    assert f"| removed | 3 | {removed['messages'][0]['content']} | -{words(removed['messages'])} |" in text
    delta = words(changed["messages"]) - words(before[0]["messages"])
    assert f"| changed | 1 | Write a Hello Chris program for the Psion. | {delta:+d} |" in text
    assert "Lengths are whitespace-separated **words**" in text


def test_a_new_answer_to_a_question_already_in_the_data_counts_as_one_added_row(repo):
    train = repo / "data" / "train.jsonl"
    before = rows(train)
    question = before[1]["messages"][:-1]  # the system message and the question of line 2
    another = {"messages": [*question, {"role": "assistant", "content": 'PROC hi:\n  PRINT "Hi"\nENDP'}]}
    write_rows(train, [*before, another])
    commit(repo)

    text = "\n".join(dataset_section("origin/main", repo, lambda corpus: WORDS))
    assert f"| `data/train.jsonl` | {len(before)} → {len(before) + 1} | 1 | 0 | 0 |" in text
    assert f"| added | {len(before) + 1} | {question[-1]['content']} | +{words(another['messages'])} |" in text
    assert "prepare will reject" not in text  # another answer is not a duplicate


def test_rows_prepare_rejects_are_counted_listed_and_named_by_line(repo):
    train = repo / "data" / "train.jsonl"
    before = rows(train)
    write_rows(train, [*before, before[0]])  # a copy of the whole first conversation
    with open(train, "a") as handle:
        handle.write("{not json\n")
    commit(repo)

    text = "\n".join(dataset_section("origin/main", repo, lambda corpus: WORDS))
    n = len(before)
    assert f"| `data/train.jsonl` | {n} → {n + 2} | 2 | 0 | 0 |" in text
    assert "- `data/train.jsonl`: prepare will reject 2 row(s) (the data job stops):" in text
    assert f"  - `data/train.jsonl:{n + 1}: duplicate of line 1 (the same whole conversation)`" in text
    assert f"  - `data/train.jsonl:{n + 2}: invalid JSON: Expecting property name enclosed in double quotes" in text
    assert f"| added | {n + 2} | (not a valid conversation) | 0 |" in text


def test_lengths_are_tokens_of_the_base_model_when_its_tokenizer_loads(repo, tmp_path):
    counter = make_counter(repo / "params.yaml", ["PROC main:", "PRINT"], tmp_path)
    assert counter.unit == "tokens"
    assert counter.how == "Lengths are **tokens** of `tiny` after its chat template."
    assert counter.count(ADDED["messages"]) > words(ADDED["messages"])  # special tokens of the template count


def test_lengths_fall_back_to_words_and_say_why_when_the_tokenizer_cannot_load(repo, tmp_path):
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("  model: tiny    ", "  model: example-org/not-here", 1))
    counter = make_counter(params, [], tmp_path)  # the tests run with HF_HUB_OFFLINE=1: no hub
    assert counter.unit == "words"
    assert counter.how.startswith("Lengths are whitespace-separated **words**: the base model's tokenizer is not")
    assert counter.count(ADDED["messages"]) == 9


def test_gate_cases_are_compared_by_id(repo):
    cases = repo / "data" / "gate_cases.jsonl"
    data = rows(cases)
    data[0]["expect"] = [*data[0]["expect"], "GET"]
    dropped = data.pop(1)
    data.append({"id": "keep-boiling-point", "kind": "keep", "prompt": "Water boils at?", "expect": ["100"]})
    write_rows(cases, data)
    commit(repo)
    (line,) = cases_section("origin/main", repo)
    assert line == (
        f"Gate cases (`data/gate_cases.jsonl`): 1 added, 1 removed, 1 changed, {len(data) - 2} unchanged. "
        f"added `keep-boiling-point`, removed `{dropped['id']}`, changed `{data[0]['id']}`."
    )


@pytest.mark.parametrize(
    ("entry", "counts"),
    [
        ({"changed outs": {"models/adapter": "not in cache"}}, False),
        ({"changed deps": {"models/base": "deleted", "data/prepared": "deleted"}}, False),
        ({"changed deps": {"data/train.jsonl": "modified"}}, True),
        ({"changed deps": {"models/gguf": "modified"}}, False),  # holds model-q8_0.gguf, not checked out
        ({"changed deps": {"models/gguf": "modified", "data/gate_cases.jsonl": "modified"}}, True),
        ({"changed deps": {"params.yaml": {"train.epochs": "modified"}}}, True),
        ({"changed command": True}, True),
        ("always changed", True),
    ],
)
def test_only_changed_inputs_count_as_a_reason_to_retrain(entry, counts):
    assert is_input_change(entry, missing=["models/gguf/model-q8_0.gguf", "models/adapter"]) is counts


MINI_PIPELINE = """
stages:
  prepare:
    cmd: cp data.txt prepared.txt
    deps: [data.txt]
    outs: [prepared.txt]
  train:
    cmd: cp prepared.txt model.txt && echo ${train.epochs} >> model.txt
    deps: [prepared.txt]
    params: [train.epochs]
    outs: [model.txt]
  export:
    cmd: cp model.txt model.gguf
    deps: [model.txt]
    outs: [model.gguf]
"""


def test_dvc_decides_what_would_retrain_and_missing_outputs_do_not_count(tmp_path, monkeypatch):
    """A three-stage DVC project (cp commands) reproduced for real, then cloned without its outputs."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    built = tmp_path / "built"
    built.mkdir()
    (built / "dvc.yaml").write_text(MINI_PIPELINE)
    (built / "params.yaml").write_text("train:\n  epochs: 3\n")
    (built / "data.txt").write_text("one conversation\n")
    (built / "README.md").write_text("mini\n")
    git(built, "init", "-q", "-b", "main")
    subprocess.run(["dvc", "init", "-q"], cwd=built, check=True)
    subprocess.run(["dvc", "repro", "-q"], cwd=built, check=True, capture_output=True)
    git(built, "add", "-A")
    git(built, "commit", "-q", "-m", "trained")
    fresh = tmp_path / "fresh"  # what a CI job sees: dvc.lock, no outputs, an empty cache
    git(tmp_path, "clone", "-q", str(built), str(fresh))
    assert not (fresh / "model.gguf").exists()
    assert stale_stages(fresh) == []

    (fresh / "README.md").write_text("mini, documented\n")
    assert stale_stages(fresh) == []  # a README-only change retrains nothing

    (fresh / "params.yaml").write_text("train:\n  epochs: 4\n")
    assert stale_stages(fresh) == ["train"]
    assert downstream_of(["train"], fresh) == ["export"]

    (fresh / "data.txt").write_text("one conversation\nand another\n")
    assert stale_stages(fresh) == ["prepare", "train"]
    assert downstream_of(["prepare"], fresh) == ["train", "export"]


def test_report_has_every_section_with_the_candidates_gate_and_links(repo):
    with open(repo / "data" / "train.jsonl", "a") as handle:
        handle.write(json.dumps(ADDED) + "\n")
    commit(repo)
    # the candidate's gate overwrites the committed files (those describe the target's model)
    (repo / "reports").mkdir(exist_ok=True)
    (repo / "reports" / "gate.md").write_text(
        "| case | before | after |\n|---|---:|---:|\n| learn-hello | 0.33 | 1.00 |\n"
    )
    (repo / "metrics" / "gate.json").write_text(json.dumps({"passed": True, "learn": {"after": 1.0}}))
    env = {"CI_PROJECT_URL": "https://gitlab.example.com/ml/llm", "CI_JOB_ID": "900", "PLOTS_JOB_ID": "899"}

    text = build_report(repo, "main", env, lambda corpus: WORDS)

    head = git(repo, "rev-parse", "--short", "HEAD").strip()
    assert text.startswith(f"# Merge request report: `{head}` against `origin/main`\n")
    for heading in ("## Dataset", "## What would retrain", "## Params", "## Metrics", "## Gate (candidate)"):
        assert f"\n{heading}\n" in text
    assert "Inputs changed for: `prepare`, `base`" in text
    assert "**Verdict: passed.**\n\n| case | before | after |" in text
    assert "| learn-hello | 0.33 | 1.00 |" in text
    assert (
        "- [This report and its inputs (job artifacts)](https://gitlab.example.com/ml/llm/-/jobs/900/artifacts/browse)"
        in text
    )
    assert (
        "- [Loss plots of the candidate](https://gitlab.example.com/ml/llm/-/jobs/899/artifacts/browse/plots)" in text
    )


def test_without_a_candidate_the_report_says_how_to_get_one(repo):
    # the gate files committed with the target's model are not a candidate's
    assert (repo / "reports" / "gate.md").is_file() and (repo / "metrics" / "gate.json").is_file()
    text = build_report(repo, "main", {}, lambda corpus: WORDS)
    assert "No candidate was trained in this pipeline (add the `train-candidate` label" in text
    assert "## Links" not in text  # no CI variables, no links


def test_an_unknown_target_branch_is_one_clear_error(repo):
    with pytest.raises(PipelineError, match="target branch 'develop': neither origin/develop nor develop exists"):
        build_report(repo, "develop", {}, lambda corpus: WORDS)
    cli = subprocess.run(
        [sys.executable, "-m", "pipeline.report", "--target-branch", "develop", "--words"],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 1
    assert cli.stderr.startswith("error: target branch 'develop'")
    assert "Traceback" not in cli.stderr


def test_near_duplicates_and_a_pasted_gate_prompt_are_listed_with_their_places(repo):
    train = repo / "data" / "train.jsonl"
    before = rows(train)
    near = json.loads(json.dumps(before[2]))
    near["messages"][-1]["content"] += " Done."  # the same conversation, one word more
    prompt = rows(repo / "data" / "gate_cases.jsonl")[0]
    pasted = {"messages": [{"role": "user", "content": prompt["prompt"]}, {"role": "assistant", "content": "PROC"}]}
    write_rows(train, [*before, near, pasted])
    commit(repo)

    text = "\n".join(dataset_section("origin/main", repo, lambda corpus: WORDS))
    n = len(before)
    assert "- 1 near-duplicate pair(s) (warnings, both places named):" in text
    assert f"  - `data/train.jsonl:{n + 1}: near-duplicate of data/train.jsonl:3 (similarity 0.9" in text
    assert "- `data/train.jsonl`: prepare will reject 1 row(s) (the data job stops):" in text
    assert (
        f"  - `data/train.jsonl:{n + 2}: messages[0].content: contains the prompt of gate case '{prompt['id']}' "
        "(data/gate_cases.jsonl:1)" in text
    )


def test_a_case_id_cannot_start_a_line_of_the_report_so_gitlab_runs_no_quick_action(repo):
    cases = repo / "data" / "gate_cases.jsonl"
    data = rows(cases)
    data += [
        {"id": "/label ~x", "kind": "keep", "prompt": "Water boils at?", "expect": ["100"]},
        {"id": "x\n/label ~train-candidate", "kind": "keep", "prompt": "Ice melts at?", "expect": ["0"]},
    ]
    write_rows(cases, data)
    commit(repo)
    text = build_report(repo, "main", {}, lambda corpus: WORDS)
    assert "added `/label ~x`, added `x /label ~train-candidate`." in text  # shown, inline
    assert [line for line in text.splitlines() if line.lstrip().startswith("/")] == []


LOSS_TSV = "step\tepoch\tloss\n1\t0.1\t2.900000\n2\t0.2\t2.100000\n3\t0.3\t1.500000\n"


def test_the_report_command_writes_the_pictures_beside_the_report_with_relative_links(repo):
    """What a candidate's report job has: the candidate's gate and loss curves, the target's curves exported by
    the candidate job, a sweep's plot; no GitLab token, so mr.md and its PNGs are the report."""
    for directory in ("plots", "reports/target-plots"):
        for kind in ("train", "eval"):
            (repo / directory / kind).mkdir(parents=True, exist_ok=True)
            (repo / directory / kind / "loss.tsv").write_text(LOSS_TSV)
    gate = json.loads((repo / "metrics" / "gate.json").read_text())
    (repo / "metrics" / "gate.json").write_text(json.dumps({**gate, "learn": {**gate["learn"], "q4_k_m": 0.75}}))
    (repo / "reports" / "sweep").mkdir(parents=True)
    sweep_png = sweep_picture([], "recipe")
    (repo / "reports" / "sweep" / "recipe.png").write_bytes(sweep_png)

    out = repo / "reports" / "mr.md"
    cli = subprocess.run(
        [sys.executable, "-m", "pipeline.report", "--words", "--out", str(out)],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr
    text = out.read_text()
    links = re.findall(r"!\[([^\]]+)\]\(([^)]+)\)", text)
    assert [target for _, target in links] == [
        "mr-data-lengths.png",
        "mr-loss.png",
        "mr-gate.png",
        "mr-sweep-recipe.png",
    ]
    assert [alt.split(":")[0].split(" of ")[0] for alt, _ in links] == [
        "Histogram", "Loss curves", "Gate chart", "Sweep recipe"
    ]  # fmt: skip
    assert links[0][0] == "Histogram of words per conversation, train and eval, this branch against origin/main"
    for _, target in links:
        assert (out.parent / target).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out.parent / "mr-sweep-recipe.png").read_bytes() == sweep_png
    # readable without the pictures: the gate's table stays, each picture's alt text says what it shows
    assert "\n## Gate (candidate)\n" in text and "| learn-hello-chris | learn |" in text
    assert "4 pictures" in cli.stderr

    first = [(out.parent / target).read_bytes() for _, target in links]
    again = subprocess.run(cli.args, cwd=repo, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    assert again.returncode == 0
    assert [(out.parent / target).read_bytes() for _, target in links] == first  # same inputs, same bytes


def test_the_length_histogram_draws_this_branch_against_the_target_and_is_the_same_bytes_twice(repo):
    train = repo / "data" / "train.jsonl"
    longer = {
        "messages": [{"role": "user", "content": "Explain PROC."}, {"role": "assistant", "content": "PROC " * 300}]
    }
    write_rows(train, [*rows(train), longer])
    commit(repo)
    first = lengths_picture(repo, "origin/main", lambda corpus: WORDS, 512)
    unchanged = lengths_picture(repo, "origin/main", lambda corpus: WORDS, 512)
    assert first is not None and first.filename == "mr-data-lengths.png"
    assert first.data[:8] == b"\x89PNG\r\n\x1a\n" and first.data == unchanged.data
    assert lengths_picture(repo, "origin/main", lambda corpus: WORDS, 256).data != first.data  # the limit is drawn


def test_without_a_candidate_or_curves_the_report_has_no_pictures(repo):
    text = build_report(repo, "main", {}, lambda corpus: WORDS, pictures_of(repo, "origin/main"))
    assert "## Pictures" not in text


def test_a_picture_other_tooling_wrote_is_embedded_when_listed_and_present(repo):
    """The hook for pictures made elsewhere (e.g. prepare's token-length histogram): (path, alt) pairs."""
    histogram = repo / "reports" / "data" / "lengths.png"
    histogram.parent.mkdir(parents=True)
    histogram.write_bytes(sweep_picture([], "stand-in"))
    listed = [("reports/data/lengths.png", "Token lengths per conversation"), ("reports/data/absent.png", "x")]
    pictures = pictures_of(repo, "origin/main", listed)
    assert [(p.filename, p.alt, p.data) for p in pictures] == [
        ("mr-lengths.png", "Token lengths per conversation", histogram.read_bytes())
    ]
    text = build_report(repo, "main", {}, lambda corpus: WORDS, pictures)
    assert "\n## Pictures\n\n![Token lengths per conversation](mr-lengths.png)\n" in text


def test_a_merge_request_that_edits_the_lock_or_the_gate_verdict_is_flagged(repo):
    data_only = build_report(repo, "main", {}, lambda corpus: WORDS)
    assert "## Release files edited" not in data_only
    verdict = repo / "models" / "gate" / "verdict.json"
    verdict.write_text(verdict.read_text().replace('"passed": true', '"passed": true ') + "\n")
    lock = repo / "dvc.lock"
    lock.write_text(lock.read_text() + "\n")
    commit(repo, "hand-edited release files")

    text = build_report(repo, "main", {}, lambda corpus: WORDS)
    assert "## Release files edited" in text
    assert "**This merge request edits `dvc.lock`, `models/gate/verdict.json`**" in text
