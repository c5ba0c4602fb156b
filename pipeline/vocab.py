"""Pad token and vocabulary size: the checks that keep tokenizer, embeddings and config in step."""

from __future__ import annotations

from pipeline.common import PipelineError


def resize_embeddings(model, size: int) -> None:
    """Resize input (and untied output) embeddings to `size` rows; new rows = mean of the old ones.

    Deterministic by construction (transformers' default samples new rows at random), so the same
    resize always rebuilds the same model.
    """
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(size, mean_resizing=False)
    if size <= old:
        return
    with torch.no_grad():
        for embedding in {
            id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e
        }.values():
            embedding.weight[old:] = embedding.weight[:old].mean(dim=0)


def ensure_pad_token(tokenizer, model, pad_token: str) -> bool:
    """Give the tokenizer a pad token distinct from eos (a pad equal to eos hides real eos tokens
    from pad-masking collators and from generate()). Returns True when embeddings were resized."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        resized = False
    elif pad_token in tokenizer.get_vocab():
        if tokenizer.convert_tokens_to_ids(pad_token) == tokenizer.eos_token_id:
            raise PipelineError(f"train.pad_token: {pad_token!r} is the eos token; choose another")
        tokenizer.pad_token = pad_token
        resized = False
    else:
        tokenizer.add_special_tokens({"pad_token": pad_token})
        resize_embeddings(model, len(tokenizer))
        resized = True
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return resized


def check_vocab_consistency(model, tokenizer, where: str) -> int:
    """config.vocab_size, embedding rows and tokenizer length must agree (else llama.cpp refuses the
    GGUF: "token_embd.weight has wrong shape"). Returns the common size."""
    sizes = {
        "config.vocab_size": model.config.vocab_size,
        "input embedding rows": model.get_input_embeddings().weight.shape[0],
        "len(tokenizer)": len(tokenizer),
    }
    output = model.get_output_embeddings()
    if output is not None:
        sizes["output embedding rows"] = output.weight.shape[0]
    if len(set(sizes.values())) != 1:
        detail = ", ".join(f"{name} = {size}" for name, size in sizes.items())
        raise PipelineError(f"{where}: vocabulary sizes disagree: {detail}")
    return len(tokenizer)


# Keys transformers (5.x, PreTrainedTokenizerBase._from_pretrained) copies from how the tokenizer was
# *loaded* into what save_pretrained writes: local_files_only is true under HF_HUB_OFFLINE=1, is_local
# says whether it came from a directory. They change nothing in tokenization, only make the saved
# directory (and its DVC hash) depend on the machine's environment.
LOAD_TIME_KEYS = ("local_files_only", "is_local")


def save_tokenizer(tokenizer, out) -> None:
    """save_pretrained, then tokenizer_config.json made independent of the loading environment (no
    LOAD_TIME_KEYS) and keeping a SentencePiece tokenizer's `legacy` flag: transformers does not write
    it, and a reload without it tokenizes text after special tokens differently (no "▁" after `</s>`)
    from the tokenizer that trained the model and from llama.cpp."""
    import json
    from pathlib import Path

    tokenizer.save_pretrained(out)
    config_path = Path(out) / "tokenizer_config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    fixed = {key: value for key, value in config.items() if key not in LOAD_TIME_KEYS}
    legacy = getattr(tokenizer, "legacy", None)
    if legacy is not None:
        fixed["legacy"] = legacy
    if fixed != config:  # written as transformers writes it
        text = json.dumps(fixed, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        config_path.write_text(text, encoding="utf-8")
