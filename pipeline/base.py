"""Stage `base`: materialise the base model (weights + tokenizer) as a local safetensors directory.

python -m pipeline.base --corpus data/train.jsonl --out models/base

Before any weights are loaded it stops a base the pipeline could not carry to Ollama: an
architecture convert cannot write (pipeline/gguf_arch.py), a chat template with no Ollama TEMPLATE
(pipeline/ollama_template.py) or no training variant (pipeline/chat_templates.py), or a TEMPLATE
that renders the corpus' prompts differently from the chat template, or a Phi-3 whose GGUF name
(convert.model_name) llama.cpp would not treat as Phi-3's. Each error names what is supported and
what to add. A base without a chat template needs base.chat_template.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.chat_templates import check_training_template, training_template
from pipeline.common import PipelineError, atomic_directory, get_logger, run_cli, write_json_atomic
from pipeline.dataset import corpus_texts, load_conversations
from pipeline.gguf_arch import ARCHITECTURES, phi3_name_problem, unsupported_architecture
from pipeline.models import Check, materialise
from pipeline.ollama_template import check_parity, family_for
from pipeline.params import BaseParams, load_params

PARAMS = ("base", "convert.model_name")
SUMMARY = "base.json"

log = get_logger("base")


def prompts_of(conversations: list[list[dict]]) -> list[list[dict]]:
    """Every conversation cut after each user turn: what a chat sends to be answered."""
    return [messages[: i + 1] for messages in conversations for i, m in enumerate(messages) if m["role"] == "user"]


def carriable(base: BaseParams, conversations: list[list[dict]], model_name: str | None = None) -> Check:
    """The check materialise runs before loading weights: convert, train and the Modelfile can carry this base
    (`model_name`: convert.model_name, the GGUF's general.name)."""

    def check(architecture: str, tokenizer) -> None:
        where = f"base.model {base.model!r}"
        if architecture not in ARCHITECTURES:
            raise PipelineError(f"{where}: {unsupported_architecture(architecture)}")
        if ARCHITECTURES[architecture].phi3:
            added = tokenizer.added_tokens_decoder.values()
            stripping = [token.content for token in added if token.rstrip and token.special]
            if problem := phi3_name_problem(stripping, model_name):
                raise PipelineError(f"{where}: {problem}")
        prompts = prompts_of(conversations)
        try:
            family = family_for(tokenizer)
            check_training_template(tokenizer, training_template(tokenizer), conversations)
            check_parity(tokenizer, family, prompts, None, None)
        except PipelineError as error:
            raise PipelineError(f"{where}: {error}") from None
        log.info("%s: %s, chat family %s (TEMPLATE proven on %d prompts)", base.model, architecture, family.name,
                 len(prompts))  # fmt: skip

    return check


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.base", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument(
        "--corpus", type=Path, required=True, help="conversations: the tiny tokenizer's text, the template checks' data"
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to write the model to")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    base = params.base
    conversations = [example.messages for example in load_conversations(args.corpus, [])]
    log.info("materialising base model %r into %s", base.model, args.out)
    with atomic_directory(args.out) as tmp:
        summary = materialise(
            base, corpus_texts(args.corpus), tmp, carriable(base, conversations, params.convert.model_name)
        )
        write_json_atomic(tmp / SUMMARY, summary)
    log.info("%s: %s parameters, vocab %s", base.model, f"{summary['parameters']:,}", summary["vocab_size"])


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
