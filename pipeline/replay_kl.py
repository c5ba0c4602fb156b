"""Replay with the base's whole distribution: a KL term that holds the replayed answers to the base.

Replay (`train.replay`) trains on the base model's own greedy answers: one token per position, the
base's first choice. `train.replay_kl: beta` adds, on every answer token of a replayed conversation,
beta x KL(base || model) over the whole next-token distribution ("Learning without Forgetting", Li &
Hoiem 2016): the fine-tune is held to what the base would have said there, its second and third
choices included, not only to one sampled answer. The base is the same network with the LoRA adapter
switched off (peft's `disable_adapter`), so no second copy of the weights is loaded; its forward runs
without gradients on the replayed conversations only.

The objective per answer token: cross-entropy as before, plus beta x KL on replayed tokens; summed and
divided by the answer tokens of the batch (TRL's normalisation), so beta 0 is plain replay. Every batch's
loss is computed here, the LM head at the answer positions only (see `trainer_class`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import packed_attention

REPLAY_COLUMN = "replay"  # per conversation: true for base_answers' replayed ones
REPLAY_TOKENS = "replay_tokens"  # per token, added by the collator: the token belongs to a replayed conversation
ENTROPY_SAMPLE = 128  # answer positions whose entropy the training log shows


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
    entropy: float  # mean next-token entropy (nats) over about ENTROPY_SAMPLE evenly spaced answer positions


def answer_positions(labels, cu_seq_lens=None):
    """bool [rows, tokens]: the positions whose next token is an answer token, the only logits the loss needs
    (position t predicts label t + 1). In a padding-free row a conversation's last position predicts the next
    conversation's first token, never a label of its own."""
    import torch

    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    if cu_seq_lens is not None and labels.shape[0] == 1:
        ends = cu_seq_lens[1:].long() - 1
        keep[0, ends[(ends >= 0) & (ends < labels.shape[1])]] = False
    return keep


def answer_targets(labels, keep):
    """[n]: the answer tokens the `keep` positions predict, in the same order as `logits_at`'s rows."""
    import torch

    shifted = torch.zeros_like(labels)
    shifted[:, :-1] = labels[:, 1:]
    return shifted[keep]


def logits_at(model, inputs: dict, keep):
    """[n, vocab]: the model's logits at the `keep` positions, row by row. The LM head runs at those positions
    only (transformers' `logits_to_keep` mask): on a 49k vocabulary the head over every position costs about as
    much as the rest of a small model, and half of a chat's tokens are its prompt."""
    if accepts_logits_to_keep(model):
        return model(**inputs, logits_to_keep=keep).logits
    return model(**inputs).logits[keep]


def at_answers(model, inputs: dict, labels):
    """(keep, logits [n, vocab], targets [n]): the answer positions of a batch (padding-free bounds read from
    `inputs`), the model's logits there and the answer tokens they predict: what the loss and the fit check read."""
    keep = answer_positions(labels, inputs.get("cu_seq_lens_q"))
    return keep, logits_at(model, inputs, keep), answer_targets(labels, keep)


def accepts_logits_to_keep(model) -> bool:
    import inspect

    for _ in range(4):  # peft's and DDP's wrappers pass the keyword on to the model they hold
        unwrap = getattr(model, "get_base_model", None)
        inner = getattr(model, "module", None) or (unwrap() if unwrap else model)
        if inner is model:
            break
        model = inner
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def objective(answer_logits, targets, replayed, base_logits_of, beta: float, num_items=None) -> Objective:
    """The loss of a batch: cross-entropy on every answer token, plus beta x KL(base || model) on replayed ones.

    answer_logits [n, vocab]: the model's logits at the n positions that predict an answer token; targets [n]
    those tokens; replayed [n] bool: the position belongs to a replayed conversation; `base_logits_of()` gives
    the base's logits at the replayed positions, in the same order, [replayed.sum(), vocab].
    """
    import torch
    import torch.nn.functional as F

    picked = answer_logits.float()
    log_probs = F.log_softmax(picked, dim=-1)
    ce = -log_probs.gather(1, targets[:, None]).sum()
    kl = torch.zeros((), device=answer_logits.device)
    if beta and bool(replayed.any()):
        kl = kl_sum(answer_logits[replayed], base_logits_of())
    count = len(targets) if num_items is None else num_items
    with torch.no_grad():
        hits = int((picked.argmax(-1) == targets).sum())
        # a log metric only: over every answer position the exp over the vocabulary cost 3 % of a step
        sample = log_probs[:: max(1, len(targets) // ENTROPY_SAMPLE)]
        entropy = float(-(sample.exp() * sample).sum(-1).mean()) if len(sample) else 0.0
    loss = (ce + beta * kl) / torch.as_tensor(count).clamp(min=1)
    return Objective(loss, len(targets), float(kl.detach()), int(replayed.sum()), hits, entropy)


def trainer_class(beta: float):
    """SFTTrainer whose loss is computed at the answer positions only (the LM head runs nowhere else), plus
    beta x KL(base || model) on the replayed answer tokens when beta is not 0.

    TRL 1.16's own loss (its fused LM head) projects every position on a CPU, prompt included, and recomputes
    the head in the backward pass: on SmolLM2 in fp32 that made training a third slower than a plain loop."""
    import torch
    from trl import SFTTrainer

    class ReplayKLTrainer(SFTTrainer):
        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if REPLAY_COLUMN not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, REPLAY_COLUMN]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if model.training else "eval"
            replay_tokens = inputs.pop(REPLAY_TOKENS, None)
            inputs = {**inputs, "use_cache": False}
            labels = inputs.pop("labels")
            keep, answer_logits, targets = at_answers(model, inputs, labels)
            replayed = replay_tokens[keep] if replay_tokens is not None else torch.zeros_like(targets, dtype=torch.bool)
            base_logits_of = self._base_logits(model, inputs, replay_tokens, keep)
            batch = objective(answer_logits, targets, replayed, base_logits_of, beta, num_items_in_batch)
            loss = batch.loss
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            metrics = self._metrics[mode]
            metrics["entropy"].append(batch.entropy)
            metrics["mean_token_accuracy"].append(batch.top1_hits / max(batch.answer_tokens, 1))
            if beta:
                metrics["replay_kl"].append(batch.kl_sum / max(batch.replayed_tokens, 1))
            if mode == "train":
                counted = inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["input_ids"].numel()
                self._total_train_tokens += int(counted)
                metrics["num_tokens"] = [self._total_train_tokens]
            return (loss, {"logits": answer_logits}) if return_outputs else loss

        def _base_logits(self, model, inputs, replay_tokens, keep):
            """() -> the base's logits (adapter off, no gradients) at the kept positions of replayed conversations:
            in a padding-free row a forward of the replayed conversations alone, in padded rows of the whole batch."""
            peft_model = self.accelerator.unwrap_model(model)

            def of():
                wanted = keep & replay_tokens
                bounds = inputs.get("cu_seq_lens_q")
                spans = replay_segments(replay_tokens, bounds) if bounds is not None and keep.shape[0] == 1 else None
                with torch.no_grad(), peft_model.disable_adapter():
                    if spans is None:
                        return logits_at(peft_model, inputs, wanted)
                    # the sub-row is the replayed conversations end to end, so their kept positions line up
                    sub_keep = torch.cat([wanted[0, s:e] for s, e in spans])[None]
                    return logits_at(peft_model, sub_row(inputs, spans), sub_keep)

            return of

    return ReplayKLTrainer
