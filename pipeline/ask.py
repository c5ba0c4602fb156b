"""Ask a model (an HF directory such as models/base or models/merged) questions, greedily.

    python -m pipeline.ask --model models/merged "Write a Hello Chris program in Psion OPL."
    python -m pipeline.ask --model models/base --cases data/gate_cases.jsonl

Not a stage: a quick look at what a model answers, through its own chat template.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cases import load_cases
from pipeline.common import PipelineError, run_cli


def answer(model, tokenizer, messages: list[dict], max_new_tokens: int = 128) -> str:
    import torch

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.ask", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face model directory")
    parser.add_argument("--cases", type=Path, help="ask every prompt of a gate cases file")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="default: %(default)s")
    parser.add_argument("prompts", nargs="*", help="questions to ask")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    conversations = [[{"role": "user", "content": prompt}] for prompt in args.prompts]
    if args.cases:
        errors: list[str] = []
        conversations += [case.messages() for case in load_cases(args.cases, errors)]
        if errors:
            raise PipelineError("\n".join(errors))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, use_safetensors=True).eval()
    for messages in conversations:
        print(f"### {messages[-1]['content']}\n{answer(model, tokenizer, messages, args.max_new_tokens)}\n", flush=True)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
