"""Wall time and peak memory of stage convert against llama.cpp's converter, per tiny family model.

    python -m bench.families --family qwen2 --family llama3 --family phi3 --family gemma2 --family gemma3
    python -m bench.families --family none --model models/merged   # a real model, e.g. of a gemma3-270m run

Each tiny model of pipeline/tiny_families.py is built and saved the way merge saves a model (fp16
safetensors, tokenizer), then converted to f16 GGUF by `python -m pipeline.convert` and by llama.cpp's
convert_hf_to_gguf.py from the llama-cpp-python sdist (the copy tests/conftest.py keeps in its cache,
run with the tests' registration of the tiny vocabulary's pre-tokenizer), each in its own process and
measured as bench.gguf measures. Results: a Markdown table on stdout and bench/results/families.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench.common import RESULTS, ROOT, machine, measure_process, table


def reference_command(model_dir: Path, out: Path, family: str) -> list[str]:
    """llama.cpp's converter as the parity test runs it (tests/test_convert.py run_reference)."""
    from pipeline.gguf_vocab import CHKTXT
    from tests.conftest import CACHE, llama_cpp_python_version
    from tests.test_convert import REFERENCE_WITH_PRE_TOKENIZERS
    from tests.test_families import PRE_TOKENIZER, ids_hash

    converter = CACHE / f"llama.cpp-{llama_cpp_python_version()}" / "convert_hf_to_gguf.py"
    if not converter.is_file():
        raise SystemExit(f"{converter}: not there; run the convert tests once (they extract it from the sdist)")
    # SentencePiece (Phi-3, Gemma): no BPE pre-tokenizer to register
    sentencepiece = (model_dir / "tokenizer.model").is_file()
    registered = {} if sentencepiece else {ids_hash(model_dir): PRE_TOKENIZER[family]}
    script = ["-c", REFERENCE_WITH_PRE_TOKENIZERS, str(converter), json.dumps(registered), json.dumps(CHKTXT)]
    return [sys.executable, *script, str(model_dir), "--outtype", "f16", "--outfile", str(out)]


def bench_family(family: str) -> dict:
    from pipeline import tiny_families
    from pipeline.dataset import corpus_texts
    from tests.conftest import save_merged_like

    with tempfile.TemporaryDirectory(prefix=f"bench-families-{family}-") as tmp:
        work = Path(tmp)
        tokenizer = tiny_families.build_tokenizer(family, corpus_texts(ROOT / "data" / "train.jsonl"), work / "base")
        model = tiny_families.build_model(family, tokenizer)
        merged = save_merged_like(model, tokenizer, work / "base", work / f"{family}-merged")
        return bench_model(merged, family, f"tiny-{family}", work)  # Phi-3: a name llama.cpp knows


def bench_model(merged: Path, family: str, name: str, work: Path) -> dict:
    """Both converters on the saved model `merged`, each in its own process; the GGUFs are written in `work`."""
    params = work / "params.yaml"
    params.write_text(f"convert:\n  outtype: f16\n  model_name: {name}\n")
    ours = [sys.executable, "-m", "pipeline.convert", "--params", str(params), "--model", str(merged)]
    ours += ["--out", str(work / "ours.gguf"), "--metrics", str(work / "ours.json")]
    rows = []
    for converter, command in (
        ("stage convert", ours),
        ("llama.cpp converter", reference_command(merged, work / "ref.gguf", family)),
    ):
        wall, peak = measure_process(command, ROOT)
        rows.append({"converter": converter, "wall_s": round(wall, 2), "peak_rss_mib": round(peak)})
        print(f"  {name:12} {converter:20} {wall:6.2f} s  {peak:6.0f} MiB", file=sys.stderr)
    checkpoint = sum(p.stat().st_size for p in merged.glob("*.safetensors"))
    return {"family": name, "checkpoint_mb": round(checkpoint / 1e6, 2), "runs": rows}


def bench_saved_model(model_dir: Path) -> dict:
    """A real model directory (a base or merge output): its config's model_type names it."""
    model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
    with tempfile.TemporaryDirectory(prefix="bench-families-model-") as tmp:
        result = bench_model(model_dir, model_type, model_type, Path(tmp))
    return {**result, "family": f"{model_type} ({model_dir.name})"}


def main(argv: list[str] | None = None) -> None:
    from pipeline import tiny_families

    parser = argparse.ArgumentParser(prog="python -m bench.families", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--family",
        action="append",
        choices=[*tiny_families.FAMILIES, "none"],
        help="tiny family (repeatable; default all; none: only --model)",
    )
    parser.add_argument("--model", type=Path, action="append", default=[], help="a saved model directory too")
    args = parser.parse_args(argv)
    families = [family for family in args.family or tiny_families.FAMILIES if family != "none"]
    results = [bench_family(family) for family in families] + [bench_saved_model(path) for path in args.model]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "families.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=2) + "\n")
    header = ["tiny family (fp16 checkpoint)", "converter", "wall (s)", "peak RSS (MiB)"]
    rows = [
        [f"{result['family']} ({result['checkpoint_mb']} MB)", r["converter"], r["wall_s"], r["peak_rss_mib"]]
        for result in results
        for r in result["runs"]
    ]
    print(table(header, rows))


if __name__ == "__main__":
    main()
