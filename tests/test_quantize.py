"""Stage quantize: llama.cpp's quantizer writes every type we accept, the files run, fallbacks are reported."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT, Run, run_stage
from tests.test_convert import greedy, hf_greedy, hf_model, llama, llama_logits, probe_ids, read_gguf

DEFAULT_TYPES = yaml.safe_load((ROOT / "params.yaml").read_text())["quantize"]["types"]


def quantize_run(source: Run, qtype: str, pure: bool = False) -> Run:
    out = source.out.parent / f"model-{qtype}{'-pure' if pure else ''}.gguf"
    params = f"quantize:\n  pure: {str(pure).lower()}\n"
    return run_stage("pipeline.quantize", params, out, "--type", qtype, "--model", str(source.out))


@pytest.fixture(scope="module")
def smollm2_quantized(smollm2_gguf) -> dict[str, Run]:
    """The default types of params.yaml, quantized from SmolLM2's f16 GGUF as the stage does."""
    return {qtype: quantize_run(smollm2_gguf, qtype) for qtype in DEFAULT_TYPES}


def test_the_defaults_are_q8_0_and_q4_k_m():
    assert DEFAULT_TYPES == ["q8_0", "q4_k_m"]


@pytest.fixture(scope="module")
def smollm2_probe(smollm2_base, smollm2_gguf) -> tuple[list[int], np.ndarray]:
    """(probe ids, the f16 GGUF's logits on them in llama.cpp)."""
    ids = probe_ids(smollm2_base)
    with llama(smollm2_gguf.out) as cpp:
        return ids, llama_logits(cpp, ids)


# Share of probe positions whose top-1 token stays the f16 GGUF's (measured: 0.935 and 0.857;
# SmolLM2-135M is small, and its weights come from a Q4_1 GGUF).
MIN_TOP1 = {"q8_0": 0.9, "q4_k_m": 0.8}


@pytest.mark.parametrize("qtype", DEFAULT_TYPES)
def test_smollm2_quantized_runs_and_stays_close_to_the_f16_model(qtype, smollm2_quantized, smollm2_gguf, smollm2_probe):
    run = smollm2_quantized[qtype]
    assert run.report["bytes"] < 0.55 * smollm2_gguf.report["bytes"]
    ids, f16 = smollm2_probe
    with llama(run.out) as cpp:
        top1 = float((llama_logits(cpp, ids).argmax(-1) == f16.argmax(-1)).mean())
        completion = cpp("The capital of France is", max_tokens=3, temperature=0)["choices"][0]["text"]
    print(f"smollm2 {qtype}: {run.wall_s:.1f} s, peak {run.peak_rss_mib:.0f} MiB, top-1 vs f16 {top1:.3f}")
    assert top1 >= MIN_TOP1[qtype]
    assert completion.startswith(" Paris")


def test_q4_k_m_reports_the_fallbacks_llama_cpp_picks_for_smollm2s_576_wide_rows(smollm2_quantized):
    report = smollm2_quantized["q4_k_m"].report
    # 576 = 2.25 x 256: every tensor whose rows are 576 wide cannot hold 256-element k-quant blocks
    assert report["fallbacks"] == {"q4_K->q5_0": 166, "q6_K->q8_0": 14}
    assert report["fallback_tensors"] == {
        f"blk.*.{name}.weight": 30 for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")
    }
    # ffn_down (rows of 1536 = 6 x 256) keeps the k-quant mix; token_embd goes to q8_0
    assert report["tensor_types"] == {"F32": 61, "Q4_K": 16, "Q5_0": 166, "Q6_K": 14, "Q8_0": 15}
    keys, tensors = read_gguf(smollm2_quantized["q4_k_m"].out)
    assert keys["general.file_type"] == 15 and tensors["token_embd.weight"][0] == "Q8_0"
    assert smollm2_quantized["q8_0"].report["fallbacks"] == {}


ACCEPTED = {"q4_0": "Q4_0", "q5_k_m": "Q5_K", "q6_k": "Q6_K", "q4_k_m": "Q4_K", "q8_0": "Q8_0", "q3_k_m": "Q3_K"}


@pytest.mark.parametrize("qtype", ACCEPTED)
def test_tiny_quantizes_to_each_accepted_type_and_generates(qtype, tiny_gguf, tiny_merged):
    run = quantize_run(tiny_gguf, qtype)
    assert run.report["fallbacks"] == {}  # tiny's widths (256, 512) are multiples of 256
    assert ACCEPTED[qtype] in run.report["tensor_types"] and run.report["tensor_types"]["F32"] == 5
    ids = probe_ids(tiny_merged)[:12]
    with llama(run.out) as cpp:
        got = greedy(cpp, ids, 6)
    assert len(got) == 6 and all(0 <= t < 513 for t in got)


def test_pure_quantizes_every_weight_to_the_named_type(tiny_gguf, tiny_merged):
    run = quantize_run(tiny_gguf, "q8_0", pure=True)
    assert run.report["tensor_types"] == {"F32": 5, "Q8_0": 16} and run.report["pure"] is True
    ids = probe_ids(tiny_merged)[:12]
    with llama(run.out) as cpp:  # q8_0 of a random tiny model still picks HF's greedy tokens
        assert greedy(cpp, ids, 4) == hf_greedy(hf_model(tiny_merged), ids, 4)


QUANTIZE_CLI = (sys.executable, "-m", "pipeline.quantize", "--params", "params.yaml", "--metrics", "unused.json")


def test_an_unknown_type_is_one_clear_error_listing_the_valid_ones(tiny_gguf, tmp_path):
    result = subprocess.run(
        [*QUANTIZE_CLI, "--type", "q4_k_xl", "--model", str(tiny_gguf.out), "--out", str(tmp_path / "m.gguf")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: unknown quantization type 'q4_k_xl' (valid: q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k_s, q3_k_m, "
        "q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k, iq4_nl, iq4_xs)"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_file_llama_cpp_cannot_read_is_one_clear_error_and_writes_nothing(tmp_path):
    from pipeline.common import PipelineError
    from pipeline.params import QuantizeParams
    from pipeline.quantize import quantize

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(PipelineError, match=r"llama\.cpp could not quantize .*broken\.gguf to q4_k_m: "):
        quantize(broken, tmp_path / "out.gguf", "q4_k_m", QuantizeParams())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]


def test_dvc_runs_quantize_once_per_type_with_its_own_outputs():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["quantize"]
    assert stage["matrix"] == {"type": "${quantize.types}"}
    assert "--type ${item.type}" in stage["cmd"]
    assert stage["outs"] == ["models/gguf/model-${item.type}.gguf"]
    assert stage["metrics"] == ["metrics/quantize/${item.type}.json"]
    assert "models/gguf/model-${convert.outtype}.gguf" in stage["deps"]
