"""Stage `train`: LoRA (or QLoRA on CUDA) fine-tuning with TRL's SFTTrainer.

    python -m pipeline.train --base models/base --data data/prepared --out models/adapter \
        --metrics metrics/train.json --plots plots

Loss on assistant tokens only (every assistant turn), through the model's own chat template;
eval loss each epoch; early stopping keeps the best epoch's adapter.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.chat_templates import check_parity, training_template
from pipeline.common import (
    PipelineError,
    atomic_directory,
    get_logger,
    read_jsonl,
    run_cli,
    seed_everything,
    write_json_atomic,
    write_text_atomic,
)
from pipeline.params import DataParams, TrainParams, load_params
from pipeline.vocab import check_vocab_consistency, ensure_pad_token

PARAMS = ("train", "data.max_seq_length")

log = get_logger("train")


@dataclass
class Device:
    cuda: bool
    bf16: bool  # bf16 is fast here: a CUDA GPU with bf16, or a CPU with AMX / AVX512-BF16

    @classmethod
    def detect(cls) -> Device:
        import torch

        if torch.cuda.is_available():
            return cls(cuda=True, bf16=torch.cuda.is_bf16_supported())
        return cls(cuda=False, bf16=torch.ops.mkldnn._is_mkldnn_bf16_supported())


def use_bf16(train: TrainParams, device: Device) -> bool:
    return device.bf16 if train.bf16 == "auto" else train.bf16


def check_device(train: TrainParams, device: Device) -> None:
    """Fail before loading anything when the params ask for what this machine lacks."""
    if train.qlora and not device.cuda:
        raise PipelineError(
            "train.qlora: true needs a CUDA GPU (bitsandbytes 4-bit) and none was found; "
            "set train.qlora: false to train plain LoRA here"
        )


def load_model(model_dir: Path, train: TrainParams, device: Device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Weights stay fp32 on CPU (bf16 there is autocast only); bf16 weights on a bf16-capable GPU.
    kwargs: dict = {"dtype": torch.bfloat16 if device.cuda and device.bf16 else torch.float32, "use_safetensors": True}
    if train.qlora:
        from accelerate import PartialState
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if device.bf16 else torch.float16,
        )
        kwargs["device_map"] = {"": PartialState().local_process_index}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if train.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=_checkpointing(train, device))
    return model, tokenizer


def _checkpointing(train: TrainParams, device: Device) -> bool:
    return device.cuda if train.gradient_checkpointing == "auto" else train.gradient_checkpointing


@dataclass
class KeepBestAdapter:
    """Snapshot the trainable (LoRA) weights at the best eval loss; stop after `patience` worse evals."""

    patience: int
    best_loss: float = math.inf
    best_epoch: float = 0.0
    worse_evals: int = 0
    stopped_early: bool = False
    snapshot: dict = field(default_factory=dict)

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

        return _Callback()

    def restore(self, model) -> None:
        import torch

        if not self.snapshot:
            return
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in self.snapshot:
                    parameter.copy_(self.snapshot[name])


def build_trainer(
    model_dir: Path,
    train_rows: list[dict],
    eval_rows: list[dict],
    train: TrainParams,
    data: DataParams,
    output_dir: Path,
    device: Device | None = None,
):
    """(trainer, tokenizer, shipped chat template, embeddings resized?, keeper): everything but .train()."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    device = device or Device.detect()
    check_device(train, device)
    seed_everything(train.seed)
    model, tokenizer = load_model(model_dir, train, device)
    resized = ensure_pad_token(tokenizer, model, train.pad_token)
    check_vocab_consistency(model, tokenizer, f"{model_dir} after adding the pad token")

    shipped = tokenizer.chat_template
    training = training_template(tokenizer)
    check_parity(tokenizer, training, [row["messages"] for row in train_rows + eval_rows])
    tokenizer.chat_template = training

    checkpointing = _checkpointing(train, device)
    config = SFTConfig(
        output_dir=str(output_dir),
        assistant_only_loss=True,
        # prepare has already rejected (or dropped) longer conversations; padding-free needs no truncation
        max_length=None if train.padding_free else data.max_seq_length,
        padding_free=train.padding_free,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.learning_rate,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        lr_scheduler_type=train.scheduler,
        warmup_steps=train.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        eval_strategy="epoch",
        save_strategy="no",  # the best adapter is kept in memory by KeepBestAdapter
        logging_strategy="steps",
        logging_steps=train.logging_steps,
        report_to="none",
        seed=train.seed,
        data_seed=train.seed,
        use_cpu=not device.cuda,
        bf16=use_bf16(train, device),
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
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
    trainer = SFTTrainer(
        model=model,
        args=config,
        processing_class=tokenizer,
        peft_config=lora,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows),
        callbacks=[keeper.callback()],
    )
    return trainer, tokenizer, shipped, resized, keeper


def loss_curves(log_history: list[dict]) -> tuple[list[dict], list[dict]]:
    train = [{"step": e["step"], "epoch": round(e["epoch"], 4), "loss": e["loss"]} for e in log_history if "loss" in e]
    evals = [
        {"step": e["step"], "epoch": round(e["epoch"], 4), "loss": e["eval_loss"]}
        for e in log_history
        if "eval_loss" in e
    ]
    return train, evals


def tsv(rows: list[dict]) -> str:
    header = "step\tepoch\tloss\n"
    return header + "".join(f"{r['step']}\t{r['epoch']}\t{r['loss']:.6f}\n" for r in rows)


def run(base_dir: Path, data_dir: Path, out: Path, metrics_path: Path, plots_dir: Path, params_path: str) -> dict:
    params = load_params(params_path)
    train_rows, eval_rows = read_jsonl(data_dir / "train.jsonl"), read_jsonl(data_dir / "eval.jsonl")
    with tempfile.TemporaryDirectory() as scratch:
        trainer, tokenizer, shipped, resized, keeper = build_trainer(
            base_dir, train_rows, eval_rows, params.train, params.data, Path(scratch)
        )
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        log.info("training %s LoRA parameters on %d conversations", f"{trainable:,}", len(train_rows))
        started = time.perf_counter()
        result = trainer.train()
        runtime = time.perf_counter() - started
        keeper.restore(trainer.model)

        with atomic_directory(out) as tmp:
            # Resized embeddings (the added pad row) go with the adapter so merge rebuilds the same model.
            trainer.model.save_pretrained(tmp, save_embedding_layers=resized)
            tokenizer.chat_template = shipped  # ship the serving template, not the training variant
            tokenizer.save_pretrained(tmp)
            if (base_dir / "tokenizer.model").is_file():
                shutil.copyfile(base_dir / "tokenizer.model", tmp / "tokenizer.model")

    history = trainer.state.log_history
    train_curve, eval_curve = loss_curves(history)
    tokens = max((e.get("num_tokens", 0) for e in history), default=0)
    metrics = {
        "train_loss": train_curve[-1]["loss"] if train_curve else None,
        "mean_train_loss": result.training_loss,
        "first_eval_loss": eval_curve[0]["loss"] if eval_curve else None,
        "best_eval_loss": keeper.best_loss if eval_curve else None,
        "best_epoch": keeper.best_epoch,
        "epochs_run": round(trainer.state.epoch or 0, 4),
        "steps": trainer.state.global_step,
        "stopped_early": keeper.stopped_early,
        "trainable_parameters": trainable,
        "pad_token": tokenizer.pad_token,
        "embeddings_resized": resized,
        "train_tokens": int(tokens),
        "tokens_per_second": round(tokens / runtime, 1) if runtime else None,
        "runtime_s": round(runtime, 1),
    }
    write_json_atomic(metrics_path, metrics)
    write_text_atomic(plots_dir / "train" / "loss.tsv", tsv(train_curve))
    write_text_atomic(plots_dir / "eval" / "loss.tsv", tsv(eval_curve))
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--base", type=Path, required=True, help="base model directory (stage base)")
    parser.add_argument("--data", type=Path, required=True, help="prepared train.jsonl/eval.jsonl directory")
    parser.add_argument("--out", type=Path, required=True, help="adapter output directory")
    parser.add_argument("--metrics", type=Path, required=True, help="final metrics (JSON)")
    parser.add_argument("--plots", type=Path, required=True, help="directory for train/ and eval/ loss curves")
    args = parser.parse_args(argv)
    metrics = run(args.base, args.data, args.out, args.metrics, args.plots, args.params)
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
