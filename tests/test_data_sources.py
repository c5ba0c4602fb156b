"""Data sources: every format read from a small file the test writes, mixing and the split, and the
committed two-file layout producing exactly the prepared files dvc.lock records."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import prepare as prepare_stage
from pipeline.common import PipelineError
from pipeline.params import DataParams, SourceParams
from pipeline.sources import SourceRows, load_source, mix_and_split
from tests.conftest import DATA, ROOT

QA = [{"role": "user", "content": "How do I print?"}, {"role": "assistant", "content": 'PRINT "hi"'}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def loaded(path: Path, format: str, **options) -> tuple[list[list[dict]], list[str]]:
    """(the conversations, the errors without the file name: `3: output: required`)."""
    errors: list[str] = []
    rows = load_source(SourceParams(path=str(path), format=format, **options), errors)
    return [example.messages for example in rows.examples], [error.split(f"{path}:", 1)[1] for error in errors]


def dvc_tree_md5(directory: Path) -> str:
    """The md5 DVC records for a directory output: of the sorted JSON list of its files' md5s."""
    entries = [
        {"md5": hashlib.md5(path.read_bytes()).hexdigest(), "relpath": path.relative_to(directory).as_posix()}
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    ]
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def test_the_committed_data_prepares_to_the_bytes_dvc_lock_records(tmp_path):
    """No retrain from this code: the default sources (data/train.jsonl, data/eval.jsonl) give the same
    data/prepared as the committed lock, with the committed params (SmolLM2's tokenizer)."""
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]["prepare"]
    for dep in lock["deps"]:
        if dep["path"].startswith("data/") and hashlib.md5((ROOT / dep["path"]).read_bytes()).hexdigest() != dep["md5"]:
            pytest.skip(f"dvc.lock was written for another {dep['path']} (rerun the pipeline)")
    (recorded,) = [out["md5"] for out in lock["outs"] if out["path"] == "data/prepared"]
    out = tmp_path / "prepared"
    inputs = ["--train", str(DATA / "train.jsonl"), "--eval", str(DATA / "eval.jsonl")]
    inputs += ["--cases", str(DATA / "gate_cases.jsonl"), "--allowlist", str(DATA / "sensitive_allowlist.txt")]
    outputs = ["--out", str(out), "--metrics", str(tmp_path / "data.json"), "--lengths-plot", str(tmp_path / "l.png")]
    prepare_stage.main(["--params", str(ROOT / "params.yaml"), *inputs, *outputs])
    assert dvc_tree_md5(out) == recorded
    metrics, committed = (
        json.loads((tmp_path / "data.json").read_text()),
        json.loads((ROOT / "metrics/data.json").read_text()),
    )
    assert {key: metrics[key] for key in ("train", "eval", "cases")} == {
        key: committed[key] for key in ("train", "eval", "cases")
    }
    assert metrics["sources"][str(DATA / "train.jsonl")]["rows_used"] == committed["train"]["conversations"]


def test_alpaca_rows_become_system_history_and_one_exchange_with_exact_errors(tmp_path):
    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Print a number.", "input": "42", "output": "PRINT 42", "system": "Be brief."},
            {"instruction": "And a string?", "output": 'PRINT "a"', "history": [["Hi", "Hello"]]},
            {"instruction": "No answer"},
            {"instruction": "x", "output": "y", "history": [["only the question"]]},
            {"prompt": "x"},
        ],
    )
    messages, errors = loaded(path, "alpaca")
    assert messages == [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Print a number.\n\n42"},
            {"role": "assistant", "content": "PRINT 42"},
        ],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "And a string?"},
            {"role": "assistant", "content": 'PRINT "a"'},
        ],
    ]
    assert errors == [
        "3: output: required",
        "4: history: expected a list of [user, assistant] pairs of strings",
        "5: prompt: unknown key (expected instruction, input, output, system, history)",
    ]


def test_an_alpaca_json_array_reports_rows_by_index(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Q", "output": "A"}, {"instruction": "Q2", "output": 3}], indent=1))
    messages, errors = loaded(path, "alpaca")
    assert messages == [[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]]
    assert errors == ["[1]: output: expected a string"]


def test_sharegpt_maps_speakers_to_roles_configurably(tmp_path):
    path = write_jsonl(
        tmp_path / "sharegpt.jsonl",
        [
            {
                "conversations": [
                    {"from": "system", "value": "S"},
                    {"from": "human", "value": "Q"},
                    {"from": "gpt", "value": "A"},
                ]
            },
            {"conversations": [{"from": "student", "value": "Q2"}, {"from": "teacher", "value": "A2"}]},
            {"conversations": [{"from": "human", "value": "Q3"}, {"from": "bot", "value": "A3"}]},
            {"conversations": [{"from": "gpt", "value": "A first"}]},
        ],
    )
    messages, errors = loaded(path, "sharegpt", roles={"student": "user", "teacher": "assistant"})
    assert messages == [
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
    ]
    assert errors == [
        "3: conversations[1].from: unknown speaker 'bot' (map it in the source's roles)",
        "4: conversations[0].role: expected system or user at the start, got 'assistant'",
    ]


def test_openai_chat_rows_join_text_parts_and_refuse_tools(tmp_path):
    parts = [{"type": "text", "text": "How do I "}, {"type": "text", "text": "print?"}]
    path = write_jsonl(
        tmp_path / "openai.jsonl",
        [
            {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": 'PRINT "hi"'}]},
            {"messages": [*QA[:1], {"role": "assistant", "tool_calls": [{"id": "1"}]}]},
            {"messages": QA, "tools": [{"type": "function"}]},
            {"messages": [*QA[:1], {"role": "assistant", "content": [{"type": "image_url"}]}]},
        ],
    )
    messages, errors = loaded(path, "openai")
    assert messages == [QA]
    assert errors == [
        "2: messages[1]: tool calls and tool results are not supported (plain chat only)",
        "3: tools: tool definitions are not supported (plain chat only)",
        "4: messages[1].content: only text parts are supported",
    ]


def test_csv_and_tsv_map_columns_and_report_the_line_a_record_starts_on(tmp_path):
    path = tmp_path / "qa.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "answer", "persona"])
        writer.writerow(["How do I print?", 'PRINT "hi"', ""])
        writer.writerow(["Two\nlines?", "Yes", "Be brief."])  # a quoted field over two lines
        writer.writerow(["No answer", "", ""])
        writer.writerow(["short row"])
    columns = {"prompt": "question", "response": "answer", "system": "persona"}
    messages, errors = loaded(path, "csv", columns=columns)
    assert messages == [
        QA,
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Two\nlines?"},
            {"role": "assistant", "content": "Yes"},
        ],
    ]
    assert errors == [
        "5: conversation[1].content: empty",
        "6: expected 3 fields (the header's), got 1",
    ]

    tsv = tmp_path / "qa.tsv"
    tsv.write_text('prompt\tresponse\nHow do I print?\tPRINT "hi"\n')
    assert loaded(tsv, "tsv") == ([QA], [])  # without columns: prompt and response by name
    assert loaded(tsv, "tsv", columns={"prompt": "q", "response": "response"})[1] == [
        "2: q: no such column (columns: prompt, response)"
    ]


def test_parquet_rows_are_read_by_index_with_a_messages_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": [QA, [QA[0]]], "id": [1, 2]}), path)
    messages, errors = loaded(path, "parquet", columns={"messages": "messages"})
    assert messages == [QA]
    assert errors == ["[1]: messages: no assistant turn"]


def test_a_dataset_saved_to_disk_is_read_with_the_datasets_library(tmp_path):
    import datasets

    path = tmp_path / "saved"
    datasets.Dataset.from_dict({"q": ["How do I print?", "Empty?"], "a": ['PRINT "hi"', " "]}).save_to_disk(str(path))
    messages, errors = loaded(path, "hf_disk", columns={"prompt": "q", "response": "a"})
    assert messages == [QA]
    assert errors == ["[1]: conversation[1].content: empty"]


def rows_of(n: int, prefix: str = "q") -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"{prefix} {i}"}, {"role": "assistant", "content": f"a {i}"}]}
        for i in range(n)
    ]


def split(path: Path, data: DataParams, **options) -> SourceRows:
    errors: list[str] = []
    rows = load_source(SourceParams(path=str(path), **options), errors)
    assert errors == []
    mix_and_split([rows], data)
    return rows


def test_weights_repeat_or_sample_a_source_deterministically(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", rows_of(10))
    data = DataParams(seed=7)
    twice = split(path, data, weight=2.0)
    assert [e.line for e in twice.train] == [*range(1, 11), *range(1, 11)]
    half = split(path, data, weight=0.5)
    again = split(path, data, weight=0.5)
    assert len(half.train) == 5 and [e.line for e in half.train] == [e.line for e in again.train]
    other_seed = split(path, DataParams(seed=8), weight=0.5)
    assert [e.line for e in other_seed.train] != [e.line for e in half.train]
    one_and_half = split(path, data, weight=1.5)
    assert len(one_and_half.train) == 15 and [e.line for e in one_and_half.train][:10] == list(range(1, 11))
    assert [e.line for e in split(path, data, max_rows=3).train] == [1, 2, 3]


def test_the_eval_split_is_by_question_hash_and_stable_when_rows_are_appended(tmp_path):
    data = DataParams(eval_fraction=0.25)
    path = write_jsonl(tmp_path / "a.jsonl", rows_of(40))
    before = split(path, data)
    held = [e.messages for e in before.eval]
    assert 4 <= len(held) <= 16 and len(before.train) + len(held) == 40
    write_jsonl(path, [*rows_of(40), *rows_of(40, prefix="new")])
    after = split(path, data)
    assert [e.messages for e in after.eval][: len(held)] == held  # appending moved none of the old rows
    # a question with and without a system message lands on one side: no train/eval overlap
    pair = [*rows_of(40), *({"messages": [{"role": "system", "content": "S"}, *r["messages"]]} for r in rows_of(40))]
    both = split(write_jsonl(tmp_path / "b.jsonl", pair), data)
    assert {e.prompt_key() for e in both.eval}.isdisjoint(e.prompt_key() for e in both.train)


def test_prepare_with_sources_mixes_splits_and_reports_per_source(tmp_path, tiny_params):
    import dataclasses

    from pipeline.preparation import prepare

    chat = write_jsonl(tmp_path / "chat.jsonl", rows_of(20))
    alpaca = write_jsonl(
        tmp_path / "alpaca.jsonl", [{"instruction": f"alpaca {i}", "output": f"o {i}"} for i in range(6)]
    )
    cases = write_jsonl(tmp_path / "cases.jsonl", [{"id": "c", "kind": "keep", "prompt": "2+2?", "expect": ["4"]}])
    sources = [SourceParams(path=str(chat)), SourceParams(path=str(alpaca), format="alpaca", weight=2.0)]
    data = dataclasses.replace(tiny_params.data, sources=sources, eval_fraction=0.2)
    prepared = prepare(dataclasses.replace(tiny_params, data=data), None, None, cases)
    per_source = prepared.metrics["sources"]
    assert per_source[str(alpaca)]["rows_in"] == 6 and per_source[str(alpaca)]["format"] == "alpaca"
    held = per_source[str(alpaca)]["held_out"]
    assert per_source[str(alpaca)]["rows_used"] == 2 * (6 - held) + held
    assert len(prepared.splits["train"]) + len(prepared.splits["eval"]) == sum(
        s["rows_used"] for s in per_source.values()
    )
    tokens = per_source[str(chat)]["tokens"]
    assert 0 < tokens["min"] <= tokens["median"] <= tokens["p95"] <= tokens["max"] and tokens["over_length"] == 0
    assert set(prepared.lengths) == {str(chat), str(alpaca)} and len(prepared.lengths[str(alpaca)]) == 6

    with pytest.raises(PipelineError, match=r"data\.sources is set: drop --train/--eval"):
        prepare(dataclasses.replace(tiny_params, data=data), chat, chat, cases)


def test_the_length_histogram_is_a_small_png_with_reproducible_bytes(tmp_path):
    from pipeline.data_stats import length_summary, write_histogram

    lengths = {"data/train.jsonl": [43, 98, 209, 120, 100, 600], "data/eval.jsonl": [58, 94, 168]}
    first = write_histogram(lengths, 512, tmp_path / "reports" / "data_lengths.png").read_bytes()
    second = write_histogram(lengths, 512, tmp_path / "again.png").read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and first == second and len(first) <= 150_000
    assert b"Software" not in first and b"matplotlib" not in first  # no version stamp that would change the bytes
    assert length_summary(lengths["data/train.jsonl"], 512) == {
        "total": 1170, "min": 43, "median": 110.0, "p95": 600, "max": 600, "over_length": 1,
    }  # fmt: skip


def data_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.data", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_data_convert_writes_messages_that_prepare_reads_and_stops_on_a_bad_row(tmp_path):
    source = tmp_path / "theirs.csv"
    source.write_text('question,answer\nHow do I print?,"PRINT ""hi"""\n')
    out = tmp_path / "data" / "theirs.jsonl"
    result = data_cli("convert", "--format", "csv", "--input", str(source), "--output", str(out),
                      "--column", "prompt=question", "--column", "response=answer")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.read_text() == json.dumps({"messages": QA}) + "\n"

    source.write_text("question,answer\nNo answer,\n")
    result = data_cli("convert", "--format", "csv", "--input", str(source), "--output", str(tmp_path / "x.jsonl"),
                      "--column", "prompt=question", "--column", "response=answer")  # fmt: skip
    assert result.returncode == 1 and not (tmp_path / "x.jsonl").exists()
    assert result.stderr.strip().splitlines()[-2:] == [
        f"error: 1 problem(s) in {source}:",
        f"  {source}:2: conversation[1].content: empty",
    ]


def test_data_check_and_stats_run_prepares_checks_without_dvc(tmp_path):
    ok = data_cli("check")  # the committed data with the committed params
    assert ok.returncode == 0, ok.stderr
    assert "ok: 56 training and 9 eval conversations from 2 source(s), 0 near-duplicate warning(s)" in ok.stderr
    stats = data_cli("stats", "--plot", str(tmp_path / "lengths.png"))
    assert json.loads(stats.stdout)["sources"]["data/train.jsonl"]["tokens"]["max"] == 209
    assert (tmp_path / "lengths.png").read_bytes() == (ROOT / "reports" / "data_lengths.png").read_bytes()

    bad = write_jsonl(tmp_path / "train.jsonl", [{"messages": QA}, {"messages": QA}])
    failed = data_cli("check", "--train", str(bad), "--eval", str(DATA / "eval.jsonl"))
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert f"  {bad}:2: duplicate of line 1 (the same whole conversation)" in failed.stderr.splitlines()
