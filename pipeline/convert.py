"""Stage `convert`: the merged Hugging Face model -> one GGUF file that llama.cpp loads.

    python -m pipeline.convert --model models/merged --out models/gguf/model-f16.gguf \
        --metrics metrics/convert.json

Written with the PyPI `gguf` package (gguf-py), with the keys and tensor layout of llama.cpp's own
convert_hf_to_gguf.py for the architectures of pipeline.gguf_arch (Llama, Mistral, Qwen2, Qwen3,
Gemma 2, Gemma 3 text, Phi-3): hyperparameters, rope, q/k rows permuted for llama.cpp's rope where
upstream does, Gemma's norms stored as 1 + w, 1-D tensors in f32, tied embeddings (no output.weight),
the tokenizer (pipeline.gguf_vocab). Every check runs before the file is opened; tensors are then
read (memory-mapped) and written one at a time, so peak memory stays near the largest tensor, and the
file appears only once complete.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from pipeline.common import PipelineError, atomic_file, get_logger, run_cli, write_json_atomic
from pipeline.gguf_arch import ARCHITECTURES, Architecture, phi3_name_problem, unsupported_architecture
from pipeline.gguf_vocab import add_vocab_to_gguf
from pipeline.params import ConvertParams, load_params

PARAMS = ("convert",)

# convert.outtype -> (general.file_type, type of the 2-D weights)
OUTTYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
# safetensors dtype -> how its bytes are read; bf16 is widened to f32 (exact), as upstream does.
SOURCE_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": np.uint16}
# Tensors upstream drops: buffers some checkpoints save that are not weights.
SKIPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
REQUIRED_HPARAMS = (
    "num_hidden_layers", "max_position_embeddings", "hidden_size", "intermediate_size",
    "num_attention_heads", "rms_norm_eps", "vocab_size",
)  # fmt: skip
# HF rope type -> what llama.cpp needs besides rope_theta (None: nothing).
ROPE_TYPES = {"default": None, "linear": "linear", "yarn": "yarn", "llama3": "rope_freqs", "longrope": "rope_factors"}

log = get_logger("convert")


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Undo HF's rotate-half row order of q/k (llama.cpp's rope pairs adjacent rows); grouped by KV head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def load_hparams(model_dir: Path) -> dict[str, Any]:
    """config.json, with the values the architecture's transformers config fills in when absent
    (upstream reads the completed config; reading the file directly keeps torch out of this process)."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise PipelineError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    hparams = json.loads(path.read_text(encoding="utf-8"))
    architecture = ARCHITECTURES.get((hparams.get("architectures") or [None])[0])
    if hparams.get("num_key_value_heads") is None and "num_attention_heads" in hparams:
        hparams["num_key_value_heads"] = hparams["num_attention_heads"]
    completes = architecture is not None and architecture.completes_head_dim
    if completes and hparams.get("head_dim") is None and "num_attention_heads" in hparams:
        hparams["head_dim"] = hparams["hidden_size"] // hparams["num_attention_heads"]
    return hparams


@dataclass
class PendingTensor:
    """What GGUFWriter needs to lay out the file; the data is computed only when it is written."""

    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def tofile(self, fout) -> None:
        data = self.load()
        if data.shape != self.shape or data.dtype != self.dtype:
            raise AssertionError(f"tensor computed as {data.dtype}{data.shape}, planned {self.dtype}{self.shape}")
        data.tofile(fout)


def read_tensor(local: gguf.utility.LocalTensor) -> np.ndarray:
    raw = local.mmap_bytes().view(SOURCE_DTYPES[local.dtype])
    if local.dtype == "BF16":
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.reshape(local.shape)


def source_tensors(model_dir: Path) -> dict[str, gguf.utility.LocalTensor]:
    """Every tensor of the safetensors checkpoint, in upstream's order (files sorted, names sorted)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        parts = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        parts = sorted(p.name for p in model_dir.glob("model*.safetensors"))
    if not parts:
        raise PipelineError(f"{model_dir}: no safetensors weights (model*.safetensors)")
    tensors: dict[str, gguf.utility.LocalTensor] = {}
    for part in parts:
        with gguf.utility.SafetensorsLocal(model_dir / part) as found:
            tensors.update(found)
    bad = sorted({f"{name} ({t.dtype})" for name, t in tensors.items() if t.dtype not in SOURCE_DTYPES})
    if bad:
        raise PipelineError(
            f"{model_dir}: unsupported tensor dtype: {', '.join(bad[:3])} (convert reads fp16/bf16/fp32)"
        )
    return tensors


def rope_freqs(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """Llama-3.1-style rope scaling factors per frequency, exactly as upstream computes them (torch, f32)."""
    import torch

    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).numpy()


def phi3_rope_dims(hparams: dict[str, Any], rope: dict[str, Any]) -> int:
    """Phi-3's rotated dimensions per head (upstream: int(partial_rotary_factor * n_embd) // n_head)."""
    return int(rope.get("partial_rotary_factor", 1.0) * hparams["hidden_size"]) // hparams["num_attention_heads"]


def longrope_factors(hparams: dict[str, Any], rope: dict[str, Any]) -> tuple[float, np.ndarray, np.ndarray]:
    """(attention factor, long factors, short factors) of Phi-3's longrope, as upstream's Phi3MiniModel."""
    long, short = rope.get("long_factor"), rope.get("short_factor")
    half = phi3_rope_dims(hparams, rope) / 2
    if not long or not short or len(long) != half or len(short) != half:
        raise PipelineError(
            f"config.json: longrope needs long_factor and short_factor of {half:g} values each (half the rotated "
            f"dimensions), got {len(long or [])} and {len(short or [])}"
        )
    original = rope["original_max_position_embeddings"]
    scale = hparams["max_position_embeddings"] / original
    attention = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
    return attention, np.array(long, dtype=np.float32), np.array(short, dtype=np.float32)


def rope_parameters(hparams: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(rope parameters with rope_theta, what llama.cpp needs for the rope type); transformers 5
    keeps them in rope_parameters, 4.x in rope_scaling + rope_theta."""
    rope = dict(hparams.get("rope_parameters") or hparams.get("rope_scaling") or {})
    rope = dict(rope.get("full_attention", rope))  # per layer type (Gemma 3): the global layers', as upstream
    for key in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings"):  # mirrored, as upstream
        if key not in rope and hparams.get(key) is not None:
            rope[key] = hparams[key]
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise PipelineError(f"unsupported rope type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
    return rope, ROPE_TYPES[rope_type]


def tensor_type(
    gguf_name: str, shape: tuple[int, ...], weights: gguf.GGMLQuantizationType
) -> gguf.GGMLQuantizationType:
    """Upstream's rule: 1-D tensors, norms and anything not a weight stay f32; 2-D weights take the
    outtype, or f16 when a row does not fill whole quantization blocks."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[weights][0]
    if shape[-1] % block:
        log.warning(
            "%s: rows of %d do not fill %s blocks of %d, writing f16", gguf_name, shape[-1], weights.name, block
        )
        return gguf.GGMLQuantizationType.F16
    return weights


def pending(load: Callable[[], np.ndarray], shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> PendingTensor:
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        dtype = np.dtype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
        return PendingTensor(shape, dtype, lambda: gguf.quants.quantize(load(), qtype))
    # bf16 and q8_0 are written as blocks of bytes
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return PendingTensor(byte_shape, np.dtype(np.uint8), lambda: gguf.quants.quantize(load(), qtype))


def plan_tensors(
    writer: gguf.GGUFWriter, model_dir: Path, hparams: dict[str, Any], weights: gguf.GGMLQuantizationType
) -> tuple[int, Counter]:
    """Add every tensor to the writer (lazily); returns (embedding rows, count per GGUF type)."""
    architecture = ARCHITECTURES[hparams["architectures"][0]]
    n_blocks = hparams["num_hidden_layers"]
    n_head, n_kv = hparams["num_attention_heads"], hparams.get("num_key_value_heads")
    names = gguf.get_tensor_name_map(architecture.arch, n_blocks)
    types: Counter = Counter()

    def add(name: str, load: Callable[[], np.ndarray], shape: tuple[int, ...]) -> None:
        qtype = tensor_type(name, shape, weights)
        writer.add_tensor(name, pending(load, shape, qtype), raw_dtype=qtype)
        types[qtype.name] += 1

    rope, rope_extra = rope_parameters(hparams)
    if rope_extra == "rope_freqs":
        head_dim = hparams.get("head_dim") or hparams["hidden_size"] // n_head
        factors = rope_freqs(rope, head_dim)
        add(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", lambda: factors, factors.shape)
    elif rope_extra == "rope_factors" and architecture.phi3 and rope.get("long_factor"):
        # upstream writes the attention factor while it plans these tensors: before the general.* keys
        attention, long, short = longrope_factors(hparams, rope)
        writer.add_rope_scaling_attn_factors(attention)
        for tensor, factors in (
            (gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, long),
            (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, short),
        ):
            add(gguf.TENSOR_NAMES[tensor] + ".weight", lambda factors=factors: factors, factors.shape)
    elif rope_extra == "rope_factors":
        raise PipelineError(f"rope type longrope: written for Phi3ForCausalLM only, not {hparams['architectures'][0]}")

    rows = None
    for hf_name, local in source_tensors(model_dir).items():
        if hf_name.endswith(SKIPPED_SUFFIXES):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise PipelineError(f"{model_dir}: cannot map tensor {hf_name!r} to a llama.cpp tensor name")
        heads = None
        if architecture.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = (n_head, n_head)
        elif architecture.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = (n_head, n_kv)

        shift = architecture.norm_shift and hf_name.endswith("norm.weight")

        def load(local=local, heads=heads, shift=shift) -> np.ndarray:
            data = read_tensor(local)
            if shift:  # in the dtype read, as upstream (fp16 stays fp16 until written)
                data = data + data.dtype.type(1)
            return permute(data, *heads) if heads else data

        add(name, load, tuple(local.shape))
        if name == "token_embd.weight":
            rows = local.shape[0]
    if rows is None:
        raise PipelineError(f"{model_dir}: no token embeddings (model.embed_tokens.weight)")
    return rows, types


def add_hparams(
    writer: gguf.GGUFWriter, hparams: dict[str, Any], file_type: gguf.LlamaFileType, architecture: Architecture
) -> None:
    """The <arch>.* keys, in upstream's order (TextModel.set_gguf_parameters, then LlamaModel's or Gemma3Model's;
    Gemma2Model's and Phi3MiniModel's own)."""
    if architecture.gemma == 2:
        add_gemma2_hparams(writer, hparams, file_type)
        return
    if architecture.phi3:
        return add_phi3_hparams(writer, hparams, file_type)
    writer.add_block_count(hparams["num_hidden_layers"])
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_head_count(hparams["num_attention_heads"])
    if (n_kv := hparams.get("num_key_value_heads")) is not None:
        writer.add_head_count_kv(n_kv)
    rope, rope_extra = rope_parameters(hparams)
    if rope_extra == "linear" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_extra == "yarn" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        rope.setdefault("attention_factor", rope.get("attn_factor"))  # the older name
        for key, add in (
            ("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
            ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
        ):
            if rope.get(key) is not None:
                add(rope[key])
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(rope["rope_theta"])
    sliding = (hparams.get("rope_parameters") or {}).get("sliding_attention") or {}
    if (local_theta := sliding.get("rope_theta", hparams.get("rope_local_base_freq"))) is not None:
        writer.add_rope_freq_base_swa(local_theta)
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    if (head_dim := hparams.get("head_dim")) is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    if architecture.llama_keys:
        writer.add_vocab_size(hparams["vocab_size"])
        writer.add_rope_dimension_count(head_dim or hparams["hidden_size"] // hparams["num_attention_heads"])
    if architecture.gemma == 3:
        if hparams.get("attn_logit_softcapping") is not None:  # upstream asserts it away: Gemma 3 has none
            raise PipelineError("config.json: attn_logit_softcapping is set, but Gemma 3 has no attention soft-capping")
        if final := hparams.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(final)
        if hparams.get("sliding_window_pattern") != 1:
            writer.add_sliding_window(hparams["sliding_window"])


def add_attention_heads(writer: gguf.GGUFWriter, hparams: dict[str, Any]) -> None:
    """Head counts and the RMSNorm epsilon, consecutive in Gemma2Model's and Phi3MiniModel's own key orders."""
    writer.add_head_count(hparams["num_attention_heads"])
    writer.add_head_count_kv(hparams["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])


def add_gemma2_hparams(writer: gguf.GGUFWriter, hparams: dict[str, Any], file_type: gguf.LlamaFileType) -> None:
    """Gemma2Model.set_gguf_parameters: no rope base (llama.cpp's default is Gemma 2's), soft-capping, window."""
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_block_count(hparams["num_hidden_layers"])
    writer.add_feed_forward_length(hparams["intermediate_size"])
    add_attention_heads(writer, hparams)
    writer.add_key_length(hparams["head_dim"])
    writer.add_value_length(hparams["head_dim"])
    writer.add_file_type(file_type)
    writer.add_attn_logit_softcapping(hparams["attn_logit_softcapping"])
    writer.add_final_logit_softcapping(hparams["final_logit_softcapping"])
    writer.add_sliding_window(hparams["sliding_window"])


def add_phi3_hparams(writer: gguf.GGUFWriter, hparams: dict[str, Any], file_type: gguf.LlamaFileType) -> None:
    """The phi3.* keys, in upstream's order (Phi3MiniModel.set_gguf_parameters, which replaces TextModel's)."""
    rope, _ = rope_parameters(hparams)
    if rope.get("original_max_position_embeddings") is None:
        raise PipelineError("config.json: Phi-3 needs original_max_position_embeddings (upstream reads it)")
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_block_count(hparams["num_hidden_layers"])
    add_attention_heads(writer, hparams)
    writer.add_rope_dimension_count(phi3_rope_dims(hparams, rope))
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_file_type(file_type)
    writer.add_sliding_window(hparams.get("sliding_window") or 0)  # 0: none (upstream tells Phi-4 apart by it)


def check_phi3_name(model_dir: Path, name: str) -> None:
    """gguf_arch.phi3_name_problem for the saved model's tokenizer.json and the general.name it gets."""
    path = model_dir / "tokenizer.json"
    added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens", []) if path.is_file() else []
    stripping = [token["content"] for token in added if token.get("rstrip") and token.get("special")]
    if problem := phi3_name_problem(stripping, name):
        raise PipelineError(f"{model_dir}: {problem}")


def add_general(writer: gguf.GGUFWriter, model_dir: Path, model_name: str | None) -> str:
    """general.* from the model card, config and generation config (gguf.Metadata, as upstream); returns
    general.name."""
    total, shared, expert, experts = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, model_dir, model_name, total)
    generation = gguf.Metadata.load_generation_config(model_dir)
    if metadata.sampling_penalty_repeat is None and "repetition_penalty" in generation:
        metadata.sampling_penalty_repeat = generation["repetition_penalty"]  # newer upstream reads this name too
    metadata.name = metadata.name or model_dir.name
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, experts)
    writer.add_type(gguf.GGUFType.MODEL)
    metadata.set_gguf_meta_model(writer)
    return metadata.name


def convert(model_dir: Path, out: Path, params: ConvertParams) -> dict[str, Any]:
    """Write `out` (atomically); returns the report. Raises PipelineError before writing on any problem."""
    hparams = load_hparams(model_dir)
    architecture = (hparams.get("architectures") or ["(none in config.json)"])[0]
    if architecture not in ARCHITECTURES:
        raise PipelineError(unsupported_architecture(architecture))
    if missing := [key for key in REQUIRED_HPARAMS if key not in hparams]:
        raise PipelineError(f"{model_dir}/config.json: missing {', '.join(missing)}")
    file_type, weights = OUTTYPES[params.outtype]
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[ARCHITECTURES[architecture].arch])
    rows, types = plan_tensors(writer, model_dir, hparams, weights)
    if rows != hparams["vocab_size"]:
        raise PipelineError(
            f"{model_dir}: the embeddings have {rows} rows but config.vocab_size is {hparams['vocab_size']}"
        )
    name = add_general(writer, model_dir, params.model_name)
    if ARCHITECTURES[architecture].phi3:
        check_phi3_name(model_dir, name)
    add_hparams(writer, hparams, file_type, ARCHITECTURES[architecture])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # Gemma: SentencePiece without a dummy prefix, which upstream writes after the vocabulary
    space_prefix = False if ARCHITECTURES[architecture].gemma else None
    vocab = add_vocab_to_gguf(
        writer, model_dir, rows, hparams["vocab_size"], space_prefix, phi3=ARCHITECTURES[architecture].phi3
    )
    parameters = writer.get_total_parameter_count()[0]
    n_tensors = sum(len(t) for t in writer.tensors)

    with atomic_file(out) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
    return {
        "architecture": architecture,
        "outtype": params.outtype,
        "tensors": n_tensors,
        "tensor_types": dict(sorted(types.items())),
        "parameters": parameters,
        "bytes": out.stat().st_size,
        "tied_embeddings": "output.weight" not in {n for t in writer.tensors for n in t},
        "vocab": {
            "model": vocab.model,
            "pre": vocab.pre,
            "tokens": len(vocab.tokens),
            "placeholders": vocab.placeholders,
            "added": vocab.added,
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face model directory (stage merge)")
    parser.add_argument("--out", type=Path, required=True, help="GGUF file to write")
    parser.add_argument("--metrics", type=Path, required=True, help="where to write the conversion report (JSON)")
    args = parser.parse_args(argv)

    params = load_params(args.params).convert
    report = convert(args.model, args.out, params)
    write_json_atomic(args.metrics, report)
    log.info(
        "%s: %d tensors (%s), %s vocabulary of %d tokens (pre %s), %.1f MB",
        args.out,
        report["tensors"],
        ", ".join(f"{n} {t}" for t, n in report["tensor_types"].items()),
        report["vocab"]["model"],
        report["vocab"]["tokens"],
        report["vocab"]["pre"],
        report["bytes"] / 1e6,
    )


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
