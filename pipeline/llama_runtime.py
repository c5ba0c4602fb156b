"""llama.cpp in-process (llama-cpp-python): loading a GGUF, capturing its log, reading its BOS flag.

Shared by the quantize stage (its log names the tensors that fell back to another type), the gate
(greedy answers of each GGUF) and the Modelfile's parity check (llama.cpp's tokens of a prompt).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.common import PipelineError


@contextlib.contextmanager
def llama_log() -> Iterator[list[str]]:
    """Collect what llama.cpp logs (instead of printing it) while the block runs."""
    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def load_gguf(gguf: Path, **options: Any):
    """`llama_cpp.Llama` on this GGUF (options as Llama takes them, e.g. n_ctx, seed, vocab_only), its log
    kept quiet; a PipelineError naming the file and llama.cpp's last words when it cannot load it."""
    import llama_cpp

    if not Path(gguf).is_file():
        raise PipelineError(f"{gguf}: GGUF not found")
    # llama-cpp-python generates on half the CPUs (it assumes hyper-threads); on the 2-core runners and
    # laptops we run on, every CPU this process may use is faster (gate answers: 7.9 s -> 6.7 s)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    options = {"n_threads": threads, "n_threads_batch": threads, **options}
    # llama.cpp logs the context it makes even for a vocabulary; only a failure's log is worth showing
    with llama_log() as lines:
        try:
            return llama_cpp.Llama(model_path=str(gguf), verbose=False, **options)
        except ValueError as error:
            raise PipelineError(f"{gguf}: llama.cpp cannot load it ({error}): {''.join(lines)[-500:]}") from None


def gguf_adds_bos(llama) -> bool:
    """Whether llama.cpp adds BOS to a prompt of this loaded GGUF (its tokenizer.ggml.add_bos_token)."""
    import llama_cpp

    return bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llama.model)))


class LlamaVocab:
    """llama.cpp's tokenizer of a GGUF (vocabulary only, no weights)."""

    def __init__(self, gguf: Path) -> None:
        self.llama = load_gguf(gguf, vocab_only=True)
        self.add_bos = gguf_adds_bos(self.llama)

    def tokenize(self, text: str) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=self.add_bos, special=True)

    def piece(self, token: int) -> str:
        return self.llama.detokenize([token], special=True).decode("utf-8", errors="replace")

    def close(self) -> None:
        self.llama.close()
