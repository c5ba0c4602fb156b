"""Deployment records: what deploy and rollback append is what `rollback --list` reads back, typed; and
manifests from the registry, checked before their digests are used."""

from __future__ import annotations

import json
import re

import pytest

from pipeline.common import PipelineError
from pipeline.registry_client import MANIFEST_V2, Manifest
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


def test_a_corrupt_record_line_is_reported_with_file_line_and_field_and_skipped(tmp_path, caplog):
    """One bad line (hand-edited, half-written by an old version) must not hide the other deployments."""
    path = tmp_path / "records.jsonl"
    append_record(path, ROLLBACK)
    good = path.read_text()
    bad_tags = good.replace('"tags": ["v1"]', '"tags": "v1"')
    unknown = good.replace('"action"', '"colour": 1, "action"')
    path.write_text(good + '{"action": "deploy", "tags": "v2"}\n' + "{not json\n" + bad_tags + unknown + good)

    assert read_records(path) == [ROLLBACK, ROLLBACK]

    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 4
    assert re.match(rf"^{path}:2: not a deployment record: .*missing .*'when'.*: skipped$", warnings[0])
    assert warnings[1].startswith(f"{path}:3: not a JSON record (")
    assert warnings[2] == f"{path}:4: tags: expected a list of strings, got 'v1': skipped"
    assert warnings[3] == f"{path}:5: unknown record field(s) colour: skipped"


def test_a_manifest_digest_that_is_not_sha256_hex_is_refused():
    """A digest becomes a URL and a file name (rollback's workdir): `sha256:../../x` must never get there."""
    good = {"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:" + "a" * 64, "size": 1}
    for digest in ("sha256:../../etc/passwd", "sha256:" + "A" * 64, "md5:" + "a" * 32, "sha256:" + "a" * 63):
        body = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_V2,
            "config": good,
            "layers": [{**good, "digest": digest}],
        }
        with pytest.raises(PipelineError, match=r"^m: application/vnd\.ollama\.image\.model: digest .* is not sha256:"):
            Manifest.parse(json.dumps(body).encode(), "m")
    assert Manifest.parse(
        json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_V2, "config": good, "layers": [good]}).encode(), "m"
    )
