"""Replay with a KL term to the base (train.replay_kl): the loss, the token mask, the base's logits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.common import read_jsonl
from pipeline.replay_kl import REPLAY_TOKENS, ReplayTokenCollator, mark_replayed, objective, replay_segments
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


def test_without_beta_the_loss_is_the_mean_cross_entropy_of_the_answer_tokens():
    logits, labels, replay = _batch()
    batch = objective(logits, labels, replay, lambda positions: None, beta=0.0)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert batch.answer_tokens == 5 and batch.replayed_tokens == 3 and batch.kl_sum == 0.0
    assert float(batch.loss) == pytest.approx(float(expected), rel=1e-6)


def test_the_kl_term_is_over_the_replayed_answer_tokens_only():
    logits, labels, replay = _batch()
    asked = []

    def base_of(positions):  # the base agrees with the model everywhere but at row 1, token 3 -> 4
        asked.append(positions.clone())
        base = logits[:, :-1].clone()
        base[1, 2] = torch.zeros(11)
        return base[positions]

    batch = objective(logits, labels, replay, base_of, beta=2.0)
    # positions predicting row 1's answer tokens: 1, 2 and 3 (labels 1, 2, 3 at tokens 2, 3, 4)
    assert asked[0].nonzero().tolist() == [[1, 1], [1, 2], [1, 3]] and batch.replayed_tokens == 3
    uniform = torch.full((11,), -torch.log(torch.tensor(11.0)))
    expected_kl = float(F.kl_div(F.log_softmax(logits[1, 2], -1), uniform, log_target=True, reduction="sum"))
    assert batch.kl_sum == pytest.approx(expected_kl, rel=1e-5) and expected_kl > 0.01
    plain = objective(logits, labels, replay, base_of, beta=0.0)
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
    positions = (batch["labels"][:, 1:] != -100) & replay[:, 1:]
    model = kl_trainer.model
    with torch.no_grad(), model.disable_adapter():
        whole = model(**inputs).logits[:, :-1][positions]
    alone = kl_trainer._base_logits(model, inputs, replay)(positions)
    assert alone.shape == whole.shape == (int(positions.sum()), model.config.vocab_size)
    assert torch.allclose(alone, whole, atol=1e-4)


def test_training_logs_the_kl_which_is_zero_while_the_adapter_is_still_zero(kl_trainer):
    kl_trainer.train()
    logged = [entry["replay_kl"] for entry in kl_trainer.state.log_history if "replay_kl" in entry]
    assert len(logged) == 2
    assert logged[0] == pytest.approx(0.0, abs=1e-6)  # LoRA's B starts at zero: the model is the base
    assert logged[1] > 1e-6
