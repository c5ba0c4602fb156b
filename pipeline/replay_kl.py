"""Replay with the base's whole distribution: a KL term that holds the replayed answers to the base.

Replay (`train.replay`) trains on the base model's own greedy answers: one token per position, the
base's first choice. `train.replay_kl: beta` adds, on every answer token of a replayed conversation,
beta x KL(base || model) over the whole next-token distribution ("Learning without Forgetting", Li &
Hoiem 2016): the fine-tune is held to what the base would have said there, its second and third
choices included, not only to one sampled answer. The base is the same network with the LoRA adapter
switched off (peft's `disable_adapter`), so no second copy of the weights is loaded; its forward runs
without gradients on the replayed conversations only.

The objective per answer token: cross-entropy as before, plus beta x KL on replayed tokens; summed and
divided by the answer tokens of the batch (TRL's normalisation), so beta 0 is plain replay.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from pipeline import packed_attention

REPLAY_COLUMN = "replay"  # per conversation: true for base_answers' replayed ones
REPLAY_TOKENS = "replay_tokens"  # per token, added by the collator: the token belongs to a replayed conversation


def mark_replayed(rows: list[dict], replayed: bool) -> list[dict]:
    """The conversations with their `replay` flag, the column the collator turns into a token mask."""
    return [{**row, REPLAY_COLUMN: replayed} for row in rows]


@dataclass
class ReplayTokenCollator:
    """TRL's collator, plus a bool mask [rows, tokens] of the tokens of replayed conversations (laid out
    as TRL lays out input_ids: one flat row when padding-free, right-padded rows otherwise)."""

    inner: object  # trl's DataCollatorForLanguageModeling

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        flags = [bool(example.pop(REPLAY_COLUMN, False)) for example in examples]
        batch = self.inner(examples)
        width = batch["input_ids"].shape[1]
        masks = [torch.full((len(example["input_ids"]),), flag) for example, flag in zip(examples, flags, strict=True)]
        if batch["input_ids"].shape[0] == 1 and len(examples) > 1:
            masks = [torch.cat(masks)]  # padding-free: one row of every conversation
        batch[REPLAY_TOKENS] = torch.stack([torch.nn.functional.pad(m, (0, width - len(m))) for m in masks])
        return batch


def replay_segments(replay_tokens, cu_seq_lens) -> list[tuple[int, int]] | None:
    """[(start, end)] of the replayed conversations in a padding-free row; None when the row is not one of
    several conversations (then the whole row is run)."""
    spans = packed_attention.segments(cu_seq_lens, replay_tokens.shape[1])
    return None if spans is None else [(start, end) for start, end in spans if bool(replay_tokens[0, start])]


def sub_row(inputs: dict, spans: list[tuple[int, int]]) -> dict:
    """The model inputs of a padding-free row cut down to these conversations, with TRL's bounds for them."""
    import torch

    lengths = torch.tensor([end - start for start, end in spans])
    bounds = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    longest = int(lengths.max())
    return {
        "input_ids": torch.cat([inputs["input_ids"][:, s:e] for s, e in spans], dim=1),
        "position_ids": torch.cat([inputs["position_ids"][:, s:e] for s, e in spans], dim=1),
        "cu_seq_lens_q": bounds,
        "cu_seq_lens_k": bounds,
        "max_length_q": longest,
        "max_length_k": longest,
        "seq_idx": torch.repeat_interleave(torch.arange(len(spans), dtype=torch.int32), lengths)[None],
        "use_cache": False,
    }


def kl_sum(model_logits, base_logits):
    """sum over positions of KL(base || model), both [positions, vocab] logits (computed in fp32)."""
    import torch.nn.functional as F

    base = F.log_softmax(base_logits.float(), dim=-1)
    return F.kl_div(F.log_softmax(model_logits.float(), dim=-1), base, log_target=True, reduction="sum")


@dataclass
class Objective:
    """One batch's loss and what the training log shows of it."""

    loss: object  # tensor, with gradients
    answer_tokens: int
    kl_sum: float  # over the replayed answer tokens
    replayed_tokens: int
    top1_hits: int
    entropy_sum: float


def objective(logits, labels, replay_tokens, base_logits_of, beta: float, num_items=None) -> Objective:
    """The loss of a batch: cross-entropy on every answer token, plus beta x KL(base || model) on replayed ones.

    logits [rows, tokens, vocab] of the model being trained; labels [rows, tokens] (-100 = no loss);
    `base_logits_of(positions)` gives the base's logits at those (row, token) positions, [n, vocab].
    """
    import torch
    import torch.nn.functional as F

    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    answer = shift_labels != -100
    picked = shift_logits[answer].float()
    targets = shift_labels[answer]
    log_probs = F.log_softmax(picked, dim=-1)
    ce = -log_probs.gather(1, targets[:, None]).sum()
    replayed = answer & replay_tokens[:, 1:]
    kl = torch.zeros((), device=logits.device)
    if beta and bool(replayed.any()):
        kl = kl_sum(shift_logits[replayed], base_logits_of(replayed))
    count = answer.sum() if num_items is None else num_items
    with torch.no_grad():
        hits = int((picked.argmax(-1) == targets).sum())
        entropy = float(-(log_probs.exp() * log_probs).sum())
    loss = (ce + beta * kl) / torch.as_tensor(count).clamp(min=1)
    return Objective(loss, int(answer.sum()), float(kl.detach()), int(replayed.sum()), hits, entropy)


def trainer_class(beta: float):
    """SFTTrainer whose loss adds beta x KL(base || model) on replayed answer tokens; TRL's own loss
    (its fused LM head) when beta is 0 or a batch has no replayed answer."""
    import torch
    from trl import SFTTrainer

    class ReplayKLTrainer(SFTTrainer):
        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if REPLAY_COLUMN not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, REPLAY_COLUMN]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            replay_tokens = inputs.pop(REPLAY_TOKENS, None)
            if not beta or not model.training or replay_tokens is None or not bool(replay_tokens.any()):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs = {**inputs, "use_cache": False}
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            base_logits_of = self._base_logits(model, inputs, replay_tokens)
            batch = objective(outputs.logits, labels, replay_tokens, base_logits_of, beta, num_items_in_batch)
            loss = batch.loss
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            metrics = self._metrics["train"]
            metrics["entropy"].append(batch.entropy_sum / max(batch.answer_tokens, 1))
            metrics["mean_token_accuracy"].append(batch.top1_hits / max(batch.answer_tokens, 1))
            metrics["replay_kl"].append(batch.kl_sum / max(batch.replayed_tokens, 1))
            counted = inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["input_ids"].numel()
            self._total_train_tokens += int(counted)
            metrics["num_tokens"] = [self._total_train_tokens]
            return (loss, outputs) if return_outputs else loss

        def _base_logits(self, model, inputs, replay_tokens):
            """positions -> the base's logits there (adapter off, no gradients): in a padding-free row a forward
            of the replayed conversations alone, in padded rows of the whole batch."""
            peft_model = self.accelerator.unwrap_model(model)
            bounds = inputs.get("cu_seq_lens_q")
            flat = bounds is not None and replay_tokens.shape[0] == 1
            spans = replay_segments(replay_tokens, bounds) if flat else None

            def of(positions):
                with torch.no_grad(), peft_model.disable_adapter():
                    if spans is None:
                        return peft_model(**inputs).logits[:, :-1][positions]
                    logits = peft_model(**sub_row(inputs, spans)).logits[0]
                # sub-row logit j of a conversation [s, e) predicts its token s + j + 1, as row position s + j does
                starts = [0, *itertools.accumulate(e - s for s, e in spans)]
                return torch.cat([logits[o : o + e - s - 1][positions[0, s : e - 1]]
                                  for o, (s, e) in zip(starts, spans, strict=False)])  # fmt: skip

            return of

    return ReplayKLTrainer
