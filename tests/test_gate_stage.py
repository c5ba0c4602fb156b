"""Stage gate end to end: real runs of prepare -> train -> merge -> convert -> quantize -> gate.

- tiny, trained for real, through `python -m pipeline.gate` (its main): the three outputs and their
  structure, the same scores and answers on a second run;
- a broken run (the assistant answers shuffled across conversations) fails with the learn reason where
  the correctly trained run passes;
- an overtrained SmolLM2 run fails with the keep reason and names the cases it regressed.

Training here runs on one torch thread: on a busy 2-core machine a second OpenMP thread spins waiting for
the first (tiny's training measured 10x slower with two threads than with one while other jobs ran).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from pipeline import baseline, convert, gate, merge, prepare, quantize, train
from pipeline.cases import load_cases
from pipeline.common import PipelineError
from pipeline.dataset import load_conversations
from tests.conftest import DATA

# Training-set questions of the committed dataset and a keyword only their own answer contains (checked in
# `memorised_cases`): a model that answers another conversation's answer misses it.
MEMORISED = {
    "What is the capital of Canada?": "Ottawa",
    "How many legs does a spider have?": "eight",
    "Which is the largest planet in our solar system?": "Jupiter",
    "How do I write a comment in OPL?": "REM",
    "How do I get the length of a string in OPL?": "LEN",
    "How do I stop the user quitting my OPL program with Psion-Esc?": "ESCAPE",
    "How do I leave a loop early in OPL?": "BREAK",
    "How do I convert a string to a number in OPL?": "VAL",
}

# The gate cases ask exactly those training questions on purpose (the test measures whether the gate sees
# memorisation), so prepare is told to allow them (data.allow_gate_cases).
MEMORISED_CASES = [f"learn-{number}-{keyword.lower()}" for number, keyword in enumerate(MEMORISED.values())]

# tiny (2 layers, random init) learns under LoRA only with a large LoRA scale (alpha / r = 16) and a small
# learning rate: lr 1e-3 at that scale, or lr 1e-2 at the default scale 2, collapses to one repeated token.
# Its frozen random lm_head (std 0.02) and final norm cap every logit near 5, so the loss cannot go below
# about 1.47 and the margins stay thin; 80 epochs over the 8 conversations reach that floor in ~30 s.
TINY_TRAIN = {
    "epochs": 80,
    "batch_size": 4,
    "learning_rate": "5.0e-4",
    "r": 64,
    "alpha": 1024,
    "dropout": 0.0,
    "early_stopping_patience": 0,
    "bf16": "false",  # CPU autocast: slower here, and rounds the thin margins
    "checkpoint_steps": 100000,  # no checkpoint writes: nothing resumes in a test
    "max_steps": -1,  # exactly `epochs` epochs
    "replay": 0,
}
# tiny knows nothing a fine-tune could make it forget (random weights): its probe answers are noise whose
# likelihood any training changes, so the likelihood rules for keep and forgetting are opened here.
TINY_GATE = {"learn_min_score": 0.5, "types": "[q8_0]", "keep_max_nll_rise": 100, "max_forgetting": 100}
PROBES = 8  # general probes the gate tests score (the committed file has 48): enough for the mean


def params_text(source: str, overrides: dict) -> str:
    """`source` (a params.yaml text) with each override set: `key` is the first such key in the file,
    `section.key` the first after `section:`."""
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        start = re.search(rf"^{section}:", source, flags=re.MULTILINE).end() if section else 0
        rest, count = re.subn(rf"^(\s*{name}:)[^#\n]*", rf"\1 {value} ", source[start:], count=1, flags=re.MULTILINE)
        assert count == 1, f"params.yaml has no {key}"
        source = source[:start] + rest
    return source


def probe_answers(base: Path, out: Path, max_new_tokens: int) -> Path:
    """Stage base_answers on the first PROBES committed probes: the gate's forgetting references."""
    from pipeline import base_answers

    rows = (DATA / "general" / "probes.jsonl").read_text().splitlines()[:PROBES]
    (out / "probes.jsonl").write_text("\n".join(rows) + "\n")
    (out / "params.yaml").write_text(f"base_answers:\n  max_new_tokens: {max_new_tokens}\n")
    base_answers.main(["--params", str(out / "params.yaml"), "--base", str(base), "--probes", str(out / "probes.jsonl"),
                       "--replay", str(out / "probes.jsonl"), "--out", str(out / "answers"),
                       "--metrics", str(out / "base_answers.json")])  # fmt: skip
    return out / "answers" / "probes.jsonl"


@pytest.fixture(scope="module")
def tiny_probes(tiny_base, tmp_path_factory) -> Path:
    return probe_answers(tiny_base, tmp_path_factory.mktemp("tiny-probes"), 16)


@pytest.fixture(scope="module")
def one_thread():
    """Training and generation on one torch thread (see the module docstring)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_answers(path: Path) -> list[str]:
    errors: list[str] = []
    conversations = load_conversations(path, errors)
    assert errors == []
    return [m["content"] for c in conversations for m in c.messages if m["role"] == "assistant"]


def first_question(conversation: list[dict]) -> str:
    return next(m["content"] for m in conversation if m["role"] == "user")


@pytest.fixture(scope="module")
def memorised(tmp_path_factory) -> tuple[Path, Path]:
    """(the committed conversations MEMORISED asks about, the gate cases asking exactly their questions)."""
    out = tmp_path_factory.mktemp("memorised")
    errors: list[str] = []
    conversations = [c.messages for c in load_conversations(DATA / "train.jsonl", errors)]
    answers = train_answers(DATA / "train.jsonl")
    rows, cases = [], []
    for number, (question, keyword) in enumerate(MEMORISED.items()):
        conversation = next(c for c in conversations if first_question(c) == question)
        own = [m["content"] for m in conversation if m["role"] == "assistant"]
        assert [a for a in answers if keyword in a] == own[:1], f"{keyword!r} must be in its own answer only"
        system = conversation[0]["content"] if conversation[0]["role"] == "system" else None
        rows.append(conversation[: 3 if system else 2])
        case = {"id": MEMORISED_CASES[number], "kind": "learn", "prompt": question, "expect": [keyword]}
        cases.append({**case, "case_sensitive": True, **({"system": system} if system else {})})
    (out / "train.jsonl").write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    (out / "cases.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cases))
    assert errors == []
    return out / "train.jsonl", out / "cases.jsonl"


def shuffle_answers(source: Path, out: Path) -> Path:
    """`source` with each assistant answer moved to the next conversation (the last to the first): every
    conversation keeps its questions and gets another conversation's answer."""
    errors: list[str] = []
    conversations = [c.messages for c in load_conversations(source, errors)]
    assert errors == []
    answers = [m["content"] for c in conversations for m in c if m["role"] == "assistant"]
    moved = iter(answers[-1:] + answers[:-1])
    rows = [[{**m, "content": next(moved)} if m["role"] == "assistant" else m for m in c] for c in conversations]
    out.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    return out


def pipeline_run(
    base: Path, params: Path, train_file: Path, cases: Path, work: Path, monkeypatch, eval_on_train: bool = False
) -> dict:
    """prepare -> train -> merge -> convert -> quantize through their CLIs into `work`; the wall time of each.
    eval_on_train: evaluate on the training conversations, so the adapter train keeps (the one with the best
    eval loss) is the most memorised one rather than the one that fits held-out text best."""
    from pipeline.params import load_params

    monkeypatch.setenv("LLM_GITOPS_CHECKPOINTS", str(work / "checkpoints"))
    common = ["--params", str(params)]
    prepared = work / "prepared"
    seconds: dict[str, float] = {}

    def timed(stage: str, main, *args: str | Path) -> None:
        started = time.perf_counter()
        main([*common, *map(str, args)])
        seconds[stage] = round(time.perf_counter() - started, 1)

    eval_file = DATA / "eval.jsonl"
    timed("prepare", prepare.main, "--train", train_file, "--eval", eval_file, "--cases", cases, "--out", prepared,
          "--metrics", work / "data.json")  # fmt: skip
    if eval_on_train:
        shutil.copyfile(prepared / "train.jsonl", prepared / "eval.jsonl")
    timed("train", train.main, "--base", base, "--data", prepared, "--out", work / "adapter",
          "--metrics", work / "train.json", "--plots", work / "plots")  # fmt: skip
    timed("merge", merge.main, "--base", base, "--adapter", work / "adapter", "--probe", prepared / "eval.jsonl",
          "--out", work / "merged", "--metrics", work / "merge.json")  # fmt: skip
    loaded = load_params(params)
    outtype = loaded.convert.outtype
    timed("convert", convert.main, "--model", work / "merged", "--out", work / "gguf" / f"model-{outtype}.gguf",
          "--metrics", work / "convert.json")  # fmt: skip
    source = work / "gguf" / f"model-{outtype}.gguf"
    for qtype in loaded.quantize.types:
        if qtype != outtype:
            out = work / "gguf" / f"model-{qtype}.gguf"
            timed(f"quantize {qtype}", quantize.main, "--type", qtype, "--model", source, "--out", out,
                  "--metrics", work / f"quantize-{qtype}.json")  # fmt: skip
    return seconds


def run_gate(
    base: Path, work: Path, params: Path, cases: Path, probes: Path, out: Path
) -> tuple[bool, dict, dict, str]:
    """`python -m pipeline.baseline`, then `python -m pipeline.gate` (their mains) on a run: (passed, metrics,
    verdict, report)."""
    baseline_file = out / "models" / "baseline" / "evidence.json"
    baseline.main(["--params", str(params), "--cases", str(cases), "--probes", str(probes), "--base", str(base),
                   "--out", str(baseline_file)])  # fmt: skip
    argv = ["--params", str(params), "--cases", str(cases), "--probes", str(probes),
            "--baseline", str(baseline_file), "--merged", str(work / "merged"),
            "--gguf-dir", str(work / "gguf"), "--metrics", str(out / "metrics" / "gate.json"),
            "--report", str(out / "reports" / "gate.md"),
            "--verdict", str(out / "models" / "gate" / "verdict.json")]  # fmt: skip
    try:
        gate.main(argv)
        passed = True
    except PipelineError:
        passed = False
    return (
        passed,
        json.loads((out / "metrics" / "gate.json").read_text()),
        json.loads((out / "models" / "gate" / "verdict.json").read_text()),
        (out / "reports" / "gate.md").read_text(),
    )


# --- tiny: trained for real, on the committed conversations and on the same with shuffled answers -----


@pytest.fixture(scope="module")
def tiny_gate_params(tiny_params_file, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-gate-params") / "params.yaml"
    allowed = {"data.allow_gate_cases": f"[{', '.join(MEMORISED_CASES)}]"}
    path.write_text(params_text(tiny_params_file.read_text(), {**TINY_TRAIN, **TINY_GATE, **allowed}))
    return path


@pytest.fixture(scope="module")
def tiny_runs(tiny_base, tiny_gate_params, memorised, tmp_path_factory, monkeypatch_module, one_thread) -> dict:
    """{"correct": work dir, "shuffled": work dir} with each run's stage timings in timings.json."""
    train_file, cases = memorised
    runs = {}
    for name in ("correct", "shuffled"):
        work = tmp_path_factory.mktemp(f"tiny-{name}")
        data = train_file if name == "correct" else shuffle_answers(train_file, work / "shuffled.jsonl")
        seconds = pipeline_run(tiny_base, tiny_gate_params, data, cases, work, monkeypatch_module, eval_on_train=True)
        (work / "timings.json").write_text(json.dumps(seconds))
        runs[name] = work
    return runs


def test_the_shuffled_answers_are_every_answer_in_another_conversation(memorised, tmp_path):
    train_file, _ = memorised
    before, after = train_answers(train_file), train_answers(shuffle_answers(train_file, tmp_path / "s.jsonl"))
    assert sorted(after) == sorted(before) and all(a != b for a, b in zip(after, before, strict=True))


def test_the_stage_writes_metrics_report_and_verdict_and_scores_the_same_twice(
    tiny_base, tiny_runs, tiny_gate_params, tiny_probes, tmp_path, capsys, one_thread
):
    """The committed gate cases (8 learn, 12 keep, each with a reference) on the correctly trained tiny, twice."""
    work, cases_file = tiny_runs["correct"], DATA / "gate_cases.jsonl"
    errors: list[str] = []
    cases = load_cases(cases_file, errors)
    first = run_gate(tiny_base, work, tiny_gate_params, cases_file, tiny_probes, tmp_path / "first")
    progress = capsys.readouterr().err
    second = run_gate(tiny_base, work, tiny_gate_params, cases_file, tiny_probes, tmp_path / "second")
    passed, metrics, verdict, report = first

    # tqdm shows every model's progress: each case answered, each reference and probe scored; the base's
    # measurement is stage baseline's, the gate reads it back
    work_items = 2 * len(cases) + PROBES
    assert f"baseline: 100%|██████████| {work_items}/{work_items}" in progress
    for name in ("merged", "f16", "q8_0"):
        assert f"gate {name}: 100%|██████████| {work_items}/{work_items}" in progress
    assert "gate before" not in progress
    assert set(metrics) == {"passed", "ship", "learn", "keep", "nll", "forgetting", "unstable", "variants_passed"}
    assert metrics["passed"] is passed and metrics["ship"] == (verdict["quant"] if passed else None)
    models = {"before", "merged", "f16", "q8_0"}
    assert set(metrics["learn"]) == set(metrics["keep"]) == set(metrics["forgetting"]) == models
    assert set(metrics["nll"]["learn"]) == set(metrics["nll"]["keep"]) == models
    assert metrics["forgetting"]["before"] == 0.0 and metrics["nll"]["learn"]["before"] > 0
    assert set(metrics["variants_passed"]) == {"f16", "q8_0"}

    gguf = work / "gguf" / f"model-{verdict['quant']}.gguf"
    assert verdict["gguf"] == str(gguf)
    assert verdict["gguf_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert verdict["family"] == "llama2" and verdict["system"] is None
    assert verdict["options"] == {"temperature": 0, "top_k": 1, "seed": 42, "num_predict": 96, "repeat_penalty": 1.0}
    assert [(c["id"], c["kind"]) for c in verdict["cases"]] == [(c.id, c.kind) for c in cases]
    for row in verdict["cases"]:
        assert set(row) == {
            "id", "kind", "before", "merged", "after", "decided", "unstable", "passed", "answer", "nll_before",
            "nll_after",
        }  # fmt: skip
        case = next(c for c in cases if c.id == row["id"])
        assert row["after"] == round(case.score(row["answer"]).score, 4) and row["passed"] == (row["decided"] == 1.0)
        assert row["nll_before"] > 0 and row["nll_after"] > 0
        assert row["decided"] == row["after"] or row["unstable"]
    assert report.startswith("# Gate report\n\n**" + ("PASSED" if passed else "FAILED"))
    assert all(f"| {c.id} | {c.kind} |" in report for c in cases)

    # determinism: same model and cases, the same scores, answers and report
    assert second == first
    print(f"committed cases on tiny: learn {metrics['learn']}, keep {metrics['keep']}, passed {passed}")


def test_a_run_trained_on_shuffled_answers_fails_the_learn_rule_where_the_correct_run_passes(
    tiny_base, tiny_runs, tiny_gate_params, tiny_probes, memorised, tmp_path, one_thread
):
    """tiny memorises the 8 committed conversations MEMORISED asks about; the gate asks exactly their
    questions (learn cases written by this test: the committed learn cases paraphrase the training
    questions, which tiny cannot generalise to). Trained on the same conversations with the answers
    shuffled, tiny answers each question with another conversation's answer and misses the keyword.

    learn_min_score is 0.5 here (params.yaml: 0.75): tiny's frozen random lm_head caps its logits, so the
    first token of an answer (the one chosen from the question alone) stays uncertain and a few answers
    start wrong. Measured on this machine: see the printed scores (the report lists them)."""
    _, cases = memorised
    scores = {}
    for name, work in tiny_runs.items():
        passed, metrics, verdict, _ = run_gate(tiny_base, work, tiny_gate_params, cases, tiny_probes, tmp_path / name)
        timings = json.loads((work / "timings.json").read_text())
        print(f"tiny {name}: learn {metrics['learn']}, passed {passed}, ships {metrics['ship']}, stages {timings}")
        scores[name] = (passed, metrics, verdict)

    passed, metrics, verdict = scores["correct"]
    assert passed and verdict["passed"] and verdict["reasons"] == []
    assert metrics["learn"]["before"] == 0.0 and metrics["learn"]["merged"] >= 0.5

    passed, metrics, verdict = scores["shuffled"]
    assert not passed and not verdict["passed"]
    learn_reasons = [r for r in verdict["reasons"] if r.startswith(f"{verdict['quant']}: learn: mean score")]
    assert learn_reasons and metrics["learn"]["merged"] <= 0.125
    assert scores["correct"][1]["learn"]["merged"] - metrics["learn"]["merged"] >= 0.5


# --- SmolLM2: an overtrained run breaks what the base model knew --------------------------------------

# Keep cases the SmolLM2 base answers (keep-capital-italy it does not: "Il Coriobella, Italy.") and two learn cases.
SMOLLM2_CASES = ("keep-capital-france", "keep-two-plus-two", "keep-days-in-week", "keep-sky-colour")
SMOLLM2_LEARN = ("learn-hello-chris", "learn-hello-anna-system")
# The setting that breaks the keep cases: LoRA (r 16, alpha 32, all linear layers) at lr 2e-2, a few steps.
SMOLLM2_OVERTRAIN = {
    "max_steps": 4,
    "learning_rate": "2.0e-2",
    "early_stopping_patience": 0,
    "checkpoint_steps": 100000,
    "replay": 0,
    "outtype": "q8_0",
    "types": "[q8_0]",
    "gate.max_new_tokens": 32,
}


@pytest.mark.slow
def test_an_overtrained_smollm2_run_fails_the_keep_and_forgetting_rules_and_names_what_it_broke(
    smollm2_base, tmp_path, monkeypatch, one_thread
):
    """SmolLM2-135M-Instruct trained through the stages' CLIs at lr 2e-2 for 4 steps (8 conversations
    each): the answers the base got right turn into OPL-flavoured noise ("Laports France is the capital of
    France.", "Germany has a capital of Germany:"). Measured on this machine: 4 steps, keep 0.833 -> 0.167
    on 6 keep cases (France, days in a week, sky colour, Germany regressed; 2 + 2 kept); 3 steps, keep
    1.0 -> 0.75 on these 4 (sky colour regressed: "The sky on a clear day is a rare occurrence"), which
    still fails keep_max_drop 0.125 but by one case. lr 1e-3 for 12 epochs keeps them (docs/recipe.md's
    measurement, not repeated here). One GGUF (convert outtype q8_0, quantize.types [q8_0]) and 32 new
    tokens keep the test near 2-3 minutes."""
    errors: list[str] = []
    cases = [c for c in load_cases(DATA / "gate_cases.jsonl", errors) if c.id in SMOLLM2_CASES + SMOLLM2_LEARN]
    rows = [json.loads(line) for line in (DATA / "gate_cases.jsonl").read_text().splitlines()]
    cases_file = tmp_path / "cases.jsonl"
    cases_file.write_text("".join(json.dumps(r) + "\n" for r in rows if r["id"] in {c.id for c in cases}))
    params = tmp_path / "params.yaml"
    params.write_text(params_text((DATA.parent / "params.yaml").read_text(), SMOLLM2_OVERTRAIN))

    work = tmp_path / "run"
    seconds = pipeline_run(smollm2_base, params, DATA / "train.jsonl", cases_file, work, monkeypatch)
    started = time.perf_counter()
    (tmp_path / "probes").mkdir()
    probes = probe_answers(smollm2_base, tmp_path / "probes", 32)
    passed, metrics, verdict, report = run_gate(smollm2_base, work, params, cases_file, probes, tmp_path / "gate")
    seconds["gate"] = round(time.perf_counter() - started, 1)
    print(f"smollm2 overtrained: learn {metrics['learn']}, keep {metrics['keep']}, forgetting "
          f"{metrics['forgetting']}, reference NLL {metrics['nll']}, stages {seconds}")  # fmt: skip
    print("\n".join(line for line in report.splitlines() if line.startswith("| keep-")))

    assert metrics["keep"]["before"] == 1.0  # the base answers every keep case chosen
    assert not passed and not verdict["passed"] and verdict["quant"] == "q8_0"
    keep = [r for r in verdict["reasons"] if r.startswith("q8_0: keep: mean score fell 1.000 -> ")]
    assert len(keep) == 1, verdict["reasons"]
    regressed = keep[0].split("; regressed: ")[1].split(", ")
    after = {row["id"]: row for row in verdict["cases"]}
    assert regressed and set(regressed) <= set(SMOLLM2_CASES)
    assert all(after[case]["after"] < after[case]["before"] for case in regressed)

    forgot = [r for r in verdict["reasons"] if r.startswith(f"q8_0: forgetting: the base's own answers to {PROBES} ")]
    assert len(forgot) == 1 and "more than max_forgetting 0.25" in forgot[0], verdict["reasons"]
    assert metrics["forgetting"]["q8_0"] > 0.25 and metrics["forgetting"]["before"] == 0.0
