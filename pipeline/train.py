"""Stage `train`: LoRA (or QLoRA on CUDA) fine-tuning with TRL's SFTTrainer.

    python -m pipeline.train --base models/base --data data/prepared --out models/adapter \
        --metrics metrics/train.json --plots plots

Loss on assistant tokens only (every assistant turn), through the model's own chat template;
eval loss each epoch; early stopping keeps the best epoch's adapter. Checkpoints go outside
DVC's outputs (see `checkpoint_root`), so a rerun with the same inputs resumes where an
interrupted run stopped; each carries a record (the inputs' fingerprint and the sha256 of every
file saved with it), and a checkpoint without a matching record is ignored with a warning.
`train.num_processes > 1` relaunches this stage under torchrun (DDP).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline import cycles, packed_attention, question_noise, replay_kl
from pipeline.cases import Case, read_cases
from pipeline.chat_templates import check_training_template, training_template
from pipeline.common import (
    PipelineError,
    atomic_directory,
    deterministic_torch,
    file_sha256_hex,
    get_logger,
    read_jsonl,
    run_cli,
    write_json_atomic,
    write_text_atomic,
)
from pipeline.params import DataParams, Params, TrainParams, load_params
from pipeline.vocab import check_vocab_consistency, ensure_pad_token, save_tokenizer

# gate.max_new_tokens: the learn cases are answered in training as long as the gate lets them be (train.fit_learn)
PARAMS = ("train", "data.max_seq_length", "gate.max_new_tokens")
# Where interrupted runs keep their checkpoints: not a DVC output (DVC deletes those before a
# rerun) and outside the GitLab build directory on the rig (see runner/).
CHECKPOINTS_ENV = "LLM_GITOPS_CHECKPOINTS"
DEFAULT_CHECKPOINTS = Path(".cache") / "checkpoints"
KEEPER_FILE = "keep_best.json"
BEST_ADAPTER_FILE = "best_adapter.safetensors"
# Written last into every checkpoint by this stage: what it was trained on and the digest of each file.
RECORD_FILE = "train_record.json"
# A secret only the protected runner has (runner/config.toml.template): with it set, a record must carry
# its HMAC, which whoever can merely write the checkpoint folder cannot compute.
RECORD_KEY_ENV = "LLM_GITOPS_CHECKPOINT_KEY"
# Optimizers that live in bitsandbytes' CUDA kernels.
CUDA_OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit")

log = get_logger("train")


@dataclass
class Device:
    cuda: bool
    bf16: bool  # bf16 is fast here: a CUDA GPU with bf16, or a CPU with AMX / AVX512-BF16
    tf32: bool = False  # Ampere or newer

    @classmethod
    def detect(cls) -> Device:
        import torch

        if torch.cuda.is_available():
            ampere = torch.cuda.get_device_capability()[0] >= 8
            return cls(cuda=True, bf16=torch.cuda.is_bf16_supported(), tf32=ampere)
        return cls(cuda=False, bf16=torch.ops.mkldnn._is_mkldnn_bf16_supported())


def use_bf16(train: TrainParams, device: Device) -> bool:
    return device.bf16 if train.bf16 == "auto" else train.bf16


def precision(train: TrainParams, device: Device) -> str:
    """What training computes in, for metrics/train.json: "bf16" (bf16 weights: a CUDA GPU with bf16),
    "bf16-autocast" (fp32 weights, bf16 matmuls) or "fp32"; "nf4+" in front with qlora. With bf16: auto
    it depends on the machine (a CPU with AMX/AVX512-BF16 autocasts), so the same inputs give another model."""
    autocast = "bf16-autocast" if use_bf16(train, device) else "fp32"
    kind = "bf16" if device.cuda and device.bf16 else autocast  # load_model's rule for the weights
    return f"nf4+{kind}" if train.qlora else kind


def check_device(train: TrainParams, device: Device) -> None:
    """Fail before loading anything when the params ask for what this machine lacks."""
    if train.qlora and not device.cuda:
        raise PipelineError(
            "train.qlora: true needs a CUDA GPU (bitsandbytes 4-bit) and none was found; "
            "set train.qlora: false to train plain LoRA here"
        )
    if train.optimizer in CUDA_OPTIMIZERS and not device.cuda:
        raise PipelineError(f"train.optimizer: {train.optimizer} needs a CUDA GPU; use adamw_torch here")
    if train.liger:
        import importlib.util

        if not device.cuda or importlib.util.find_spec("liger_kernel") is None:
            raise PipelineError("train.liger: true needs a CUDA GPU and the liger-kernel package")
    if train.batch_size % train.num_processes:
        raise PipelineError(
            f"train.batch_size {train.batch_size} must be divisible by train.num_processes {train.num_processes} "
            "(each process takes an equal share of every batch)"
        )


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def load_model(model_dir: Path, train: TrainParams, device: Device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Weights stay fp32 on CPU (bf16 there is autocast only); bf16 weights on a bf16-capable GPU.
    kwargs: dict = {
        "dtype": torch.bfloat16 if device.cuda and device.bf16 else torch.float32,
        "use_safetensors": True,
        "attn_implementation": attention_for(train, device),
    }
    if kwargs["attn_implementation"] == packed_attention.NAME:
        packed_attention.register()
    if train.qlora:
        from accelerate import PartialState
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if device.bf16 else torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=compute,  # a float storage dtype lets FSDP shard the 4-bit weights
        )
        # One full copy per process; "auto" would split layers across GPUs and silently disable DDP.
        kwargs["device_map"] = {"": PartialState().local_process_index}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if train.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=_checkpointing(train, device),
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return model, tokenizer


def attention_for(train: TrainParams, device: Device) -> str:
    if train.attention != "auto":
        return train.attention
    if train.padding_free or train.packing:
        return "flex_attention" if device.cuda else packed_attention.NAME
    return "sdpa"


def _checkpointing(train: TrainParams, device: Device) -> bool:
    return device.cuda if train.gradient_checkpointing == "auto" else train.gradient_checkpointing


@dataclass
class KeepBestAdapter:
    """Snapshot the trainable (LoRA) weights at the best eval loss; stop after `patience` worse evals.

    Its state is saved into every checkpoint, so a resumed run keeps the same best and patience."""

    patience: int
    best_loss: float = math.inf
    best_epoch: float = 0.0
    worse_evals: int = 0
    stopped_early: bool = False
    snapshot: dict = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        if self.snapshot:
            save_file({n: t.contiguous() for n, t in self.snapshot.items()}, folder / BEST_ADAPTER_FILE)
        state = {k: v for k, v in asdict(self).items() if k != "snapshot"}
        (folder / KEEPER_FILE).write_text(json.dumps(state))

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        if not (folder / KEEPER_FILE).is_file():
            return  # interrupted between the checkpoint and this state: start the bookkeeping afresh
        for key, value in json.loads((folder / KEEPER_FILE).read_text()).items():
            setattr(self, key, value)
        if (folder / BEST_ADAPTER_FILE).is_file():
            self.snapshot = load_file(folder / BEST_ADAPTER_FILE)

    def callback(self):
        from transformers import TrainerCallback

        keeper = self

        class _Callback(TrainerCallback):
            def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
                loss = metrics["eval_loss"]
                if loss < keeper.best_loss:
                    keeper.best_loss, keeper.best_epoch, keeper.worse_evals = loss, state.epoch, 0
                    keeper.snapshot = {
                        n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad
                    }
                else:
                    keeper.worse_evals += 1
                    if keeper.patience and keeper.worse_evals >= keeper.patience:
                        keeper.stopped_early = control.should_training_stop = True

            def on_save(self, args, state, control, **kwargs):
                if state.is_world_process_zero:
                    keeper.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")

        return _Callback()

    def restore(self, model) -> None:
        import torch

        if not self.snapshot:
            return
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in self.snapshot:
                    parameter.copy_(self.snapshot[name])


def replay_mix(replay_rows: list[dict], share: float, train_count: int) -> list[dict]:
    """The replay conversations to add: `share` x the training conversations, in file order, at most all."""
    return replay_rows[: min(len(replay_rows), round(share * train_count))]


def step_budget(train: TrainParams, conversations: int) -> int:
    """Optimizer steps to run: `cycles` cycles of `max_steps` (each at most `epochs` passes); -1 = `epochs`."""
    if train.max_steps <= 0 and train.cycles == 1:
        return -1
    return train.cycles * cycles.cycle_steps(train, conversations)


def budget_text(train: TrainParams, max_steps: int, cycle: int, learn_check: bool) -> str:
    if max_steps <= 0:
        return f"{train.epochs} epochs"
    if train.cycles == 1:
        return f"{max_steps} steps"
    until = f"our answers' NLL <= {train.fit_nll}"
    if learn_check:
        until += f" and the learn cases score >= {train.fit_learn}"
    return f"at most {train.cycles} cycles of {cycle} steps (until {until})"


@dataclass
class TrainingSetup:
    """Everything train needs but .train(): the trainer and what saving its adapter needs afterwards."""

    trainer: object  # trl.SFTTrainer
    tokenizer: object
    shipped_template: str  # the serving chat template (training runs on a variant with generation marks)
    embeddings_resized: bool  # a pad token was added: the embeddings travel with the adapter
    keeper: KeepBestAdapter
    cycle_steps: int  # optimizer steps of one learning-rate cycle
    learn_check: bool  # the learn cases are asked at a cycle's end (train.fit_learn)


def build_trainer(
    model_dir: Path,
    train_rows: list[dict],
    eval_rows: list[dict],
    train: TrainParams,
    data: DataParams,
    output_dir: Path,
    device: Device | None = None,
    replayed: int = 0,
    learn_cases: Sequence[Case] = (),
    max_new_tokens: int = 96,
):
    """The trainer over these conversations (the last `replayed` of them the base's), ready to .train().
    `learn_cases` (with train.fit_learn and cycles > 1): answered greedily, up to `max_new_tokens`, at a
    cycle's end to decide whether another runs."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig

    device = device or Device.detect()
    check_device(train, device)
    deterministic_torch(train.seed, train.cpu_threads)
    model, tokenizer = load_model(model_dir, train, device)
    resized = ensure_pad_token(tokenizer, model, train.pad_token)
    check_vocab_consistency(model, tokenizer, f"{model_dir} after adding the pad token")

    shipped = tokenizer.chat_template
    training = training_template(tokenizer)
    check_training_template(tokenizer, training, [row["messages"] for row in train_rows + eval_rows])
    tokenizer.chat_template = training

    checkpointing = _checkpointing(train, device)
    config = SFTConfig(
        output_dir=str(output_dir),
        assistant_only_loss=True,
        # prepare has already rejected (or dropped) longer conversations; padding-free needs no truncation
        max_length=None if train.padding_free and not train.packing else data.max_seq_length,
        padding_free=train.padding_free,
        packing=train.packing,
        # each process takes an equal share, so steps per epoch do not depend on num_processes
        per_device_train_batch_size=train.batch_size // train.num_processes,
        per_device_eval_batch_size=train.batch_size // train.num_processes,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.learning_rate,
        num_train_epochs=train.epochs,
        max_steps=step_budget(train, len(train_rows)),
        neftune_noise_alpha=train.neftune_alpha,
        lr_scheduler_type=train.scheduler,
        warmup_steps=train.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=train.optimizer,
        eval_strategy="epoch",
        save_strategy="steps" if train.checkpoint_steps else "epoch",
        save_steps=train.checkpoint_steps or 500,
        save_total_limit=1,  # only the newest checkpoint is needed to resume
        logging_strategy="steps",
        logging_steps=train.logging_steps,
        report_to="none",
        seed=train.seed,
        data_seed=train.seed,
        use_cpu=not device.cuda,
        bf16=use_bf16(train, device),
        tf32=True if device.tf32 else None,
        use_liger_kernel=train.liger,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        ddp_backend="gloo" if world_size() > 1 and not device.cuda else None,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
    )
    lora = LoraConfig(
        r=train.lora.r,
        lora_alpha=train.lora.alpha,
        lora_dropout=train.lora.dropout,
        target_modules=train.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    keeper = KeepBestAdapter(patience=train.early_stopping_patience)
    trainer_class = replay_kl.trainer_class(train.replay_kl)  # the loss at answer positions only, + KL if beta
    cycle = cycles.cycle_steps(train, len(train_rows))
    if train.cycles > 1:
        trainer_class = cycles.trainer_class(trainer_class, cycle)
    trainer = trainer_class(
        model=model,
        args=config,
        processing_class=tokenizer,
        peft_config=lora,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows),
        callbacks=[keeper.callback()],
    )
    if train.replay_kl:
        trainer.data_collator = replay_kl.ReplayTokenCollator(trainer.data_collator)
    learn = None
    if train.fit_learn is not None and learn_cases:
        learn = cycles.LearnCheck(tuple(learn_cases), train.fit_learn, max_new_tokens, shipped)
    if train.cycles > 1:  # (params allow cycles > 1 only without packing: packed rows mix conversations)
        # our own conversations (the replayed ones come last): how well they are fit decides another cycle
        own = trainer.train_dataset.select(range(len(train_rows) - replayed))
        trainer.add_callback(cycles.fit_callback(trainer, own, cycle, train.fit_nll, learn))
    return TrainingSetup(trainer, tokenizer, shipped, resized, keeper, cycle, learn is not None)


def checkpoint_root() -> Path:
    return Path(os.environ.get(CHECKPOINTS_ENV) or DEFAULT_CHECKPOINTS)


def inputs_fingerprint(
    base_dir: Path,
    data_dir: Path,
    train: TrainParams,
    data: DataParams,
    replay: Path | None = None,
    cases: Path | None = None,
    max_new_tokens: int | None = None,
) -> str:
    """Hash of everything a training run depends on (sha256, hex): same inputs -> same checkpoint folder
    (named by its first 16 digits) and the same record."""
    settings = [asdict(train), data.max_seq_length, *([max_new_tokens] if cases else [])]
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for folder in (base_dir, data_dir, *(path for path in (replay, cases) if path)):
        files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
        for path in files:
            digest.update(str(path.relative_to(folder.parent if folder.is_file() else folder)).encode())
            with open(path, "rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def checkpoint_files(checkpoint: Path) -> dict[str, str]:
    """{path inside the checkpoint: sha256} of every file in it but the record."""
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and p != checkpoint / RECORD_FILE)
    return {p.relative_to(checkpoint).as_posix(): file_sha256_hex(p) for p in files}


def record_signature(record: dict, key: str) -> str:
    """HMAC-SHA256 of the record's content under the runner's key."""
    content = json.dumps({name: record.get(name) for name in ("fingerprint", "step", "files")}, sort_keys=True)
    return hmac.new(key.encode(), content.encode(), hashlib.sha256).hexdigest()


def write_record(checkpoint: Path, fingerprint: str, key: str | None = None) -> None:
    """Vouch for a checkpoint this stage has just saved: these inputs, these files (signed when given a key)."""
    record = {"fingerprint": fingerprint, "step": step_of(checkpoint), "files": checkpoint_files(checkpoint)}
    if key:
        record["signature"] = record_signature(record, key)
    write_json_atomic(checkpoint / RECORD_FILE, record)


def record_problem(checkpoint: Path, fingerprint: str, key: str | None = None) -> str | None:
    """None when this stage wrote `checkpoint` for these inputs and nothing in it changed since; else why not.
    Anything else (planted, copied from another run, half-saved, edited) must not be resumed from. With a
    key, the record must also be signed with it: a record anyone could have computed is not enough."""
    try:
        record = json.loads((checkpoint / RECORD_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {RECORD_FILE} (not saved by this stage, or its save was cut)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{RECORD_FILE} is unreadable ({type(error).__name__})"
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        return f"{RECORD_FILE} is not a record of this stage"
    if record.get("fingerprint") != fingerprint:
        return f"{RECORD_FILE} was written for other inputs (params, data or base)"
    if record.get("step") != step_of(checkpoint):
        return f"{RECORD_FILE} is for step {record.get('step')!r}, not this checkpoint's"
    signature = str(record.get("signature", "")).encode()  # bytes: compare_digest refuses non-ASCII str
    if key and not hmac.compare_digest(signature, record_signature(record, key).encode()):
        return f"{RECORD_FILE} is not signed with this runner's key ({RECORD_KEY_ENV})"
    found, recorded = checkpoint_files(checkpoint), record["files"]
    changed = sorted(name for name in found.keys() & recorded.keys() if found[name] != recorded[name])
    added, missing = sorted(found.keys() - recorded.keys()), sorted(recorded.keys() - found.keys())
    for what, names in (("differs from its record", changed), ("not in its record", added), ("missing", missing)):
        if names:
            return f"{', '.join(names)} {what}"
    return None


@dataclass(frozen=True)
class CheckpointChoice:
    """What a rerun finds in its checkpoint folder."""

    resume: Path | None  # the newest checkpoint this stage wrote for these inputs
    refused: list[tuple[Path, str]]  # every other checkpoint there with a problem, and the problem
    superseded: list[Path]  # older checkpoints of this stage (the Trainer keeps one; a cut rotation leaves more)


def resumable_checkpoint(folder: Path, fingerprint: str, key: str | None = None) -> CheckpointChoice:
    """Sort the checkpoints under `folder`. Refused and superseded ones must go before training: the Trainer's
    rotation keeps the newest folder (by mtime) and would delete the one it is writing instead."""
    numbered = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    problems = {checkpoint: record_problem(checkpoint, fingerprint, key) for checkpoint in numbered}
    trusted = [checkpoint for checkpoint, problem in problems.items() if problem is None]
    resume = max(trusted, key=step_of, default=None)
    refused = sorted(((c, p) for c, p in problems.items() if p is not None), key=lambda item: step_of(item[0]))
    return CheckpointChoice(resume, refused, sorted((c for c in trusted if c != resume), key=step_of))


def recorder_callback(fingerprint: str, key: str | None = None):
    """Writes the record into each checkpoint once every process has saved its part (rng_state_<rank>)."""
    from transformers import TrainerCallback

    class _Recorder(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            if state.is_world_process_zero:
                write_record(Path(args.output_dir) / f"checkpoint-{state.global_step}", fingerprint, key)

    return _Recorder()


def loss_curves(log_history: list[dict]) -> tuple[list[dict], list[dict]]:
    def curve(key: str) -> list[dict]:
        return [{"step": e["step"], "epoch": round(e["epoch"], 4), "loss": e[key]} for e in log_history if key in e]

    return curve("loss"), curve("eval_loss")


def tsv(rows: list[dict]) -> str:
    header = "step\tepoch\tloss\n"
    return header + "".join(f"{r['step']}\t{r['epoch']}\t{r['loss']:.6f}\n" for r in rows)


def training_rows(data_dir: Path, replay: Path | None, train: TrainParams) -> tuple[list[dict], list[dict], int]:
    """(training conversations with the replayed ones appended, eval conversations, how many were replayed)."""
    train_rows, eval_rows = read_jsonl(data_dir / "train.jsonl"), read_jsonl(data_dir / "eval.jsonl")
    if train.replay and replay is None:
        raise PipelineError("train.replay > 0 needs --replay (the base_answers stage's replay.jsonl)")
    replayed = replay_mix(read_jsonl(replay), train.replay, len(train_rows)) if train.replay else []
    train_rows = question_noise.with_noisy_copies(train_rows, train.question_noise, train.seed)
    if train.replay_kl:  # the collator needs to know which conversations are replayed
        train_rows, replayed = replay_kl.mark_replayed(train_rows, False), replay_kl.mark_replayed(replayed, True)
    return train_rows + replayed, eval_rows, len(replayed)


def save_adapter(setup: TrainingSetup, base_dir: Path, out: Path) -> None:
    for config in setup.trainer.model.peft_config.values():
        # all-linear resolves to a set, written in hash order: one order, or the same adapter hashes anew each run
        if isinstance(config.target_modules, set):
            config.target_modules = sorted(config.target_modules)
    with atomic_directory(out) as tmp:
        # Resized embeddings (the added pad row) go with the adapter so merge rebuilds the same model.
        setup.trainer.model.save_pretrained(tmp, save_embedding_layers=setup.embeddings_resized)
        setup.tokenizer.chat_template = setup.shipped_template  # ship the serving template, not the training one
        save_tokenizer(setup.tokenizer, tmp)
        if (base_dir / "tokenizer.model").is_file():
            shutil.copyfile(base_dir / "tokenizer.model", tmp / "tokenizer.model")


def run(
    base_dir: Path,
    data_dir: Path,
    out: Path,
    metrics_path: Path,
    plots_dir: Path,
    params: Params,
    replay: Path | None = None,
    cases: Path | None = None,
) -> dict:
    train_rows, eval_rows, replayed = training_rows(data_dir, replay, params.train)
    # an empty file: prepare found no learn cases (read_cases refuses a file without any)
    wanted = cases and params.train.fit_learn is not None and params.train.cycles > 1 and cases.stat().st_size
    learn_cases = [case for case in read_cases(cases) if case.kind == "learn"] if wanted else []
    cases = cases if learn_cases else None  # asked only then: the fingerprint says so
    max_new_tokens = params.gate.max_new_tokens
    fingerprint = inputs_fingerprint(base_dir, data_dir, params.train, params.data, replay, cases, max_new_tokens)
    checkpoints = checkpoint_root() / f"train-{fingerprint[:16]}"
    setup = build_trainer(
        base_dir, train_rows, eval_rows, params.train, params.data, checkpoints, replayed=replayed,
        learn_cases=learn_cases, max_new_tokens=max_new_tokens,
    )  # fmt: skip
    trainer, keeper = setup.trainer, setup.keeper
    key = os.environ.get(RECORD_KEY_ENV) or None
    trainer.add_callback(recorder_callback(fingerprint, key))  # after the keeper's: its files are in the record
    leader = trainer.is_world_process_zero()
    choice = resumable_checkpoint(checkpoints, fingerprint, key)
    resume = choice.resume
    trainer.accelerator.wait_for_everyone()  # every process has chosen before any folder goes
    if leader:
        for folder, problem in choice.refused:
            log.warning("ignoring checkpoint %s: %s", folder, problem)
        if choice.refused and not resume:
            log.warning("no checkpoint this stage wrote for these inputs: training starts fresh")
        for folder in [*(folder for folder, _ in choice.refused), *choice.superseded]:
            shutil.rmtree(folder, ignore_errors=True)
    if resume:
        keeper.load(resume)
        if leader:
            log.info("resuming from %s (same inputs as the interrupted run)", resume.name)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if leader:
        log.info(
            "training %s LoRA parameters on %d conversations (%d replayed), %s",
            f"{trainable:,}",
            len(train_rows),
            replayed,
            budget_text(params.train, trainer.args.max_steps, setup.cycle_steps, setup.learn_check),
        )
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    runtime = time.perf_counter() - started
    if params.train.keep_best:
        keeper.restore(trainer.model)
    if not leader:
        return {}
    save_adapter(setup, base_dir, out)

    history = trainer.state.log_history
    train_curve, eval_curve = loss_curves(history)
    fits = cycles.fits_in(history)
    tokens = max((e.get("num_tokens", 0) for e in history), default=0)
    metrics = {
        "train_loss": train_curve[-1]["loss"] if train_curve else None,
        "mean_train_loss": result.training_loss,
        "first_eval_loss": eval_curve[0]["loss"] if eval_curve else None,
        "best_eval_loss": keeper.best_loss if eval_curve else None,
        "best_epoch": keeper.best_epoch,
        "epochs_run": round(trainer.state.epoch or 0, 4),
        "steps": trainer.state.global_step,
        "cycles_run": math.ceil(trainer.state.global_step / setup.cycle_steps),
        # at each cycle's end: our training answers' NLL (fit at most train.fit_nll) and, where they are fit,
        # the learn cases' score (fit at least train.fit_learn)
        "fit": [fit.as_dict() for fit in fits],
        "answer_nll": round(fits[-1].answer_nll, 4) if fits else None,
        "conversations": len(train_rows) - replayed,  # noisy copies included (train.question_noise)
        "replayed_conversations": replayed,
        "stopped_early": keeper.stopped_early,
        "shipped": "best eval loss" if params.train.keep_best else "last step",
        "resumed_from_step": step_of(resume) if resume else 0,
        "world_size": world_size(),
        "precision": precision(params.train, Device.detect()),  # machine-dependent under bf16: auto
        "trainable_parameters": trainable,
        "pad_token": setup.tokenizer.pad_token,
        "embeddings_resized": setup.embeddings_resized,
        "train_tokens": int(tokens),
        "tokens_per_second": round(tokens / runtime, 1) if runtime and not resume else None,
        "runtime_s": round(runtime, 1),
    }
    write_json_atomic(metrics_path, metrics)
    write_text_atomic(plots_dir / "train" / "loss.tsv", tsv(train_curve))
    write_text_atomic(plots_dir / "eval" / "loss.tsv", tsv(eval_curve))
    # Done: this run's checkpoints, and any left by runs with other inputs, are no longer needed.
    for stale in checkpoint_root().glob("train-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return metrics


def relaunch_distributed(argv: list[str], processes: int) -> None:
    """Run this stage again under torchrun with one process per device (DDP)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    code = subprocess.call([*command, "-m", "pipeline.train", *argv])
    if code:
        raise PipelineError(f"distributed training ({processes} processes) failed with exit status {code}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--base", type=Path, required=True, help="base model directory (stage base)")
    parser.add_argument("--data", type=Path, required=True, help="prepared train.jsonl/eval.jsonl directory")
    parser.add_argument("--out", type=Path, required=True, help="adapter output directory")
    parser.add_argument("--metrics", type=Path, required=True, help="final metrics (JSON)")
    parser.add_argument("--plots", type=Path, required=True, help="directory for train/ and eval/ loss curves")
    parser.add_argument("--replay", type=Path, help="conversations to replay (train.replay), from stage base_answers")
    parser.add_argument(
        "--cases", type=Path, help="stage prepare's learn_cases.jsonl: they decide another cycle (train.fit_learn)"
    )
    args = parser.parse_args(argv)
    params = load_params(args.params)
    check_device(params.train, Device.detect())  # before PEFT and TRL load (seconds): a CUDA-only setting stops here
    if params.train.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        relaunch_distributed(sys.argv[1:] if argv is None else argv, params.train.num_processes)
        return
    metrics = run(args.base, args.data, args.out, args.metrics, args.plots, params, args.replay, args.cases)
    if metrics:
        log.info(
            "done: %d steps, train loss %.4f, best eval loss %.4f (epoch %.0f)%s",
            metrics["steps"],
            metrics["train_loss"],
            metrics["best_eval_loss"],
            metrics["best_epoch"],
            ", stopped early" if metrics["stopped_early"] else "",
        )


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
