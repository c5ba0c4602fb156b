"""Stage `modelfile`: the Ollama Modelfile that ships next to the GGUF the gate passed.

    python -m pipeline.modelfile --verdict models/gate/verdict.json --model models/merged \
        --cases data/gate_cases.jsonl --template modelfiles/Modelfile.in --out models/release/Modelfile

Reads the gate's verdict for the GGUF, recognises the chat family of the merged model's tokenizer,
proves on every gate case that the family's TEMPLATE gives Ollama the prompt training saw (text
and llama.cpp's token ids of that GGUF), fills modelfiles/Modelfile.in from params `modelfile`,
parses the result with Ollama's grammar and writes it atomically. `FROM` is relative to the
Modelfile's own directory, which is where `ollama create -f <Modelfile>` resolves it
(parser.Modelfile.CreateRequest with filepath.Dir of the -f path).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from string import Template
from typing import Any

from pipeline.cases import load_cases
from pipeline.common import PipelineError, get_logger, run_cli, write_text_atomic
from pipeline.modelfile_parser import Modelfile, parse_modelfile, quote_value
from pipeline.ollama_template import ChatFamily, check_parity, family_for
from pipeline.params import ModelfileParams, load_params
from pipeline.verdict import read_verdict

PARAMS = ("modelfile",)

log = get_logger("modelfile")


def released_gguf(path: Path) -> Path:
    """The GGUF the gate passed, from its verdict file (pipeline/verdict.py)."""
    verdict = read_verdict(path)
    if not verdict.gguf:
        raise PipelineError(f"{path}: gguf: expected the path of the GGUF the gate checked")
    gguf = Path(verdict.gguf)
    if not verdict.passed:
        raise PipelineError(f"{path}: passed: false: the gate rejected {gguf}, so no Modelfile is released")
    if not gguf.is_file():
        raise PipelineError(f"{path}: gguf: {gguf} does not exist")
    return gguf


def read_license(params: ModelfileParams) -> str | None:
    if params.license is None:
        return None
    try:
        return Path(params.license).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise PipelineError(f"params: modelfile.license: cannot read {params.license}: {reason}") from None


def fill_template(
    template: str, source: str, gguf_from: str, family: ChatFamily, params: ModelfileParams, license_text: str | None
) -> str:
    """Modelfile.in with its placeholders replaced by instruction lines (absent ones by a comment)."""
    values = {
        "FROM": quote_value(gguf_from, "FROM"),
        "FAMILY": family.name,
        "TEMPLATE": quote_value(family.template, "TEMPLATE"),
        "STOP": "\n".join(f"PARAMETER stop {quote_value(stop, 'PARAMETER stop')}" for stop in family.stop),
        "SYSTEM": f"SYSTEM {quote_value(params.system, 'SYSTEM')}"
        if params.system is not None
        else "# no SYSTEM (modelfile.system is null)",
        "NUM_CTX": str(params.num_ctx),
        "NUM_GPU": f"PARAMETER num_gpu {params.num_gpu}"
        if params.num_gpu is not None
        else "# no num_gpu: Ollama decides (modelfile.num_gpu is null)",
        "LICENSE": f"LICENSE {quote_value(license_text, 'LICENSE')}"
        if license_text is not None
        else "# no LICENSE (modelfile.license is null)",
    }
    try:
        return Template(template).substitute(values)
    except KeyError as error:
        known = ", ".join(values)
        raise PipelineError(f"{source}: unknown placeholder ${{{error.args[0]}}} (known: {known})") from None
    except ValueError as error:
        raise PipelineError(f"{source}: {error} (write $$ for a literal $)") from None


def expected_modelfile(
    gguf_from: str, family: ChatFamily, params: ModelfileParams, license_text: str | None
) -> Modelfile:
    parameters: dict[str, Any] = {"stop": list(family.stop), "num_ctx": params.num_ctx}
    if params.num_gpu is not None:
        parameters["num_gpu"] = params.num_gpu
    return Modelfile(
        from_=gguf_from,
        template=family.template,
        system=params.system,
        parameters=parameters,
        license=(license_text,) if license_text is not None else (),
    )


def build_modelfile(
    verdict: Path, model: Path, cases: Path, template: Path, out: Path, params: ModelfileParams
) -> tuple[str, ChatFamily, int]:
    """The Modelfile text, the family it uses and the number of gate cases proven."""
    from transformers import AutoTokenizer

    gguf = released_gguf(verdict)
    tokenizer = AutoTokenizer.from_pretrained(model)
    family = family_for(tokenizer)
    errors: list[str] = []
    gate_cases = load_cases(cases, errors)
    if errors:
        raise PipelineError("invalid gate cases:\n  " + "\n  ".join(errors))
    try:
        check_parity(tokenizer, family, [case.messages() for case in gate_cases], params.system, gguf)
    except PipelineError as error:
        raise PipelineError(f"training and serving formats differ ({model}, {gguf}): {error}") from None

    gguf_from = Path(os.path.relpath(gguf.resolve(), out.parent.resolve())).as_posix()
    license_text = read_license(params)
    text = fill_template(template.read_text(encoding="utf-8"), str(template), gguf_from, family, params, license_text)
    parsed = parse_modelfile(text, source=f"{out} (from {template})")
    wanted = expected_modelfile(gguf_from, family, params, license_text)
    if parsed != wanted:
        different = [name for name in wanted.__dataclass_fields__ if getattr(parsed, name) != getattr(wanted, name)]
        raise PipelineError(
            f"{template}: the rendered Modelfile does not say what params and the chat family ask for "
            f"(differs in: {', '.join(different)}); keep one line per placeholder"
        )
    return text, family, len(gate_cases)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.modelfile", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--verdict", type=Path, required=True, help="the gate's verdict (JSON) naming the GGUF")
    parser.add_argument("--model", type=Path, required=True, help="merged model directory (its tokenizer)")
    parser.add_argument("--cases", type=Path, required=True, help="gate cases (JSON Lines) to prove parity on")
    parser.add_argument("--template", type=Path, required=True, help="the Modelfile template (modelfiles/Modelfile.in)")
    parser.add_argument("--out", type=Path, required=True, help="Modelfile to write")
    args = parser.parse_args(argv)

    params = load_params(args.params).modelfile
    text, family, proven = build_modelfile(args.verdict, args.model, args.cases, args.template, args.out, params)
    write_text_atomic(args.out, text)
    log.info("%s: %s TEMPLATE, same prompt and token ids as training on %d gate cases", args.out, family.name, proven)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
