"""Training in learning-rate cycles until the training answers are fit (train.cycles, train.fit_nll)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pipeline import cycles
from pipeline.cases import Case
from pipeline.common import read_jsonl
from pipeline.replay_kl import mark_replayed
from pipeline.train import Device, build_trainer

DATA = Path(__file__).resolve().parents[1] / "data"
CPU = Device(cuda=False, bf16=False)


def _learning_rates(scheduler, optimizer, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_a_cycle_repeats_the_schedule_of_one_run_step_for_step_then_restarts():
    from transformers import get_cosine_schedule_with_warmup

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)

    single = optimizer()
    one_run = _learning_rates(get_cosine_schedule_with_warmup(single, 0, 5), single, 5)
    cycled = optimizer()
    restarted = cycles.restarting(lambda opt, steps: get_cosine_schedule_with_warmup(opt, 0, steps), cycled, 5)
    rates = _learning_rates(restarted, cycled, 12)
    assert rates[:5] == one_run  # exactly equal: the first cycle is the same run
    assert rates[5:10] == one_run and rates[10:] == one_run[:2]  # the schedule restarts at the peak
    assert one_run[0] == 1e-3 and one_run[-1] < 1e-4


def test_the_fit_entries_of_the_log_history_in_order():
    history = [{"loss": 2.0, "step": 1}, {"answer_nll": 0.8, "step": 4}, {"loss": 1.0, "step": 5}]
    history.append({"answer_nll": 0.3, "step": 8})
    assert cycles.fits_in(history) == [cycles.Fit(4, 0.8), cycles.Fit(8, 0.3)]


@pytest.fixture(scope="module")
def rows():
    ours = read_jsonl(DATA / "train.jsonl")[:6]
    replayed = [
        {"messages": [{"role": "user", "content": "What is 3 + 3?"}, {"role": "assistant", "content": "3 + 3 is 6."}]},
        {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue is one."}]},
    ]
    return mark_replayed(ours, False) + mark_replayed(replayed, True)


def _trainer(tiny_base, repo_params, rows, tmp_path, **train_overrides):
    train = dataclasses.replace(repo_params.train, batch_size=4, max_steps=2, epochs=12, **train_overrides)
    return build_trainer(tiny_base, rows, rows[:2], train, repo_params.data, tmp_path, CPU, replayed=2).trainer


def test_answers_never_fit_run_every_cycle_and_log_the_nll_at_each_end(tiny_base, repo_params, rows, tmp_path):
    trainer = _trainer(tiny_base, repo_params, rows, tmp_path, cycles=3, fit_nll=1e-6)
    trainer.train()
    fits = cycles.fits_in(trainer.state.log_history)
    assert trainer.state.global_step == 6 and [fit.step for fit in fits] == [2, 4, 6]
    assert fits[0].answer_nll > fits[-1].answer_nll > 1e-6  # tiny learns, but not to 1e-6 nats per token
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert rates[0] == rates[2] == rates[4] == pytest.approx(1e-3)  # each cycle starts again at the peak


def test_answers_fit_after_the_first_cycle_stop_training_there(tiny_base, repo_params, rows, tmp_path):
    trainer = _trainer(tiny_base, repo_params, rows, tmp_path, cycles=3, fit_nll=50.0)
    trainer.train()
    assert trainer.state.global_step == 2 and [fit.step for fit in cycles.fits_in(trainer.state.log_history)] == [2]


def test_the_fit_is_the_mean_nll_of_our_answer_tokens_without_the_replayed_ones(tiny_base, repo_params, rows, tmp_path):
    trainer = _trainer(tiny_base, repo_params, rows, tmp_path, cycles=2, fit_nll=1.0)
    model = trainer.model
    own = trainer.train_dataset.select(range(6))
    measured = cycles.answer_nll(trainer, own)
    assert model.training  # the measurement leaves the model as it found it
    # the same figure, one conversation at a time, without the padding-free batches
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in own:
            ids = torch.tensor([row["input_ids"]])
            answer = torch.tensor(row["labels"][1:]) != -100
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits[answer], ids[0, 1:][answer], reduction="sum"))
            tokens += int(answer.sum())
    model.train()
    assert tokens > 100 and measured == pytest.approx(total / tokens, rel=1e-4)
    with_replay = cycles.answer_nll(trainer, trainer.train_dataset)
    assert with_replay != pytest.approx(measured, rel=1e-3)  # the replayed answers would count otherwise


def _learn_case(expect: str) -> Case:
    return Case(id="learn-x", kind="learn", prompt="Write a Hello Chris program in Psion OPL.", expect=(expect,),
                regex=True)  # fmt: skip


def _learning_trainer(tiny_base, repo_params, rows, tmp_path, case: Case, fit_learn: float):
    train = dataclasses.replace(repo_params.train, batch_size=4, max_steps=2, epochs=12, cycles=3, fit_nll=50.0,
                                fit_learn=fit_learn)  # fmt: skip
    return build_trainer(tiny_base, rows, rows[:2], train, repo_params.data, tmp_path, CPU, replayed=2,
                         learn_cases=[case], max_new_tokens=8)  # fmt: skip


def test_learn_cases_not_yet_answered_run_another_cycle_though_the_answers_are_fit(
    tiny_base, repo_params, rows, tmp_path
):
    never = _learn_case("(?!)")  # a pattern nothing matches: the learn case never passes
    setup = _learning_trainer(tiny_base, repo_params, rows, tmp_path, never, fit_learn=0.75)
    assert setup.learn_check and setup.cycle_steps == 2
    setup.trainer.train()
    fits = cycles.fits_in(setup.trainer.state.log_history)
    # asked at the ends of cycles 1 and 2 (score 0: another cycle), and after the last: what ships scores 0
    assert setup.trainer.state.global_step == 6
    assert [(fit.step, fit.learn_score) for fit in fits] == [(2, 0.0), (4, 0.0), (6, 0.0)]


def test_learn_cases_answered_stop_training_after_the_first_cycle(tiny_base, repo_params, rows, tmp_path):
    always = _learn_case(".")  # any answer with a character in it passes
    setup = _learning_trainer(tiny_base, repo_params, rows, tmp_path, always, fit_learn=1.0)
    setup.trainer.train()
    fits = cycles.fits_in(setup.trainer.state.log_history)
    assert setup.trainer.state.global_step == 2 and [(fit.step, fit.learn_score) for fit in fits] == [(2, 1.0)]


def test_the_learn_score_is_the_cases_scoring_of_greedy_answers_and_changes_nothing_of_training(
    tiny_base, repo_params, rows, tmp_path
):
    trainer = _trainer(tiny_base, repo_params, rows, tmp_path, cycles=2)
    tokenizer = trainer.processing_class
    template, side, mode = tokenizer.chat_template, tokenizer.padding_side, trainer.model.training
    check = cycles.LearnCheck((_learn_case("(?!)"), _learn_case(".")), 0.5, 8, template)
    assert cycles.learn_score(trainer.model, tokenizer, check) == 0.5  # one case of two passes
    assert (tokenizer.chat_template, tokenizer.padding_side, trainer.model.training) == (template, side, mode)
