"""The model architectures the pipeline carries from Hugging Face to GGUF, as one table.

Each row says what llama.cpp's convert_hf_to_gguf.py does differently for that architecture, so
that stage convert (pipeline/convert.py) needs no branch per family and stage base can refuse,
before training, an architecture that convert could not write.

- `arch`: llama.cpp's architecture (general.architecture, the tensor name map);
- `permute_qk`: Llama's q/k rows are permuted from HF's rotate-half order to llama.cpp's (LlamaModel);
  Qwen's rope reads HF's order as it is;
- `llama_keys`: LlamaModel adds vocab_size and rope.dimension_count after the common keys;
- `completes_head_dim`: the transformers config fills head_dim in when config.json lacks it (upstream
  reads the completed config, so then writes attention.key_length / value_length);
- `norm_shift`: Gemma's RMSNorm scales by `1 + w`; upstream stores `1 + w` in every `*norm.weight`
  (llama.cpp's RMSNorm scales by the weight itself). The embedding scale (sqrt(hidden)) needs nothing:
  llama.cpp's Gemma graphs apply it;
- `gemma`: the Gemma key set, after the common ones: 2 (Gemma2Model: its own key order without rope
  base, attention and final logit soft-capping, sliding window) or 3 (Gemma3Model: the sliding layers'
  rope base, the final soft-capping when set, the sliding window); 0 for the others. Gemma's
  vocabulary also sets add_space_prefix false (SentencePiece without a dummy prefix);
- `phi3`: upstream's Phi3MiniModel: its own hyperparameter keys (not TextModel's: the original context
  length, rope dimensions from partial_rotary_factor, the sliding window, 0 when unset), longrope's
  short/long factors as rope_factors_* tensors with their attention factor, and its own SentencePiece
  vocabulary (every added token of tokenizer.json overrides the piece at its id; no add_space_prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf


@dataclass(frozen=True)
class Architecture:
    arch: gguf.MODEL_ARCH
    permute_qk: bool
    llama_keys: bool
    completes_head_dim: bool
    norm_shift: bool = False
    gemma: int = 0
    phi3: bool = False


LLAMA = Architecture(gguf.MODEL_ARCH.LLAMA, permute_qk=True, llama_keys=True, completes_head_dim=True)
# Hugging Face architecture -> how it is written (upstream converts Mistral as Llama; Qwen2's q/k/v
# biases and Qwen3's q/k norms are tensors of the name map, nothing more).
ARCHITECTURES = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": Architecture(
        gguf.MODEL_ARCH.QWEN2, permute_qk=False, llama_keys=False, completes_head_dim=False
    ),
    "Qwen3ForCausalLM": Architecture(
        gguf.MODEL_ARCH.QWEN3, permute_qk=False, llama_keys=False, completes_head_dim=True
    ),
    # Gemma 3 text only (Gemma3ForConditionalGeneration's vision tower goes to a separate mmproj file upstream)
    "Gemma2ForCausalLM": Architecture(
        gguf.MODEL_ARCH.GEMMA2, permute_qk=False, llama_keys=False, completes_head_dim=True, norm_shift=True, gemma=2
    ),
    "Gemma3ForCausalLM": Architecture(
        gguf.MODEL_ARCH.GEMMA3, permute_qk=False, llama_keys=False, completes_head_dim=True, norm_shift=True, gemma=3
    ),
    # Phi-3/3.5 mini: fused qkv_proj and gate_up_proj are tensors of the name map (attn_qkv, ffn_up), as upstream
    "Phi3ForCausalLM": Architecture(
        gguf.MODEL_ARCH.PHI3, permute_qk=False, llama_keys=False, completes_head_dim=False, phi3=True
    ),
}


def unsupported_architecture(architecture: str) -> str:
    """The one line that says what convert writes and where another architecture is added."""
    return (
        f"unsupported architecture {architecture}: convert writes {', '.join(sorted(ARCHITECTURES))}; "
        f"to add one, give it a row in ARCHITECTURES (pipeline/gguf_arch.py) after what llama.cpp's "
        f"convert_hf_to_gguf.py writes for it"
    )


def phi3_name_problem(stripping: list[str], name: str | None) -> str | None:
    """llama.cpp strips whitespace after Phi-3's special tokens, as its tokenizer does (rstrip), only for a
    model whose general.name says phi3 (llama-vocab.cpp); another name would serve prompts whose tokens
    training never saw. `stripping`: the special tokens that strip; `name`: general.name (None: not set)."""
    if not stripping or (name is not None and any(word in name.lower() for word in ("phi3", "phi-3"))):
        return None
    would_be = "not set (convert.model_name is null)" if name is None else repr(name)
    return (
        f"Phi-3's tokenizer strips whitespace after {stripping[0]} and its other special tokens; llama.cpp does so "
        f"only when general.name contains 'phi3' or 'phi-3', and it would be {would_be}: set convert.model_name "
        "(params.yaml) to a name with phi3 in it"
    )
