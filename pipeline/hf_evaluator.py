"""A Hugging Face model as the gate scores it: greedy answers through its own chat template, and the mean
negative log-likelihood per token of a reference answer given the prompt (teacher forcing). Also used by
training, on the model in memory, to ask the learn cases at a cycle's end (pipeline/cycles.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

Messages = list[dict]
Progress = Callable[[int], None]
# conversations an HF model answers together (left-padded, greedy): generation on CPU is bound by the
# per-step overhead, so one batch for every gate case is faster (13.8 s -> 11.1 s for 20 cases, same answers)
HF_ANSWER_BATCH = 32
HF_NLL_BATCH = 4  # references scored together, right-padded and sorted by length (measured best of 1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Answer:
    text: str
    finished: bool  # ended with the end-of-turn token, not cut at max_new_tokens


def answers_then_nll(
    model: HFModel,
    conversations: Sequence[Messages],
    references: Sequence[str | None],
    max_new_tokens: int,
    progress: Progress,
) -> tuple[list[Answer], list[float | None]]:
    """`Evaluator.cases` (pipeline/evaluators.py) for a model that batches: every answer, then every reference."""
    answers = model.answers(conversations, max_new_tokens, progress)
    scored = [index for index, reference in enumerate(references) if reference]
    values = model.nll([conversations[i] for i in scored], [references[i] for i in scored], progress)
    nll: list[float | None] = [None] * len(references)
    for index, value in zip(scored, values, strict=True):
        nll[index] = value
    return answers, nll


def continuation(
    prompt_ids: list[int], full_ids: list[int], reference_ids: Callable[[], list[int]], max_tokens: int | None = None
) -> list[int]:
    """The reference's tokens after the prompt (at most `max_tokens` of them): the tail of prompt + reference
    tokenized together when the prompt's tokens are its prefix (how the model would see it), else the
    reference tokenized alone."""
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return full_ids[len(prompt_ids) :][:max_tokens]
    return reference_ids()[:max_tokens]


class HFModel:
    def __init__(self, model_dir: Path, seed: int, name: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
        self._attach(model, AutoTokenizer.from_pretrained(model_dir), name)

    @classmethod
    def in_memory(cls, model, tokenizer, name: str) -> HFModel:
        """A model already loaded (training's, adapter on): the caller sets eval mode; the tokenizer is copied."""
        import copy

        evaluator = cls.__new__(cls)
        evaluator._attach(model, copy.deepcopy(tokenizer), name)
        return evaluator

    def _attach(self, model, tokenizer, name: str) -> None:
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.tokenizer.padding_side = "left"  # generation continues every row from its last real token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id])

    def prompt(self, messages: Messages) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def answers(self, conversations: Sequence[Messages], max_new_tokens: int, progress: Progress) -> list[Answer]:
        answers = []
        for start in range(0, len(conversations), HF_ANSWER_BATCH):
            batch = conversations[start : start + HF_ANSWER_BATCH]
            texts = [self.prompt(messages) for messages in batch]
            inputs = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
            inputs = inputs.to(self.model.device)  # (a model in training may be on a GPU)
            for row in self.greedy(inputs["input_ids"], inputs["attention_mask"], max_new_tokens):
                text = self.tokenizer.decode(row, skip_special_tokens=True).strip()
                answers.append(Answer(text, finished=bool(row) and row[-1] in self.eos_ids))
            progress(len(batch))
        return answers

    cases = answers_then_nll  # batched: every answer, then every reference

    def greedy(self, ids, mask, max_new_tokens: int) -> list[list[int]]:
        """Greedy tokens of each left-padded row, up to and including its end-of-turn token. Plain argmax, as
        the GGUFs are decoded (generate() would also apply the model's generation_config). A row that has
        ended leaves the batch, cache included: generate() keeps computing every row until the last one
        ends (merged SmolLM2, the 20 gate cases: 10.1 s -> 7.1 s, the same answers)."""
        import torch
        from transformers import DynamicCache

        tokens: list[list[int]] = [[] for _ in range(len(ids))]
        active = torch.arange(len(ids), device=ids.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        step_ids = ids
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits = self.model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=cache,
                    logits_to_keep=1,
                ).logits[:, -1]
                chosen = logits.argmax(dim=-1)
                ongoing = []
                for index, (row, token) in enumerate(zip(active.tolist(), chosen.tolist(), strict=True)):
                    tokens[row].append(token)
                    if token not in self.eos_ids:
                        ongoing.append(index)
                if not ongoing:
                    break
                if len(ongoing) < len(active):
                    keep = torch.tensor(ongoing, device=ids.device)
                    cache.batch_select_indices(keep)
                    active, mask, chosen, positions = active[keep], mask[keep], chosen[keep], positions[keep]
                mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
                positions = positions[:, -1:] + 1
                step_ids = chosen[:, None]
        return tokens

    def nll(
        self,
        conversations: Sequence[Messages],
        references: Sequence[str],
        progress: Progress,
        max_tokens: int | None = None,
    ) -> list[float]:
        import torch

        rows = []  # (prompt ids, reference ids)
        for messages, reference in zip(conversations, references, strict=True):
            prompt = self.prompt(messages)
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            full_ids = self.tokenizer(prompt + reference, add_special_tokens=False)["input_ids"]
            targets = continuation(
                prompt_ids,
                full_ids,
                lambda text=reference: self.tokenizer(text, add_special_tokens=False)["input_ids"],
                max_tokens,
            )
            rows.append((prompt_ids, targets))
        values: list[float] = [0.0] * len(rows)
        # batches of similar lengths (right padding costs compute on every padded position), and logits only
        # at the positions that predict a reference token: 11.6 s -> 7.3 s for the 48 probes on SmolLM2
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
        for start in range(0, len(order), HF_NLL_BATCH):
            batch = order[start : start + HF_NLL_BATCH]
            width = max(len(rows[i][0]) + len(rows[i][1]) for i in batch)
            ids = torch.full((len(batch), width), self.tokenizer.pad_token_id)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            scored = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, index in enumerate(batch):
                prompt_ids, targets = rows[index]
                ids[row, : len(prompt_ids) + len(targets)] = torch.tensor(prompt_ids + targets)
                mask[row, : len(prompt_ids) + len(targets)] = 1
                scored[row, len(prompt_ids) - 1 : len(prompt_ids) + len(targets) - 1] = True
            with torch.no_grad():
                # a boolean logits_to_keep: the scored positions of every row, flattened in row order
                logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=scored).logits
                targets = torch.tensor([token for index in batch for token in rows[index][1]])
                picked = torch.log_softmax(logits.reshape(len(targets), -1).float(), dim=-1)
                picked = picked.gather(1, targets[:, None])[:, 0].double()
            for index, part in zip(batch, picked.split([len(rows[i][1]) for i in batch]), strict=True):
                values[index] = -float(part.mean())
            progress(len(batch))
        return values

    def close(self) -> None:
        del self.model
