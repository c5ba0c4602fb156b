"""The models the gate scores, behind one interface: greedy answers and reference likelihoods.

- `HFModel` (pipeline/hf_evaluator.py): a Hugging Face model directory (the base, the merged model) through
  its own chat template;
- `GGUFModel`: a GGUF in llama.cpp, each prompt rendered from the Ollama TEMPLATE the Modelfile ships
  (pipeline.ollama_template), BOS as the GGUF says, generation cut at the family's stops.

`nll` is the mean negative log-likelihood per token (nats) of a reference answer given the prompt, by
teacher forcing: the prompt exactly as for generation, then the reference's tokens as the model's own
tokenizer splits prompt + reference. No decoding, so it does not flip with greedy noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from pipeline.hf_evaluator import Answer, Messages, Progress, continuation


class Evaluator(Protocol):
    name: str

    def answers(self, conversations: Sequence[Messages], max_new_tokens: int, progress: Progress) -> list[Answer]: ...

    def nll(
        self, conversations: Sequence[Messages], references: Sequence[str], progress: Progress, max_tokens: int | None
    ) -> list[float]: ...

    def close(self) -> None: ...

    def cases(
        self,
        conversations: Sequence[Messages],
        references: Sequence[str | None],
        max_new_tokens: int,
        progress: Progress,
    ) -> tuple[list[Answer], list[float | None]]:
        """Each case's greedy answer and, where it has a reference, that reference's NLL."""
        ...


class GGUFModel:
    def __init__(
        self, path: Path, name: str, n_ctx: int, seed: int, template: str, stop: tuple[str, ...], system: str | None
    ):
        from pipeline.llama_runtime import gguf_adds_bos, load_gguf

        self.name, self.seed, self.template, self.stop, self.system = name, seed, template, stop, system
        # logits_all: the likelihood of a reference needs the logits at every position
        self.llm = load_gguf(path, n_ctx=n_ctx, seed=seed, logits_all=True)
        self.add_bos = gguf_adds_bos(self.llm)

    def tokens(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=self.add_bos, special=True)

    def prompt(self, messages: Messages) -> str:
        from pipeline.go_template import render_prompt

        return render_prompt(self.template, messages, self.system)

    def answers(self, conversations: Sequence[Messages], max_new_tokens: int, progress: Progress) -> list[Answer]:
        answers = []
        for messages in conversations:
            # no reset: llama-cpp-python reuses the KV cache of the prompt prefix the last call shared
            result = self.llm.create_completion(
                self.tokens(self.prompt(messages)),
                max_tokens=max_new_tokens,
                temperature=0.0,
                top_k=1,
                repeat_penalty=1.0,
                seed=self.seed,
                stop=list(self.stop),
            )
            choice = result["choices"][0]
            answers.append(Answer(choice["text"].strip(), finished=choice["finish_reason"] == "stop"))
            progress(1)
        return answers

    def cases(
        self,
        conversations: Sequence[Messages],
        references: Sequence[str | None],
        max_new_tokens: int,
        progress: Progress,
    ) -> tuple[list[Answer], list[float | None]]:
        # one case at a time: the reference's NLL reuses the KV cache of the prompt its answer just had
        answers, nll = [], []
        for messages, reference in zip(conversations, references, strict=True):
            answers += self.answers([messages], max_new_tokens, progress)
            nll.append(self.nll([messages], [reference], progress)[0] if reference else None)
        return answers, nll

    def nll(
        self,
        conversations: Sequence[Messages],
        references: Sequence[str],
        progress: Progress,
        max_tokens: int | None = None,
    ) -> list[float]:
        import numpy as np

        values = []
        for messages, reference in zip(conversations, references, strict=True):
            prompt = self.prompt(messages)
            prompt_ids = self.tokens(prompt)
            targets = continuation(
                prompt_ids,
                self.tokens(prompt + reference),
                lambda text=reference: self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False),
                max_tokens,
            )
            self.evaluate(prompt_ids + targets, first_needed=len(prompt_ids) - 1)
            # logits of the positions that predict the reference; log-softmax there only (float32 rows,
            # float64 sums: 6x faster than float64 rows, same value to 1e-5)
            logits = self.llm.scores[len(prompt_ids) - 1 : len(prompt_ids) + len(targets) - 1]
            peak = logits.max(axis=1)
            log_sum = peak.astype(np.float64) + np.log(np.exp(logits - peak[:, None]).sum(axis=1, dtype=np.float64))
            values.append(float(np.mean(log_sum - logits[np.arange(len(targets)), targets])))
            progress(1)
        return values

    def evaluate(self, tokens: list[int], first_needed: int) -> None:
        """Run `tokens` through the model, keeping the KV cache (and logits) of the prefix the last call
        shared with them: the chat template's system preamble is the same in every prompt. Logits from
        position `first_needed` on are recomputed whatever the cache holds."""
        shared = self.llm.longest_token_prefix(self.llm.input_ids[: self.llm.n_tokens].tolist(), tokens[:first_needed])
        self.llm.n_tokens = shared  # eval() drops the cache beyond n_tokens
        self.llm.eval(tokens[shared:])

    def close(self) -> None:
        self.llm.close()
