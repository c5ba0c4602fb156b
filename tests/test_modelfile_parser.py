"""The Modelfile parser follows Ollama's grammar (parser/parser.go, api.Options typing of v0.11.4)."""

from __future__ import annotations

import json

import pytest

from pipeline.common import PipelineError
from pipeline.modelfile_parser import Modelfile, load_modelfile, parse_modelfile, render_modelfile

CHATML = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"

FULL = f'''# A fine-tune, served by Ollama
FROM ./model-q8_0.gguf
TEMPLATE """{CHATML}"""
SYSTEM You are a helpful assistant.
PARAMETER num_ctx 4096
PARAMETER num_gpu 99
PARAMETER temperature 0.7
PARAMETER use_mmap false
PARAMETER stop <|im_end|>
PARAMETER stop "<|im_start|>"
MESSAGE user Hi
MESSAGE assistant """Hello!
How can I help?"""
LICENSE Apache-2.0
'''


def test_every_instruction_parses_into_typed_fields():
    modelfile = parse_modelfile(FULL)
    assert modelfile == Modelfile(
        from_="./model-q8_0.gguf",
        template=CHATML,
        system="You are a helpful assistant.",
        parameters={"num_ctx": 4096, "num_gpu": 99, "temperature": 0.7, "use_mmap": False,
                    "stop": ["<|im_end|>", "<|im_start|>"]},
        license=("Apache-2.0",),
        messages=({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!\nHow can I help?"}),
    )  # fmt: skip
    assert type(modelfile.parameters["num_ctx"]) is int and type(modelfile.parameters["temperature"]) is float


def test_create_request_holds_the_fields_ollamas_cli_sends():
    request = parse_modelfile(FULL).create_request()
    # notes §1.2's example: license always a list, stop a list, numbers typed, only the fields set
    assert json.loads(json.dumps(request)) == {
        "template": CHATML,
        "system": "You are a helpful assistant.",
        "parameters": {"num_ctx": 4096, "num_gpu": 99, "temperature": 0.7, "use_mmap": False,
                       "stop": ["<|im_end|>", "<|im_start|>"]},
        "license": ["Apache-2.0"],
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!\nHow can I help?"}],
    }  # fmt: skip
    assert parse_modelfile("FROM llama3.2\n").create_request() == {}
    # Go's omitempty: an empty SYSTEM is no field (and no layer)
    assert parse_modelfile('FROM x\nSYSTEM ""\n').create_request() == {}


def test_instructions_are_case_insensitive():
    modelfile = parse_modelfile('from base\nTemplate "{{ .Prompt }}"\nsYsTeM hi\npArAmEtEr stop END\nmessage user q\n')
    assert modelfile == Modelfile(
        from_="base",
        template="{{ .Prompt }}",
        system="hi",
        parameters={"stop": ["END"]},
        messages=({"role": "user", "content": "q"},),
    )


def test_a_hash_starts_a_comment_only_at_the_start_of_a_line():
    text = (
        "  # an indented comment\n"
        "FROM x # not a comment: part of the path\n"
        "SYSTEM Reply with #hashtags\n"
        'TEMPLATE """first line\n'
        "# inside a quoted value: text, not a comment\n"
        'last line"""\n'
        "#PARAMETER num_ctx lots\n"
    )
    modelfile = parse_modelfile(text)
    assert modelfile.from_ == "x # not a comment: part of the path"
    assert modelfile.system == "Reply with #hashtags"
    assert modelfile.template == "first line\n# inside a quoted value: text, not a comment\nlast line"
    assert modelfile.parameters == {}


def test_values_are_unquoted_once_without_escapes_and_keep_inner_whitespace():
    text = (
        'SYSTEM """  two leading spaces, a literal \\n and "quotes"  """\n'
        'FROM\t"a model.gguf"\n'
        'MESSAGE user "spans\r\n'
        '  two lines"\r\n'
        "TEMPLATE    {{ .Prompt }}   \n"
        'PARAMETER num_ctx "2048"\n'
    )
    modelfile = parse_modelfile(text)
    assert modelfile.system == '  two leading spaces, a literal \\n and "quotes"  '
    assert modelfile.from_ == "a model.gguf"
    assert modelfile.messages == ({"role": "user", "content": "spans\r\n  two lines"},)
    assert modelfile.template == "{{ .Prompt }}"
    assert modelfile.parameters == {"num_ctx": 2048}


def test_parameters_are_typed_like_ollamas_options():
    text = (
        "FROM x\nPARAMETER seed -1\nPARAMETER top_p .9\nPARAMETER temperature 1\nPARAMETER repeat_penalty 1.1e0\n"
        "PARAMETER use_mmap T\nPARAMETER num_ctx 1024\nPARAMETER num_ctx 8192\n"
    )
    # the last line wins except for stop, which appends
    assert parse_modelfile(text).parameters == {
        "seed": -1, "top_p": 0.9, "temperature": 1.0, "repeat_penalty": 1.1, "use_mmap": True, "num_ctx": 8192,
    }  # fmt: skip


def test_load_reads_utf8_and_utf16_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "Modelfile"
    path.write_bytes("\ufeffFROM x\nSYSTEM café\n".encode("utf-16"))
    assert load_modelfile(path) == Modelfile(from_="x", system="café")
    path.write_bytes(b"\xef\xbb\xbfFROM y\n")
    assert load_modelfile(path) == Modelfile(from_="y")


ERRORS = {
    "missing FROM": ("SYSTEM hi\n", "Modelfile:1: no FROM line (a Modelfile needs FROM <GGUF path or model name>)"),
    "unknown instruction": (
        "FROM x\n\nFORM y\n",
        "Modelfile:3: unknown instruction 'FORM' (expected one of FROM, TEMPLATE, SYSTEM, PARAMETER, MESSAGE, "
        "LICENSE, ADAPTER)",
    ),
    "instruction newer than v0.11.4": (
        "FROM x\nRENDERER qwen3\n",
        "Modelfile:2: unknown instruction 'RENDERER' (expected one of FROM, TEMPLATE, SYSTEM, PARAMETER, MESSAGE, "
        "LICENSE, ADAPTER)",
    ),
    "unknown PARAMETER name (case-sensitive)": (
        "FROM x\nPARAMETER Temperature 0.5\n",
        "Modelfile:2: PARAMETER: unknown parameter 'Temperature' (known: num_ctx, num_batch, num_gpu, main_gpu, "
        "use_mmap, num_thread, num_keep, seed, num_predict, top_k, top_p, min_p, typical_p, repeat_last_n, "
        "temperature, repeat_penalty, presence_penalty, frequency_penalty, stop)",
    ),
    "deprecated PARAMETER": (
        "FROM x\nPARAMETER mirostat 1\n",
        "Modelfile:2: PARAMETER mirostat: deprecated, Ollama ignores it; remove the line",
    ),
    "int value": ("FROM x\nPARAMETER num_ctx lots\n", "Modelfile:2: PARAMETER num_ctx: invalid int value 'lots'"),
    "int value with a fraction": (
        "FROM x\nPARAMETER num_gpu 1.5\n",
        "Modelfile:2: PARAMETER num_gpu: invalid int value '1.5'",
    ),
    "float value": (
        "FROM x\nPARAMETER temperature warm\n",
        "Modelfile:2: PARAMETER temperature: invalid float value 'warm'",
    ),
    "float32 overflow": (
        "FROM x\nPARAMETER top_p 1e39\n",
        "Modelfile:2: PARAMETER top_p: invalid float value '1e39'",
    ),
    "bool value": (
        "FROM x\nPARAMETER use_mmap yes\n",
        "Modelfile:2: PARAMETER use_mmap: invalid bool value 'yes' (true or false)",
    ),
    "unterminated triple quote": (
        'FROM x\nTEMPLATE """{{ .Prompt }}\n\nSYSTEM hi\n',
        'Modelfile:2: TEMPLATE: unterminated """ (opened on line 2; the closing """ must end a line)',
    ),
    "unbalanced triple quote": (
        'FROM x\nSYSTEM """abc""\n',
        'Modelfile:2: SYSTEM: unterminated """ (opened on line 2; the closing """ must end a line)',
    ),
    "unterminated quote": (
        'FROM x\nPARAMETER stop "<|im_end|>\n',
        'Modelfile:2: PARAMETER stop: unterminated " (opened on line 2; the closing " must end a line)',
    ),
    "MESSAGE role": (
        "FROM x\nMESSAGE bot hello\n",
        'Modelfile:2: MESSAGE: role must be one of "system", "user", or "assistant", got \'bot\'',
    ),
    "MESSAGE role is lower case": (
        "FROM x\nMESSAGE User hello\n",
        'Modelfile:2: MESSAGE: role must be one of "system", "user", or "assistant", got \'User\'',
    ),
    "instruction without a value": ("FROM x\nSYSTEM\n", "Modelfile:2: SYSTEM: missing value"),
    "PARAMETER without a value": ("FROM x\nPARAMETER stop\n", "Modelfile:2: PARAMETER stop: missing value"),
    "PARAMETER name with a dash": (
        "FROM x\nPARAMETER num-ctx 1\n",
        "Modelfile:2: PARAMETER: invalid name 'num-ctx' (letters, digits and _ after one space)",
    ),
    "second FROM": ("FROM x\nFROM y\n", "Modelfile:2: FROM: a second FROM (the first is on line 1)"),
}


@pytest.mark.parametrize(("text", "message"), ERRORS.values(), ids=ERRORS.keys())
def test_a_bad_modelfile_is_one_error_naming_source_line_and_reason(text, message):
    with pytest.raises(PipelineError) as error:
        parse_modelfile(text)
    assert str(error.value) == message


def test_errors_name_the_file_they_come_from(tmp_path):
    path = tmp_path / "Modelfile"
    path.write_text("FROM x\nPARAMETER num_ctx lots\n")
    with pytest.raises(PipelineError, match=rf"^{path}:2: PARAMETER num_ctx: invalid int value 'lots'$"):
        load_modelfile(path)
    with pytest.raises(PipelineError, match=r"cannot read the Modelfile: No such file or directory"):
        load_modelfile(tmp_path / "missing")


ROUND_TRIPS = {
    "every field": parse_modelfile(FULL),
    "quoting": Modelfile(
        from_="models/my model.gguf",
        template="",
        system='  padded, with "quotes"  ',
        parameters={"stop": ["</s>", " [INST]", '"', "line\nbreak"], "top_k": 40, "min_p": 1e-05},
        license=('MIT\n"as is"', 'contains """ and no newline'),
        adapters=("lora.gguf",),
        messages=({"role": "system", "content": 'has """ and "quoted" words\nover lines'},),
    ),
}


@pytest.mark.parametrize("modelfile", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_render_writes_text_that_parses_back_to_the_same_modelfile(modelfile):
    text = render_modelfile(modelfile)
    assert parse_modelfile(text) == modelfile


def test_render_quotes_only_what_needs_quotes():
    modelfile = Modelfile(
        from_="./model.gguf", system="Be brief.\nUse OPL.", parameters={"num_ctx": 2048, "stop": ["[INST]", " x"]}
    )
    assert render_modelfile(modelfile) == (
        'FROM ./model.gguf\nSYSTEM """Be brief.\nUse OPL."""\nPARAMETER num_ctx 2048\n'
        'PARAMETER stop [INST]\nPARAMETER stop """ x"""\n'
    )


@pytest.mark.parametrize(
    ("modelfile", "message"),
    [
        (Modelfile(from_="x", system='"""a"\nb"'), "SYSTEM: this value cannot be written in a Modelfile"),
        (Modelfile(from_="x", system="bell\x07"), "SYSTEM: a non-printable character cannot be written"),
        (Modelfile(from_="x", parameters={"num_ctx": "4096"}), "PARAMETER num_ctx: expected int values, got '4096'"),
        (Modelfile(from_="x", parameters={"penalty": 1}), "PARAMETER: unknown parameter 'penalty'"),
    ],
)
def test_render_refuses_what_would_not_parse_back(modelfile, message):
    with pytest.raises(PipelineError, match=message):
        render_modelfile(modelfile)
