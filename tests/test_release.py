"""Deployment records: what deploy and rollback append is what `rollback --list` reads back, typed."""

from __future__ import annotations

import pytest

from pipeline.common import PipelineError
from pipeline.release import HostRecord, Record, append_record, read_records

ROLLBACK = Record(
    action="rollback",
    when="2026-01-02T03:04:05+00:00",
    commit=None,
    tags=["v1"],
    registry="registry.local:5000",
    repository="llm-gitops/opl-assistant",
    manifest_digest="sha256:" + "a" * 64,
    model_digest="sha256:" + "b" * 64,
    latest="v1",
    changed=True,
    hosts=[HostRecord(url="http://rig:11434", path="host has the tag: copy")],
)


def test_a_record_written_reads_back_equal_and_unset_fields_are_not_written(tmp_path):
    path = tmp_path / "records.jsonl"
    append_record(path, ROLLBACK)
    append_record(path, ROLLBACK)
    assert read_records(path) == [ROLLBACK, ROLLBACK]
    row = ROLLBACK.to_json()
    assert "gguf" not in row and "layers" not in row
    assert row["hosts"] == [{"url": "http://rig:11434", "path": "host has the tag: copy"}]


def test_a_malformed_record_names_the_file_line_and_field(tmp_path):
    path = tmp_path / "records.jsonl"
    append_record(path, ROLLBACK)
    path.write_text(path.read_text() + '{"action": "deploy", "tags": "v2"}\n')
    with pytest.raises(PipelineError, match=rf"^{path}:2: not a deployment record: .*missing .*'when'"):
        read_records(path)
    path.write_text(path.read_text().splitlines()[0].replace('"tags": ["v1"]', '"tags": "v1"') + "\n")
    with pytest.raises(PipelineError, match=rf"^{path}:1: tags: expected a list of strings, got 'v1'$"):
        read_records(path)
    path.write_text(path.read_text().replace('"action"', '"colour": 1, "action"'))
    with pytest.raises(PipelineError, match=rf"^{path}:1: unknown record field\(s\) colour$"):
        read_records(path)
