"""Stage `merge`: fold the LoRA adapter into the base weights and save a plain model.

    python -m pipeline.merge --base models/base --adapter models/adapter \
        --probe data/prepared/eval.jsonl --out models/merged --metrics metrics/merge.json

The base is reloaded in fp32 (never merged into 4-bit weights), the merge is checked on a probe
batch against the adapter model, and the model is saved in `merge.dtype` only if the logits of
the saved weights still match within `merge.atol`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pipeline.common import PipelineError, atomic_directory, get_logger, read_jsonl, run_cli, write_json_atomic
from pipeline.params import MergeParams, load_params
from pipeline.vocab import check_vocab_consistency, resize_embeddings, save_tokenizer

PARAMS = ("merge",)
PROBE_SIZE = 8

log = get_logger("merge")


def probe_batch(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    """Token ids of whole conversations (prompts and answers) through the serving chat template."""
    return [
        tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        for messages in conversations[:PROBE_SIZE]
    ]


def logits(model, batch: list[list[int]]) -> list:
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in batch]


def compare(reference: list, candidate: list) -> tuple[float, float]:
    """(max |logit difference|, share of positions with the same top-1 token)."""
    worst, same, total = 0.0, 0, 0
    for ref, got in zip(reference, candidate, strict=True):
        worst = max(worst, (ref - got).abs().max().item())
        same += (ref.argmax(-1) == got.argmax(-1)).sum().item()
        total += ref.shape[0]
    return worst, same / total


def merge(base_dir: Path, adapter_dir: Path, conversations: list[list[dict]], params: MergeParams):
    """(merged model in params.dtype, tokenizer, report); raises PipelineError when a check fails."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True)
    if base.get_input_embeddings().weight.shape[0] != len(tokenizer):
        resize_embeddings(base, len(tokenizer))  # rows then overwritten by those saved with the adapter
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    batch = probe_batch(tokenizer, conversations)
    reference = logits(model, batch)

    merged = model.merge_and_unload(safe_merge=True).eval()
    merge_diff, _ = compare(reference, logits(merged, batch))
    if merge_diff > params.merge_atol:
        raise PipelineError(
            f"merged model differs from the adapter model: max |Δlogit| {merge_diff:.2e} > merge.merge_atol"
        )

    # Round the weights to the saved dtype, then measure what the saved model will compute.
    dtype = getattr(torch, params.dtype)
    merged.to(dtype).to(torch.float32)
    saved_diff, top1 = compare(reference, logits(merged, batch))
    if saved_diff > params.atol or top1 < params.min_top1_agreement:
        raise PipelineError(
            f"merged model saved as {params.dtype} differs from the adapter model: max |Δlogit| {saved_diff:.4f} "
            f"(merge.atol {params.atol}), top-1 agreement {top1:.4f} (merge.min_top1_agreement "
            f"{params.min_top1_agreement})"
        )
    merged.to(dtype)
    vocab_size = check_vocab_consistency(merged, tokenizer, "merged model")
    merged.config.pad_token_id = tokenizer.pad_token_id
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    report = {
        "dtype": params.dtype,
        "vocab_size": vocab_size,
        "probe_sequences": len(batch),
        "probe_tokens": sum(len(ids) for ids in batch),
        "merge_max_abs_logit_diff": merge_diff,
        "saved_max_abs_logit_diff": saved_diff,
        "saved_top1_agreement": top1,
    }
    return merged, tokenizer, report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.merge", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--base", type=Path, required=True, help="base model directory (stage base)")
    parser.add_argument("--adapter", type=Path, required=True, help="adapter directory (stage train)")
    parser.add_argument("--probe", type=Path, required=True, help="conversations for the logit check (JSON Lines)")
    parser.add_argument("--out", type=Path, required=True, help="merged model output directory")
    parser.add_argument("--metrics", type=Path, required=True, help="where to write the merge report (JSON)")
    args = parser.parse_args(argv)

    params = load_params(args.params).merge
    conversations = [row["messages"] for row in read_jsonl(args.probe)]
    merged, tokenizer, report = merge(args.base, args.adapter, conversations, params)
    with atomic_directory(args.out) as tmp:
        merged.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        if (args.adapter / "tokenizer.model").is_file():
            shutil.copyfile(args.adapter / "tokenizer.model", tmp / "tokenizer.model")
    write_json_atomic(args.metrics, report)
    log.info(
        "merged: max |Δlogit| %.2e (fp32 merge), %.4f as %s, top-1 agreement %.4f",
        report["merge_max_abs_logit_diff"],
        report["saved_max_abs_logit_diff"],
        params.dtype,
        report["saved_top1_agreement"],
    )


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
