"""Stage `quantize`: the converted GGUF -> one quantized GGUF, with llama.cpp's own quantizer.

    python -m pipeline.quantize --type q4_k_m --model models/gguf/model-f16.gguf \
        --out models/gguf/model-q4_k_m.gguf --metrics metrics/quantize/q4_k_m.json

dvc.yaml runs it once per entry of `quantize.types` (a matrix stage), so each type is its own
cached output. llama.cpp (through llama-cpp-python's `llama_model_quantize`) picks the per-tensor
types of the k-quant mixes; where a row length is not a multiple of the block size (SmolLM2's
width 576 is not a multiple of 256) it falls back to another type, and the report lists which.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import typing
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.common import PipelineError, atomic_file, get_logger, run_cli, write_json_atomic
from pipeline.llama_runtime import llama_log
from pipeline.params import QuantizeParams, QuantType, load_params

PARAMS = ("quantize.pure",)
TYPES: tuple[str, ...] = typing.get_args(QuantType)
# llama.cpp's log line for a tensor it cannot quantize as planned (src/llama-quant.cpp, tensor_type_fallback)
FALLBACK = re.compile(
    r"warning: (?P<tensor>\S+)\s+- ncols\s+(?P<cols>\d+) not divisible by\s+(?P<block>\d+) "
    r"\(required for type\s+(?P<wanted>\S+)\) (?:\(WARNING[^)]*\) )?-> falling back to\s+(?P<got>\S+)"
)

log = get_logger("quantize")


def check_type(name: str) -> str:
    if name not in TYPES:
        raise PipelineError(f"unknown quantization type {name!r} (valid: {', '.join(TYPES)})")
    return name


def fallbacks(log_text: str) -> list[dict[str, Any]]:
    return [
        {"tensor": m["tensor"], "cols": int(m["cols"]), "wanted": m["wanted"], "got": m["got"]}
        for m in FALLBACK.finditer(log_text)
    ]


def tensor_types(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    return dict(sorted(Counter(t.tensor_type.name for t in GGUFReader(path).tensors).items()))


def quantize(source: Path, out: Path, qtype: str, params: QuantizeParams) -> dict[str, Any]:
    """Write `out` (atomically) as `qtype`; returns the report."""
    import llama_cpp

    check_type(qtype)
    if not source.is_file():
        raise PipelineError(f"{source}: no such GGUF file (stage convert writes it)")
    quantize_params = llama_cpp.llama_model_quantize_default_params()
    quantize_params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    quantize_params.nthread = 0  # all cores; the result does not depend on it
    quantize_params.pure = params.pure
    llama_cpp.llama_backend_init()
    with atomic_file(out) as tmp, llama_log() as lines:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(quantize_params))
        if status != 0:
            detail = " ".join("".join(lines).split())[-500:]
            raise PipelineError(f"llama.cpp could not quantize {source} to {qtype}: {detail}")
    fell_back = fallbacks("".join(lines))
    size, f16_size = out.stat().st_size, source.stat().st_size
    return {
        "type": qtype,
        "pure": params.pure,
        "bytes": size,
        "fraction_of_source": round(size / f16_size, 4),
        "tensor_types": tensor_types(out),
        "fallbacks": dict(sorted(Counter(f"{f['wanted']}->{f['got']}" for f in fell_back).items())),
        # per tensor kind: blk.*.attn_q.weight rather than 30 names
        "fallback_tensors": dict(Counter(re.sub(r"\.\d+\.", ".*.", f["tensor"]) for f in fell_back)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.quantize", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--type", required=True, help=f"quantization type, one of: {', '.join(TYPES)}")
    parser.add_argument("--model", type=Path, required=True, help="GGUF to quantize (stage convert)")
    parser.add_argument("--out", type=Path, required=True, help="quantized GGUF to write")
    parser.add_argument("--metrics", type=Path, required=True, help="where to write the report (JSON)")
    args = parser.parse_args(argv)

    params = load_params(args.params).quantize
    report = quantize(args.model, args.out, check_type(args.type), params)
    write_json_atomic(args.metrics, report)
    log.info(
        "%s: %.1f MB (%.0f%% of %s), tensors %s; fallbacks %s",
        args.out,
        report["bytes"] / 1e6,
        100 * report["fraction_of_source"],
        args.model.name,
        report["tensor_types"],
        report["fallbacks"] or "none",
    )


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
