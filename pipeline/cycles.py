"""Training in learning-rate cycles until our training answers are fit (train.cycles, train.fit_nll).

A fixed count of steps or passes over-trains one dataset and under-trains another: how many passes a
set of facts needs depends on how new they are to the base, not only on how many conversations carry
them. So training runs in cycles of `max_steps` optimizer steps, the learning-rate schedule (cosine by
default) restarting at each (a warm restart: Loshchilov & Hutter 2017, "SGDR"). At the end of every
cycle, where the schedule has come down, the mean negative log-likelihood per answer token of our own
training conversations (not the replayed ones) is measured with the adapter on and dropout off. At
most `fit_nll`: the answers are fit and training stops there. Above it: one more cycle, at most `cycles`.

Low NLL does not mean the facts come out: a small set of new facts can be fit to 0.8 nats/token while
greedy answers still miss half of them (docs/recipe.md, seventh and eighth rounds). So, with `fit_learn`,
being fit also needs the learn cases of data/gate_cases.jsonl (never trained on: prepare rejects their
prompts in the training data) answered greedily by the model in training, as the gate asks them, to score
at least `fit_learn` on their keywords. This only chooses how many cycles run, of at most `cycles`; the
gate still judges the shipped GGUFs on every rule.

The first cycle is the same run as a single schedule over `max_steps`: the same learning rates step for
step, the same batches; the measurement draws on no random state.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from pipeline.cases import Case
from pipeline.params import TrainParams
from pipeline.replay_kl import REPLAY_TOKENS, at_answers

log = logging.getLogger(__name__)

FIT_KEY = "answer_nll"  # the measurement's entry in the trainer's log history (kept in checkpoints)
LEARN_KEY = "learn_score"


def cycle_steps(train: TrainParams, conversations: int) -> int:
    """Optimizer steps of one cycle: `max_steps`, but never more than `epochs` passes; -1 = `epochs` passes."""
    passes = train.epochs * math.ceil(math.ceil(conversations / train.batch_size) / train.grad_accum)
    return passes if train.max_steps <= 0 else min(train.max_steps, passes)


@dataclass(frozen=True)
class Fit:
    """What was measured at the end of one cycle."""

    step: int
    answer_nll: float  # nats per answer token, mean over our own training conversations
    learn_score: float | None = None  # the learn cases' mean keyword score; None = not measured

    def as_dict(self) -> dict:
        learn = {} if self.learn_score is None else {LEARN_KEY: round(self.learn_score, 4)}
        return {"step": self.step, FIT_KEY: round(self.answer_nll, 4), **learn}


def fits_in(log_history: list[dict]) -> list[Fit]:
    return [Fit(e["step"], e[FIT_KEY], e.get(LEARN_KEY)) for e in log_history if FIT_KEY in e]


@dataclass(frozen=True)
class LearnCheck:
    """The learn cases, answered at a cycle's end as the gate will ask them (greedy, the serving template)."""

    cases: tuple[Case, ...]
    min_score: float  # train.fit_learn
    max_new_tokens: int  # gate.max_new_tokens
    chat_template: str  # the serving template (training runs on a variant with generation marks)


def learn_score(model, tokenizer, check: LearnCheck) -> float:
    """Mean keyword score of the learn cases' greedy answers under `model` as it is now (dropout off)."""
    from pipeline.hf_evaluator import HFModel

    was_training = model.training
    model.eval()
    try:
        evaluator = HFModel.in_memory(model, tokenizer, "training")
        evaluator.tokenizer.chat_template = check.chat_template
        answers = evaluator.answers([case.messages() for case in check.cases], check.max_new_tokens, lambda _: None)
    finally:
        model.train(was_training)
    scores = [case.score(answer.text).score for case, answer in zip(check.cases, answers, strict=True)]
    return sum(scores) / len(scores)


def restarting(scheduler_factory, optimizer, cycle: int):
    """A LambdaLR that runs `scheduler_factory(optimizer, cycle)`'s schedule again every `cycle` steps."""
    from torch.optim.lr_scheduler import LambdaLR

    one_cycle = scheduler_factory(optimizer, cycle)
    return LambdaLR(optimizer, [lambda step, f=f: f(step % cycle) for f in one_cycle.lr_lambdas])


def answer_nll(trainer, dataset) -> float:
    """Mean NLL per answer token of `dataset` (tokenized as the trainer's own) under the model as it is now:
    adapter on, dropout off, no gradients. Summed over every process, so each one decides alike."""
    import torch
    import torch.nn.functional as F

    model = trainer.model
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=trainer.args.device)
    try:
        with torch.no_grad():
            for batch in trainer.get_eval_dataloader(dataset):
                batch = {k: v.to(trainer.args.device) if hasattr(v, "to") else v for k, v in batch.items()}
                batch.pop(REPLAY_TOKENS, None)
                labels = batch.pop("labels")
                _, logits, targets = at_answers(model, {**batch, "use_cache": False}, labels)
                totals[0] += F.cross_entropy(logits.float(), targets, reduction="sum").double()
                totals[1] += len(targets)
    finally:
        model.train(was_training)
    totals = trainer.accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1].clamp(min=1))


def trainer_class(base, cycle: int):
    """`base` (an SFTTrainer class) whose learning-rate schedule restarts every `cycle` steps."""

    class CyclingTrainer(base):
        def create_scheduler(self, num_training_steps: int, optimizer=None):
            from transformers import get_scheduler

            def one_cycle(optimizer, steps):
                return get_scheduler(
                    self.args.lr_scheduler_type,
                    optimizer=optimizer,
                    num_warmup_steps=self.args.get_warmup_steps(steps),
                    num_training_steps=steps,
                    scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
                )

            if self.lr_scheduler is None:
                self.lr_scheduler = restarting(one_cycle, optimizer or self.optimizer, cycle)
                self._created_lr_scheduler = True
            return self.lr_scheduler

    return CyclingTrainer


def fit_callback(trainer, own_dataset, cycle: int, fit_nll: float, learn: LearnCheck | None = None):
    """At every cycle's end: measure the training answers' NLL (and, where they are fit, the learn cases'
    score), log them, and stop when the answers are fit."""
    from transformers import TrainerCallback

    class _FitCheck(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % cycle:
                return
            nll = answer_nll(trainer, own_dataset)
            last = state.global_step >= state.max_steps
            # the greedy answers cost seconds: asked where the answers are fit; after the last cycle too, so the
            # metrics show what the shipped adapter scores
            asked = learn is not None and nll <= fit_nll
            score = learn_score(trainer.model, trainer.processing_class, learn) if asked else None
            fit = Fit(state.global_step, nll, score)
            state.log_history.append(fit.as_dict())
            cycles_run = state.global_step // cycle
            fitted = nll <= fit_nll and (learn is None or last or (score is not None and score >= learn.min_score))
            if state.is_world_process_zero:
                learn_text = "" if score is None else f", learn cases {score:.3f} (fit_learn {learn.min_score})"
                log.info(
                    "cycle %d (step %d): training answers' NLL %.4f (fit_nll %.4f)%s%s",
                    cycles_run,
                    fit.step,
                    nll,
                    fit_nll,
                    learn_text,
                    ": fit, training stops" if fitted and not last else "",
                )
            if fitted:
                control.should_training_stop = True
            elif last and state.is_world_process_zero:
                log.warning(
                    "the training answers are not fit after %d cycles (NLL %.4f, fit_nll %.4f): more "
                    "train.cycles or a higher learning_rate would train longer; the gate judges what came out",
                    cycles_run,
                    nll,
                    fit_nll,
                )

    return _FitCheck()
