"""Atomic writes (pipeline/common.py): a regular file is replaced whole or not at all; a device or a pipe
given as an output (`--metrics /dev/null`) is written through and stays what it was."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from pipeline.common import write_json_atomic, write_text_atomic


def test_a_regular_file_is_replaced_whole_and_a_failed_write_leaves_the_old_one(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"loss": 1.5})
    assert path.read_text() == '{\n  "loss": 1.5\n}\n'
    with pytest.raises(TypeError):
        write_json_atomic(path, {"loss": object()})  # not JSON: fails before anything is renamed
    assert path.read_text() == '{\n  "loss": 1.5\n}\n' and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_pipe_given_as_the_output_is_written_through_and_stays_a_pipe(tmp_path):
    """The same path as /dev/null: a rename over it (as root) would leave a regular file there."""
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    write_text_atomic(fifo, "passed\n")
    reader.join(timeout=10)
    assert received == ["passed\n"]
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["out.fifo"]
