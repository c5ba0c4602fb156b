"""Stage gate: may this model ship? Before/after keyword scores on the gate cases.

    python -m pipeline.gate

Scores every case of data/gate_cases.jsonl (pipeline/cases.py) with greedy answers from
- before: the base model (models/base, its own chat template);
- merged: the fine-tuned HF model (models/merged), to measure what conversion and quantization lose;
- each GGUF the pipeline produced, run in llama.cpp with the prompt rendered exactly as Ollama renders it
  from the Modelfile TEMPLATE.
Rules (params.yaml gate): learn cases must reach a score and gain over the base; keep cases must not
drop below the base by more than a tolerance (the overtraining check); a GGUF must not lose more than a
tolerance against the merged model; no answer may contain a forbidden keyword.

Writes metrics/gate.json (DVC metrics), reports/gate.md and models/gate/verdict.json, which the deploy
command requires to say passed. A failed gate writes all three, then exits 1 with the reasons.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from pipeline.cases import Case, load_cases
from pipeline.common import (
    PipelineError,
    file_sha256_hex,
    get_logger,
    run_cli,
    write_json_atomic,
    write_text_atomic,
)
from pipeline.params import GateParams, load_params

VERDICT = Path("models/gate/verdict.json")
PARAMS = ("gate", "convert.outtype", "quantize.types", "modelfile.system")
HF_BATCH = 8  # gate cases answered together by an HF model (left-padded, greedy)
log = get_logger("gate")


def kind_mean(cases: list[Case], scores: dict[str, float], kind: str) -> float | None:
    values = [scores[case.id] for case in cases if case.kind == kind]
    return mean(values) if values else None


def judge(
    cases: list[Case],
    before: dict[str, float],
    after: dict[str, float],
    rules: GateParams,
    forbidden: dict[str, tuple[str, ...]] | None = None,
    merged: dict[str, float] | None = None,
) -> list[str]:
    """Why `after` may not ship (empty: it may). Scores are per case id, 0..1 (Case.score)."""
    reasons = []
    learn_before, learn_after = kind_mean(cases, before, "learn"), kind_mean(cases, after, "learn")
    if learn_after is not None:
        if learn_after < rules.learn_min_score:
            reasons.append(f"learn: mean score {learn_after:.3f} < learn_min_score {rules.learn_min_score}")
        if learn_after - learn_before < rules.learn_min_gain:
            reasons.append(
                f"learn: gain over the base {learn_after - learn_before:+.3f} < learn_min_gain {rules.learn_min_gain}"
            )
    keep_before, keep_after = kind_mean(cases, before, "keep"), kind_mean(cases, after, "keep")
    if keep_after is not None and keep_after < keep_before - rules.keep_max_drop:
        dropped = [c.id for c in cases if c.kind == "keep" and after[c.id] < before[c.id]]
        reasons.append(
            f"keep: mean score fell {keep_before:.3f} -> {keep_after:.3f} (more than keep_max_drop "
            f"{rules.keep_max_drop}); regressed: {', '.join(dropped)}"
        )
    if merged is not None:
        overall_merged, overall_after = mean(merged.values()), mean(after[c] for c in merged)
        if overall_after < overall_merged - rules.gguf_max_drop:
            reasons.append(
                f"gguf: mean score {overall_after:.3f} below the merged model's {overall_merged:.3f} "
                f"by more than gguf_max_drop {rules.gguf_max_drop}"
            )
    for case_id, words in (forbidden or {}).items():
        if words:
            reasons.append(f"forbidden: case {case_id} answered with {', '.join(map(repr, words))}")
    return reasons


def load_verdict(path: str | Path = VERDICT) -> dict:
    """The gate's verdict; a PipelineError unless it exists, reads, and says passed."""
    path = Path(path)
    try:
        verdict = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: no gate verdict; run the gate first (dvc repro gate)") from None
    except (OSError, json.JSONDecodeError) as error:
        raise PipelineError(f"{path}: unreadable gate verdict: {error}") from None
    if not isinstance(verdict, dict) or not isinstance(verdict.get("passed"), bool):
        raise PipelineError(f"{path}: not a gate verdict (no boolean 'passed')")
    if not verdict["passed"]:
        reasons = "; ".join(verdict.get("reasons") or ["no reason recorded"])
        raise PipelineError(f"{path}: the gate failed, refusing to ship: {reasons}")
    return verdict


# --- answering: the same greedy settings for every model ---------------------------------------


def sampling_options(gate: GateParams) -> dict:
    """Greedy decoding as Ollama's /api/chat options: what deploy's served check sends."""
    return {
        "temperature": 0,
        "top_k": 1,
        "seed": gate.seed,
        "num_predict": gate.max_new_tokens,
        "repeat_penalty": 1.0,  # Ollama's default 1.1 would change greedy answers
    }


def hf_answers(model_dir: Path, cases: list[Case], gate: GateParams, progress: Callable[[int], None]) -> list[str]:
    """Greedy answers of an HF model through its own chat template, a few cases at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(gate.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
    answers = []
    for start in range(0, len(cases), HF_BATCH):
        batch = cases[start : start + HF_BATCH]
        texts = [tokenizer.apply_chat_template(c.messages(), add_generation_prompt=True, tokenize=False) for c in batch]
        inputs = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=gate.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = output[:, inputs["input_ids"].shape[1] :]
        answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
        progress(len(batch))
    return answers


def gguf_answers(
    gguf: Path, cases: list[Case], gate: GateParams, template: str, stop: tuple[str, ...], system: str | None,
    progress: Callable[[int], None],
) -> list[str]:  # fmt: skip
    """Greedy answers of a GGUF in llama.cpp, each prompt rendered from the Ollama TEMPLATE the
    Modelfile ships (pipeline.go_template), BOS as the GGUF says, generation cut at its stops."""
    from pipeline.go_template import render_prompt
    from pipeline.llama_runtime import gguf_adds_bos, load_gguf

    llm = load_gguf(gguf, n_ctx=gate.n_ctx, seed=gate.seed)
    add_bos = gguf_adds_bos(llm)
    answers = []
    try:
        for case in cases:
            prompt = render_prompt(template, case.messages(), system)
            tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)
            llm.reset()
            result = llm.create_completion(
                tokens,
                max_tokens=gate.max_new_tokens,
                temperature=0.0,
                top_k=1,
                repeat_penalty=1.0,
                seed=gate.seed,
                stop=list(stop),
            )
            answers.append(result["choices"][0]["text"].strip())
            progress(1)
    finally:
        llm.close()
    return answers


# --- the stage ----------------------------------------------------------------------------------


@dataclass
class Scored:
    name: str  # before | merged | f16 | q8_0 | ...
    answers: dict[str, str]
    scores: dict[str, float]
    forbidden: dict[str, tuple[str, ...]]


def score(name: str, cases: list[Case], answers: list[str]) -> Scored:
    results = {case.id: case.score(answer) for case, answer in zip(cases, answers, strict=True)}
    return Scored(
        name=name,
        answers={case.id: answer for case, answer in zip(cases, answers, strict=True)},
        scores={case_id: round(result.score, 4) for case_id, result in results.items()},
        forbidden={case_id: result.forbidden for case_id, result in results.items() if result.forbidden},
    )


def choose(variants: dict[str, list[str]], sizes: dict[str, int], ship: str) -> tuple[str | None, list[str]]:
    """The GGUF that ships (None: none may) and why not, given each variant's failure reasons."""
    passing = [name for name, reasons in variants.items() if not reasons]
    if ship == "auto":
        if passing:
            return min(passing, key=lambda name: sizes[name]), []
        return None, ["no GGUF passed the gate"]
    if ship not in variants:
        return None, [f"gate.ship: {ship} is not a GGUF this pipeline produced ({', '.join(variants)})"]
    return (ship, []) if not variants[ship] else (None, [f"gate.ship: {ship} did not pass"])


def excerpt(text: str, limit: int = 90) -> str:
    flat = text.replace("|", "\\|").replace("\n", "⏎ ")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def report_markdown(
    cases: list[Case], scored: list[Scored], variant_reasons: dict[str, list[str]], shipped: str | None,
    reasons: list[str],
) -> str:  # fmt: skip
    names = [s.name for s in scored]
    lines = [
        "# Gate report",
        "",
        f"**{'PASSED' if shipped else 'FAILED'}**" + (f": ships `{shipped}`" if shipped else ""),
        *(f"- {reason}" for reason in reasons),
        "",
        "| kind | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    for kind in ("learn", "keep"):
        row = [kind_mean(cases, s.scores, kind) for s in scored]
        if row[0] is not None:
            lines.append(f"| {kind} | " + " | ".join(f"{value:.3f}" for value in row) + " |")
    lines += ["", "| GGUF | verdict |", "| --- | --- |"]
    for name, why in variant_reasons.items():
        lines.append(f"| {name} | {'pass' if not why else 'fail: ' + '; '.join(why)} |")
    lines += [
        "",
        "## Cases",
        "",
        "| case | kind | " + " | ".join(names) + " |",
        "| --- | --- |" + " --- |" * len(names),
    ]
    for case in cases:
        lines.append(f"| {case.id} | {case.kind} | " + " | ".join(f"{s.scores[case.id]:.2f}" for s in scored) + " |")
    after = next((s for s in scored if s.name == shipped), scored[-1])
    lines += ["", f"## Answers (before → {after.name})", "", "| case | before | after |", "| --- | --- | --- |"]
    for case in cases:
        lines.append(f"| {case.id} | {excerpt(scored[0].answers[case.id])} | {excerpt(after.answers[case.id])} |")
    return "\n".join(lines) + "\n"


def kind_means(cases: list[Case], scores: dict[str, float]) -> dict[str, float]:
    return {
        kind: round(value, 4) for kind in ("learn", "keep") if (value := kind_mean(cases, scores, kind)) is not None
    }


def run_gate(
    cases: list[Case], base: Path, merged: Path, ggufs: dict[str, Path], gate: GateParams, system: str | None
) -> tuple[dict, dict, str]:
    """(metrics, verdict, report) for these cases and models."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from pipeline.ollama_template import family_for

    family = family_for(AutoTokenizer.from_pretrained(merged))

    def answer_gguf(path: Path) -> Callable:
        return lambda tick: gguf_answers(path, cases, gate, family.template, family.stop, system, tick)

    models = {
        "before": lambda tick: hf_answers(base, cases, gate, tick),
        "merged": lambda tick: hf_answers(merged, cases, gate, tick),
        **{variant: answer_gguf(path) for variant, path in ggufs.items()},
    }
    scored: dict[str, Scored] = {}
    for name, answer in models.items():
        with tqdm(total=len(cases), desc=f"gate {name}", unit="case") as bar:
            scored[name] = score(name, cases, answer(bar.update))
        log.info("%s: %s", name, kind_means(cases, scored[name].scores))

    before, merged_scores = scored["before"].scores, scored["merged"].scores
    variant_reasons = {
        name: judge(cases, before, scored[name].scores, gate, forbidden=scored[name].forbidden, merged=merged_scores)
        for name in ggufs
    }
    shipped, reasons = choose(variant_reasons, {name: path.stat().st_size for name, path in ggufs.items()}, gate.ship)
    if shipped is None:
        reasons += [f"{name}: {why}" for name, whys in variant_reasons.items() for why in whys]
    # A failed verdict still names the GGUF it judged (the one asked for, else the largest: the least lossy).
    judged = shipped or (gate.ship if gate.ship in ggufs else max(ggufs, key=lambda n: ggufs[n].stat().st_size))
    metrics = {
        "passed": shipped is not None,
        "ship": shipped,
        **{
            kind: {name: round(kind_mean(cases, s.scores, kind), 4) for name, s in scored.items()}
            for kind in kind_means(cases, before)
        },
        "variants_passed": {name: not why for name, why in variant_reasons.items()},
    }
    chosen = scored[judged]
    verdict = {
        "passed": shipped is not None,
        "reasons": reasons,
        "quant": judged,
        "gguf": str(ggufs[judged]),
        "gguf_sha256": file_sha256_hex(ggufs[judged]),
        "family": family.name,
        "system": system,
        "options": sampling_options(gate),
        "cases": [
            {
                "id": case.id,
                "kind": case.kind,
                "before": before[case.id],
                "merged": merged_scores[case.id],
                "after": chosen.scores[case.id],
                "passed": chosen.scores[case.id] == 1.0,
                "answer": chosen.answers[case.id],
            }
            for case in cases
        ],
    }
    return metrics, verdict, report_markdown(cases, list(scored.values()), variant_reasons, shipped, reasons)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.gate", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--cases", type=Path, default=Path("data/gate_cases.jsonl"), help="default: %(default)s")
    parser.add_argument(
        "--base", type=Path, default=Path("models/base"), help="the model before (default: %(default)s)"
    )
    parser.add_argument("--merged", type=Path, default=Path("models/merged"), help="default: %(default)s")
    parser.add_argument("--gguf-dir", type=Path, default=Path("models/gguf"), help="default: %(default)s")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/gate.json"), help="default: %(default)s")
    parser.add_argument("--report", type=Path, default=Path("reports/gate.md"), help="default: %(default)s")
    parser.add_argument("--verdict", type=Path, default=VERDICT, help="default: %(default)s")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    errors: list[str] = []
    cases = load_cases(args.cases, errors)
    if errors:
        raise PipelineError("\n".join(errors))
    names = [params.convert.outtype, *params.quantize.types]
    ggufs = {name: args.gguf_dir / f"model-{name}.gguf" for name in dict.fromkeys(names)}
    missing = [str(path) for path in ggufs.values() if not path.is_file()]
    if missing:
        raise PipelineError(f"GGUF not found: {', '.join(missing)} (run dvc repro quantize)")
    metrics, verdict, report = run_gate(cases, args.base, args.merged, ggufs, params.gate, params.modelfile.system)
    write_json_atomic(args.metrics, metrics)
    write_text_atomic(args.report, report)
    write_json_atomic(args.verdict, verdict)
    if not verdict["passed"]:
        raise PipelineError("gate failed:\n  " + "\n  ".join(verdict["reasons"]) + f"\n(details: {args.report})")
    log.info("gate passed: ships %s (%s)", verdict["quant"], args.report)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
