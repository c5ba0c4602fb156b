"""Replay with a KL term to the base (train.replay_kl): the loss, the token mask, the base's logits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.common import read_jsonl
from pipeline.replay_kl import (
    REPLAY_TOKENS,
    ReplayTokenCollator,
    answer_positions,
    answer_targets,
    logits_at,
    mark_replayed,
    objective,
    replay_segments,
)
from pipeline.train import Device, build_trainer

DATA = Path(__file__).resolve().parents[1] / "data"
CPU = Device(cuda=False, bf16=False)
REPLAYED = [
    {"messages": [{"role": "user", "content": "What is 3 + 3?"}, {"role": "assistant", "content": "3 + 3 is 6."}]},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue is one."}]},
]


def _batch(vocab: int = 11):
    """Two rows of five tokens: row 0 ours (answer tokens 3, 4), row 1 replayed (answer tokens 2, 3, 4)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, vocab, generator=generator)
    labels = torch.tensor([[-100, -100, -100, 4, 5], [-100, -100, 1, 2, 3]])
    replay = torch.tensor([[False] * 5, [True] * 5])
    return logits, labels, replay


def _answers(logits, labels, replay):
    """What the trainer hands the objective: the logits at the answer positions, their targets, the replay mask."""
    keep = answer_positions(labels)
    return logits[keep], answer_targets(labels, keep), replay[keep], keep


def test_the_answer_positions_are_those_predicting_a_label_and_never_a_conversation_end():
    _, labels, _ = _batch()
    assert answer_positions(labels).nonzero().tolist() == [[0, 2], [0, 3], [1, 1], [1, 2], [1, 3]]
    flat = torch.tensor([[-100, 7, 8, -100, 9]])  # two conversations of 3 and 2 tokens in one padding-free row
    assert answer_positions(flat).nonzero().tolist() == [[0, 0], [0, 1], [0, 3]]
    bounds = torch.tensor([0, 2, 5], dtype=torch.int32)  # the same row cut after token 1: 8 starts the second
    assert answer_positions(flat, bounds).nonzero().tolist() == [[0, 0], [0, 3]]


def test_without_beta_the_loss_is_the_mean_cross_entropy_of_the_answer_tokens():
    logits, labels, replay = _batch()
    answer_logits, targets, replayed, _ = _answers(logits, labels, replay)
    batch = objective(answer_logits, targets, replayed, lambda: None, beta=0.0)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert targets.tolist() == [4, 5, 1, 2, 3]
    assert batch.answer_tokens == 5 and batch.replayed_tokens == 3 and batch.kl_sum == 0.0
    assert float(batch.loss) == pytest.approx(float(expected), rel=1e-6)


def test_the_kl_term_is_over_the_replayed_answer_tokens_only():
    logits, labels, replay = _batch()
    answer_logits, targets, replayed, keep = _answers(logits, labels, replay)
    base = logits.clone()
    base[1, 2] = torch.zeros(11)  # the base agrees with the model everywhere but at row 1, token 2 (predicting 2)

    batch = objective(answer_logits, targets, replayed, lambda: base[keep & replay], beta=2.0)
    # positions predicting row 1's answer tokens: 1, 2 and 3 (labels 1, 2, 3 at tokens 2, 3, 4)
    assert (keep & replay).nonzero().tolist() == [[1, 1], [1, 2], [1, 3]] and batch.replayed_tokens == 3
    uniform = torch.full((11,), -torch.log(torch.tensor(11.0)))
    expected_kl = float(F.kl_div(F.log_softmax(logits[1, 2], -1), uniform, log_target=True, reduction="sum"))
    assert batch.kl_sum == pytest.approx(expected_kl, rel=1e-5) and expected_kl > 0.01
    plain = objective(answer_logits, targets, replayed, lambda: base[keep & replay], beta=0.0)
    assert float(batch.loss) == pytest.approx(float(plain.loss) + 2.0 * expected_kl / 5, rel=1e-5)


def test_the_collator_marks_the_tokens_of_replayed_conversations_padding_free_and_padded():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = [{"input_ids": [1, 2, 3], "replay": False}, {"input_ids": [4, 5], "replay": True}]
    flat = ReplayTokenCollator(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True))
    batch = flat([dict(e) for e in examples])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch[REPLAY_TOKENS].tolist() == [[False, False, False, True, True]]
    assert replay_segments(batch[REPLAY_TOKENS], batch["cu_seq_lens_q"]) == [(3, 5)]
    padded = ReplayTokenCollator(DataCollatorForLanguageModeling(pad_token_id=0))([dict(e) for e in reversed(examples)])
    assert padded["input_ids"].tolist() == [[4, 5, 0], [1, 2, 3]]
    assert padded[REPLAY_TOKENS].tolist() == [[True, True, False], [False, False, False]]


@pytest.fixture(scope="module")
def kl_trainer(tiny_base, repo_params, tmp_path_factory):
    ours = read_jsonl(DATA / "train.jsonl")[:6]
    rows = mark_replayed(ours, False) + mark_replayed(REPLAYED, True)
    train = dataclasses.replace(repo_params.train, replay_kl=1.0, batch_size=8, max_steps=2, epochs=2)
    setup = build_trainer(tiny_base, rows, ours[:2], train, repo_params.data, tmp_path_factory.mktemp("kl"), CPU)
    return setup.trainer


def test_the_base_forward_of_the_replayed_conversations_alone_equals_the_whole_row(kl_trainer):
    batch = next(iter(kl_trainer.get_train_dataloader()))
    replay = batch.pop(REPLAY_TOKENS)
    assert len(replay_segments(replay, batch["cu_seq_lens_q"])) == 2
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    keep = answer_positions(batch["labels"], batch["cu_seq_lens_q"])
    model = kl_trainer.model
    with torch.no_grad(), model.disable_adapter():
        whole = model(**inputs).logits[keep & replay]
    alone = kl_trainer._base_logits(model, inputs, replay, keep)()
    assert alone.shape == whole.shape == (int((keep & replay).sum()), model.config.vocab_size)
    assert torch.allclose(alone, whole, atol=1e-4)


def test_the_lm_head_at_the_answer_positions_alone_gives_the_full_forwards_logits_there(kl_trainer):
    batch = next(iter(kl_trainer.get_train_dataloader()))
    batch.pop(REPLAY_TOKENS)
    labels = batch.pop("labels")
    keep = answer_positions(labels, batch["cu_seq_lens_q"])
    model = kl_trainer.model
    with torch.no_grad():
        whole = model(**batch).logits[keep]
        kept = logits_at(model, batch, keep)
    assert 0 < len(kept) < labels.numel() - 50  # the prompts' positions are left out
    assert kept.shape == whole.shape and torch.allclose(kept, whole, atol=1e-5)


def test_training_logs_the_kl_which_is_zero_while_the_adapter_is_still_zero(kl_trainer):
    kl_trainer.train()
    logged = [entry["replay_kl"] for entry in kl_trainer.state.log_history if "replay_kl" in entry]
    assert len(logged) == 2
    assert logged[0] == pytest.approx(0.0, abs=1e-6)  # LoRA's B starts at zero: the model is the base
    assert logged[1] > 1e-6
