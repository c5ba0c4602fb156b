"""Tiny random models of the families beyond Llama, built deterministically, for fast proofs.

Like pipeline.tiny, but one row of FAMILIES per architecture: its transformers config, the special
tokens and chat template its real checkpoints ship, and a tokenizer of the real kind trained on the
given texts: byte-level BPE with Qwen's pre-tokenizer (through transformers' own Qwen2Tokenizer), or
with Llama-3's (the tokenizer.json Meta's conversion writes: transformers' TikTokenConverter); or, for
Phi-3, a SentencePiece model (pipeline.tiny's) under transformers' LlamaTokenizer with Phi-3's added tokens;
for Gemma a SentencePiece BPE model with Gemma's special ids, through transformers' GemmaTokenizer.
No download: the vocabulary is learned here; the chat template is the one TRL stores for that family
(identical to the checkpoints'). Weights are random from a fixed seed, with biases and norm weights
drawn too (transformers initialises them to 0 and 1, which would hide a wrong layout).
Same texts -> byte-identical files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.chat_templates import trl_template
from pipeline.common import PipelineError
from pipeline.vocab import save_tokenizer

SEED = 1234
VOCAB_SIZE = 512  # byte-level BPE: 256 bytes, merges, then the special tokens


@dataclass(frozen=True)
class TinyFamily:
    name: str
    config: dict[str, Any]  # transformers config (architectures, model_type, sizes)
    specials: tuple[str, ...]  # added after the BPE vocabulary, in the checkpoints' order
    tokens: dict[str, str | None]  # bos / eos / pad / unk as the checkpoints' tokenizer_config.json names them
    chat_template: Callable[[], str]
    tokenizer: str  # its kind: "qwen2" | "llama3" | "phi3" | "gemma" (TOKENIZERS)
    config_bos: str  # the token config.json's bos_token_id names
    rows: int | None = None  # embedding rows when the checkpoints pad them beyond the tokenizer (Phi-3)
    # Gemma scales its (tied) input embeddings by sqrt(hidden): a random model's residual stream then echoes
    # the input token, so greedy decoding repeats it. Embeddings drawn 5x smaller and the final norm's
    # scale around 9 give varied greedy tokens and logits that spread out (about ±9).
    scaled_embeddings: bool = False


QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_TOKENS = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None}
# Llama-3.1's first special tokens (ids 128000-128010 in the checkpoints), in its order
LLAMA31_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
)  # fmt: skip
_QWEN_SIZES = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA, as every Qwen2.5/Qwen3 checkpoint
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,  # as Qwen2.5-0.5B/1.5B and Qwen3-0.6B/1.7B
    "use_sliding_window": False,
    # wide enough that logits spread out (about ±10) and greedy decoding varies: a real test of the layout
    "initializer_range": 0.1,
}

# Gemma's SentencePiece layout: <pad> <eos> <bos> <unk> first, then its user-defined pieces (the real
# vocabulary has them at 4, 106 and 107 among others); no dummy prefix (llama.cpp: add_space_prefix false).
GEMMA_SPECIALS = ("<mask>", "<start_of_turn>", "<end_of_turn>")
GEMMA_SENTENCEPIECE = {
    "pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3,
    "pad_piece": "<pad>", "eos_piece": "<eos>", "bos_piece": "<bos>", "unk_piece": "<unk>",
    "user_defined_symbols": list(GEMMA_SPECIALS), "add_dummy_prefix": False,
}  # fmt: skip
GEMMA_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
_GEMMA_SIZES = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for 27B only): the checkpoints' value
    "query_pre_attn_scalar": 32,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    # Shorter than the tests' probe (85 tokens), so that the window is part of what is compared; longer than
    # their chat through Ollama (33), whose v0.11.4 engine lets a sliding layer see one token more (its
    # kvcache/causal.go masks positions < pos - window; Gemma, HF and llama.cpp: <= pos - window).
    "sliding_window": 48,
    "tie_word_embeddings": True,
    "initializer_range": 0.1,
}


def gemma(name: str, config: dict[str, Any]) -> TinyFamily:
    """A Gemma row: Gemma's SentencePiece tokens and Gemma 3's chat template (the one family `gemma`)."""
    return TinyFamily(
        name,
        config,
        GEMMA_SPECIALS,
        GEMMA_TOKENS,
        trl_template("gemma3"),
        "gemma",
        "<bos>",
        scaled_embeddings=True,
    )


FAMILIES = {
    # Qwen2 / Qwen2.5: q/k/v biases; Qwen2.5-Instruct's ChatML with its default system message.
    "qwen2": TinyFamily(
        "qwen2",
        {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **_QWEN_SIZES},
        QWEN_SPECIALS,
        QWEN_TOKENS,
        trl_template("qwen2_5"),
        "qwen2",
        "<|endoftext|>",
    ),
    # Qwen3 dense: no biases, per-head RMSNorm of q and k, an explicit head_dim; its thinking template.
    "qwen3": TinyFamily(
        "qwen3",
        {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **_QWEN_SIZES, "head_dim": 32},
        (*QWEN_SPECIALS, "<think>", "</think>"),
        QWEN_TOKENS,
        trl_template("qwen3"),
        "qwen2",
        "<|endoftext|>",
    ),
    # Llama-3.1 (Instruct): GQA, untied output (as the 8B), the `llama3` rope scaling (a rope_freqs tensor in
    # GGUF; original_max_position_embeddings small enough that some factors fall between 1 and `factor`),
    # Meta's byte-level BPE with its first special tokens, the template with the date header.
    "llama3": TinyFamily(
        "llama3",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **_QWEN_SIZES,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
            "tie_word_embeddings": False,
        },
        LLAMA31_SPECIALS,
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": None, "unk_token": None},
        trl_template("llama3_1"),
        "llama3",
        "<|begin_of_text|>",
    ),
    # Gemma 2: every norm stored as 1 + w, attention and final logit soft-capping, sliding window on every
    # other layer; 26 layers (Gemma 2 2B's count): Ollama v0.11.4's llama.cpp knows only 26, 42 and 46 and
    # aborts on any other (llm_build_gemma2: its query scale per model type). Its checkpoints' own template
    # refuses a system message; the tiny one ships Gemma 3's, which folds it into the first user turn (our
    # data has system messages).
    "gemma2": gemma(
        "gemma2",
        {
            "architectures": ["Gemma2ForCausalLM"],
            "model_type": "gemma2",
            **_GEMMA_SIZES,
            "num_hidden_layers": 26,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
        },
    ),
    # Gemma 3 text: per-head q/k norms, five sliding-window layers (local rope base) to one global (6 layers:
    # llama.cpp's fixed pattern), no soft-capping.
    "gemma3": gemma(
        "gemma3",
        {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            **_GEMMA_SIZES,
            "num_hidden_layers": 6,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        },
    ),
}


# Phi-3's added tokens (ids 32000-32010 after its 32000 SentencePiece pieces), in its order
PHI3_SPECIALS = (
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
)  # fmt: skip
FAMILIES["phi3"] = TinyFamily(
    # Phi-3.5 mini: MHA, fused qkv_proj and gate_up_proj, untied output, longrope (short factors up to
    # original_max_position_embeddings, long beyond), a sliding window, embeddings padded to a multiple of 64
    # (32064 rows for 32011 tokens), Phi-3.5's template; pad = eos = <|endoftext|> (train adds a pad)
    "phi3",
    {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        **{k: v for k, v in _QWEN_SIZES.items() if k not in ("use_sliding_window", "rope_theta")},
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-5,
        "original_max_position_embeddings": 512,
        "rope_scaling": {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "long_factor": [1.0 + 0.25 * i for i in range(16)],
            "short_factor": [1.0 + 0.05 * i for i in range(16)],
        },
        "sliding_window": 511,
        "tie_word_embeddings": False,
    },
    PHI3_SPECIALS,
    {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"},
    trl_template("phi3_5"),
    "phi3",
    "<s>",
    rows=576,
)


def family(name: str) -> TinyFamily:
    if name not in FAMILIES:
        raise PipelineError(f"no tiny model of family {name!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def train_byte_level_bpe(
    texts: list[str], size: int, split: str, nfc: bool
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE learned from `texts`, pre-tokenized by the regex `split` (isolated),
    after NFC normalisation where the family's tokenizer has it."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    if not any(text.strip() for text in texts):
        raise PipelineError("tiny: no text to train its tokenizer on (the training data is empty)")
    tokenizer = Tokenizer(models.BPE())
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


def qwen2_tokenizer(spec: TinyFamily, texts: list[str], out: Path):
    """transformers' own Qwen2Tokenizer on a vocabulary learned with its pre-tokenizer."""
    from tokenizers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    vocab, merges = train_byte_level_bpe(texts, VOCAB_SIZE - len(spec.specials), PRETOKENIZE_REGEX, nfc=True)
    # the special tokens first, in the checkpoints' order (the class would add eos and pad before the rest)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, **dict.fromkeys(spec.tokens))
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in spec.specials])
    return tokenizer


def llama3_tokenizer(spec: TinyFamily, texts: list[str], out: Path):
    """Llama-3's tokenizer.json as Meta's conversion writes it (transformers' TikTokenConverter: its regex,
    ByteLevel without prefix space, merges ignored for a word in the vocabulary), BOS added by the post-processor."""
    from tokenizers import AddedToken, Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Learned(TikTokenConverter):
        def tokenizer(self):
            vocab, merges = train_byte_level_bpe(texts, VOCAB_SIZE - len(spec.specials), self.pattern, nfc=False)
            return Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))

    backend = Learned().converted()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.specials])
    bos = spec.tokens["bos_token"]
    bos_id = backend.token_to_id(bos)
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **dict.fromkeys(spec.tokens))


def phi3_tokenizer(spec: TinyFamily, texts: list[str], out: Path):
    """pipeline.tiny's SentencePiece model (written to `out`, which convert reads) under transformers'
    LlamaTokenizer as Phi-3's tokenizer_config.json names it (no BOS or EOS added), its added tokens after the
    pieces. legacy: a "▁" after special tokens, as llama.cpp's SentencePiece tokenizer and Phi-3's own
    tokenizer.json (a Prepend normalizer) write it."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from pipeline.tiny import train_sentencepiece

    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False, "legacy": True}
    (out / "tokenizer.model").write_bytes(train_sentencepiece(texts))
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(out)
    # Phi-3's tokenizer.json strips the whitespace after each added token but <|endoftext|> (llama.cpp's
    # llama-vocab.cpp mirrors that for a model it knows by name as Phi-3)
    added = [AddedToken(t, special=True, normalized=False, rstrip=t != "<|endoftext|>") for t in spec.specials]
    tokenizer.add_tokens(added)
    return tokenizer


def gemma_tokenizer(spec: TinyFamily, texts: list[str], out: Path):
    """tokenizer.model learned from `texts` with Gemma's layout (written to `out`, which convert reads),
    loaded by transformers' GemmaTokenizer, its turn tokens special."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from pipeline.tiny import train_sentencepiece

    (out / "tokenizer.model").write_bytes(train_sentencepiece(texts, **GEMMA_SENTENCEPIECE))
    config = {"tokenizer_class": "GemmaTokenizer", **spec.tokens, "add_bos_token": True, "add_eos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(out)
    # special, as the checkpoints' tokenizer.json has them (the conversion from tokenizer.model does not say)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in spec.specials], special_tokens=True)
    tokenizer.init_kwargs.pop("vocab_file", None)  # the path it was read from, not part of the tokenizer
    return tokenizer


# tokenizer kind -> (family, texts, directory for files besides the HF ones) -> the HF tokenizer, special tokens
# added, before the family's tokens are set
TOKENIZERS: dict[str, Callable[[TinyFamily, list[str], Path], Any]] = {
    "qwen2": qwen2_tokenizer,
    "llama3": llama3_tokenizer,
    "phi3": phi3_tokenizer,
    "gemma": gemma_tokenizer,
}


def build_tokenizer(name: str, texts: list[str], out: Path):
    """Write the family's tokenizer files into `out` and return the loaded HF tokenizer."""
    from transformers import AutoTokenizer

    spec = family(name)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = TOKENIZERS[spec.tokenizer](spec, texts, out)
    for key, value in spec.tokens.items():
        setattr(tokenizer, key, value)
    tokenizer.chat_template = spec.chat_template()
    tokenizer.model_max_length = spec.config["max_position_embeddings"]
    save_tokenizer(tokenizer, out)  # as every stage saves one (a SentencePiece tokenizer keeps its legacy flag)
    return AutoTokenizer.from_pretrained(out)


def build_model(name: str, tokenizer):
    """Random weights of the family's architecture, from SEED; biases and norms drawn as well, around
    transformers' own initial values (norm weights 1, or 0 where the norm scales by 1 + w: Gemma)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = family(name)
    config = AutoConfig.for_model(
        spec.config["model_type"],
        **{k: v for k, v in spec.config.items() if k != "model_type"},
        vocab_size=spec.rows or len(tokenizer),
        bos_token_id=tokenizer.convert_tokens_to_ids(spec.config_bos),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                noise = torch.randn(parameter.shape, generator=generator) * 0.1
                parameter.add_(noise)
        if spec.scaled_embeddings:
            model.model.embed_tokens.weight.mul_(0.2)
            model.model.norm.weight.add_(8.0)
    return model
