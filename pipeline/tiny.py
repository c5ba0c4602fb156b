"""`tiny`: a small Llama the project builds itself, deterministically, for fast tests.

SentencePiece BPE tokenizer (byte fallback) trained on the dataset's text, the Llama-2 `[INST]`
chat template, no pad token (so training exercises the add-`<pad>`-and-resize path), random
weights from a fixed seed. Same corpus -> byte-identical files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from pipeline.chat_templates import LLAMA2_CHAT_TEMPLATE

VOCAB_SIZE = 512
SEED = 1234
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA, like SmolLM2 and Llama-3
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}


def train_sentencepiece(texts: list[str], **options) -> bytes:
    """A BPE SentencePiece model trained on `texts`; single-threaded so the result is reproducible.
    `options` replace trainer settings (another family's special ids, its dummy prefix)."""
    import sentencepiece as spm

    from pipeline.common import PipelineError

    if not any(text.strip() for text in texts):
        raise PipelineError("tiny: no text to train its tokenizer on (the training data is empty)")
    model = io.BytesIO()
    settings = dict(
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",  # keep code byte-exact: no NFKC, no whitespace folding
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, **(settings | options))
    return model.getvalue()


def build_tokenizer(texts: list[str], out: Path):
    """Write tokenizer.model + tokenizer_config.json to `out` and return the loaded HF tokenizer."""
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(train_sentencepiece(texts))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": True,  # explicit: llama.cpp's SPM default, so both tokenize alike
        # legacy: a "▁" after special tokens, as llama.cpp's SentencePiece tokenizer writes it: the
        # prompt Ollama serves then has the token ids training saw (the modelfile stage checks this)
        "legacy": True,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": CONFIG["max_position_embeddings"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **CONFIG,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).eval()
