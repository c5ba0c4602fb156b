"""The merge request report: what this branch changes in the data, the params, the metrics and the model.

    python -m pipeline.report --target-branch main --out reports/mr.md

Sections:
- dataset: every row added, removed and changed against the target branch (read with
  `git show <target>:data/...`): a row is unchanged when the same whole conversation is still there
  (prepare's duplicate rule), changed when a new row asks a removed row's question, else added or
  removed (an invalid row too); the rows prepare will reject (row problems, duplicates, gate prompts in
  the training data, secrets: pipeline.data_checks) and the near-duplicate pairs; token statistics from the base model's
  tokenizer and chat template when it can be loaded here, else whitespace words (the report says which);
  gate cases added, removed and changed by id;
- what would retrain: the stages `dvc repro --dry --allow-missing` would run, and what depends on them;
- `dvc params diff --md` and `dvc metrics diff --md` against the target;
- the gate's before/after table (reports/gate.md, metrics/gate.json) when a candidate was trained;
- pictures (pipeline/plots.py), written beside the report as mr-*.png and linked by relative path: the
  train and eval loss curves of this branch (plots/) against the target's (reports/target-plots/, which
  the candidate job exports), the candidate's gate per measure and model with the thresholds, a sweep's
  plot (reports/sweep/*.png) and any picture listed in EXTRA_PICTURES; `python -m pipeline.gitlab_notes`
  uploads them into the note;
- links to the job artifacts (plots) built from GitLab's CI variables.
The target is `origin/<branch>` when that ref exists (CI fetches it), else the local branch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cases import load_cases
from pipeline.common import PipelineError, get_logger, run_cli, write_bytes_atomic, write_text_atomic
from pipeline.data_checks import Review, review
from pipeline.data_stats import histogram_png
from pipeline.dataset import Example, conversation_key, conversations_of_rows, jsonl_rows, parse_example, question_key
from pipeline.dvc_status import (
    declared_stages,
    downstream_of,
    edited_release_files,
    release_files,
    run,
    stale_stages,
)
from pipeline.params import DataParams, GateParams, load_params
from pipeline.plots import Picture, Run, gate_png, loss_png, read_curve
from pipeline.sensitive import load_allowlist

CONVERSATION_FILES = ("data/train.jsonl", "data/eval.jsonl")
CASES_FILE = "data/gate_cases.jsonl"
ALLOWLIST_FILE = "data/sensitive_allowlist.txt"
GATE_REPORT = Path("reports/gate.md")
GATE_METRICS = Path("metrics/gate.json")
PLOTS = Path("plots")  # the train stage's {train,eval}/loss.tsv
TARGET_PLOTS = Path("reports/target-plots")  # the same files of the target branch, when a job exported them
SWEEP_REPORTS = Path("reports/sweep")  # pipeline.sweep's <sweep>.png
# Pictures other tooling writes, embedded when the file exists: (path in the project, alt text). The hook
# for pictures of the dataset, e.g. the token-length histogram of prepare.
EXTRA_PICTURES: list[tuple[str, str]] = []
LISTED = 15  # examples listed per change kind; the counts are always complete
PROMPT_CHARS = 90

log = get_logger("report")


# --- git and dvc (DVC's view of the stages: pipeline.dvc_status) ---


def resolve_target(branch: str, cwd: Path) -> str:
    """`origin/<branch>` if fetched, else `<branch>`; a clear error when neither exists."""
    for ref in (f"origin/{branch}", branch):
        if run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd).returncode == 0:
            return ref
    raise PipelineError(
        f"target branch {branch!r}: neither origin/{branch} nor {branch} exists here (in CI: git fetch origin {branch})"
    )


def file_at(ref: str, path: str, cwd: Path) -> str | None:
    """The file's text at `ref`, or None when it does not exist there."""
    result = run(["git", "show", f"{ref}:{path}"], cwd)
    return result.stdout if result.returncode == 0 else None


def dvc_markdown(command: list[str], cwd: Path) -> str:
    """A `dvc ... --md` table, or what DVC said instead (missing metrics are common: they live in the remote)."""
    result = run(command, cwd)
    table = result.stdout.strip()
    notes = [line for line in result.stderr.splitlines() if line.strip()]
    if result.returncode != 0:
        return f"`{' '.join(command)}` failed: {' '.join(notes)[-400:] or 'no message'}"
    lines = table.splitlines()
    text = table if len(lines) > 2 else "No differences."
    if notes:
        text += "\n\n" + "\n".join(f"> {line}" for line in notes)
    return text


# --- dataset ---


@dataclass
class Changes:
    added: list = field(default_factory=list)
    removed: list = field(default_factory=list)
    changed: list = field(default_factory=list)  # (old, new)
    unchanged: int = 0


@dataclass(frozen=True)
class Row:
    """One non-blank line of a conversation file, valid or not: the report counts every row."""

    line: int
    messages: list[dict] | None  # None: not a valid conversation (prepare rejects it)
    text: str

    def key(self) -> str:
        """Unchanged means the same whole conversation (prepare's duplicate rule), else the same line."""
        return conversation_key(self.messages) if self.messages else "line:" + self.text.strip()

    def question(self) -> str | None:
        return question_key(self.messages) if self.messages else None


def rows_of(text: str | None, source: str) -> tuple[list[Row], list[str], list[Example]]:
    """(every non-blank row, what prepare rejects in this file as `file:line: reason`, its valid conversations)."""
    rows: list[Row] = []
    for number, line in enumerate((text or "").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            messages, _, problems = parse_example(json.loads(line))
        except json.JSONDecodeError:
            messages, problems = None, ["invalid JSON"]
        rows.append(Row(number, None if problems else messages, line))
    rejected: list[str] = []
    examples = conversations_of_rows(jsonl_rows(text or "", source, rejected), source, rejected)
    return rows, rejected, examples


def data_review(cwd: Path, train: list[Example], evaluation: list[Example]) -> Review:
    """prepare's checks across the files (gate prompts, secrets, near-duplicates) on this branch's data."""
    try:
        data = load_params(cwd / "params.yaml").data
    except PipelineError:
        data = DataParams()  # the params job reports the params; the data is still worth checking
    errors: list[str] = []
    cases = load_cases(cwd / CASES_FILE, errors)
    allowlist = load_allowlist(cwd / ALLOWLIST_FILE)
    return review(train, evaluation, cases, CASES_FILE, data, allowlist, ALLOWLIST_FILE)


def compare_rows(old: list[Row], new: list[Row]) -> Changes:
    """Rows matched as a multiset of whole conversations; of the rest, a new row that asks an old row's
    question is that row changed (in file order), any other new row is added, any other old row removed."""
    pending: dict[str, list[Row]] = {}
    for row in old:
        pending.setdefault(row.key(), []).append(row)
    changes, unmatched = Changes(), []
    for row in new:
        if pending.get(row.key()):
            pending[row.key()].pop(0)
            changes.unchanged += 1
        else:
            unmatched.append(row)
    left = sorted((row for rows in pending.values() for row in rows), key=lambda row: row.line)
    by_question: dict[str, list[Row]] = {}
    for row in left:
        if row.question() is not None:
            by_question.setdefault(row.question(), []).append(row)
    paired: set[int] = set()
    for row in unmatched:
        candidates = by_question.get(row.question() or "", [])
        if candidates:
            previous = candidates.pop(0)
            paired.add(previous.line)
            changes.changed.append((previous, row))
        else:
            changes.added.append(row)
    changes.removed = [row for row in left if row.line not in paired]
    return changes


def compare(old: dict, new: dict) -> Changes:
    """Keyed records (gate cases by id): added, removed, changed."""
    changes = Changes()
    for key, value in new.items():
        if key not in old:
            changes.added.append(value)
        elif old[key] != value:
            changes.changed.append((old[key], value))
        else:
            changes.unchanged += 1
    changes.removed = [value for key, value in old.items() if key not in new]
    return changes


@dataclass(frozen=True)
class Counter:
    count: Callable[[list[dict]], int]
    unit: str  # "tokens" or "words"
    how: str  # one sentence for the report


def word_counter(reason: str) -> Counter:
    return Counter(
        lambda messages: sum(len(m["content"].split()) for m in messages),
        "words",
        f"Lengths are whitespace-separated **words**: the base model's tokenizer is not available here ({reason}).",
    )


def make_counter(params_path: Path, corpus: list[str], scratch: Path) -> Counter:
    """Token counts with the base model's tokenizer and chat template (as prepare counts), else words."""
    try:
        from pipeline.models import load_tokenizer, token_counter

        base = load_params(params_path).base
        tokenizer = load_tokenizer(base, corpus, scratch)
    except Exception as error:  # any failure to load (offline hub model, missing package) falls back to words
        return word_counter(f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}")
    return Counter(
        token_counter(tokenizer), "tokens", f"Lengths are **tokens** of `{base.model}` after its chat template."
    )


def length_stats(conversations: list[list[dict]], counter: Counter) -> dict:
    lengths = [counter.count(messages) for messages in conversations]
    return {
        "conversations": len(lengths),
        "total": sum(lengths),
        "mean": round(sum(lengths) / len(lengths), 1) if lengths else 0,
        "max": max(lengths, default=0),
    }


def first_question(messages: list[dict]) -> str:
    text = " ".join(next((m["content"] for m in messages if m["role"] == "user"), "").split())
    text = text if len(text) <= PROMPT_CHARS else text[: PROMPT_CHARS - 1] + "…"
    return text.replace("|", "\\|").replace("`", "'")


def signed(value: float) -> str:
    return f"{value:+g}" if value else "0"


def dataset_section(target: str, cwd: Path, counter_factory: Callable[[list[str]], Counter]) -> list[str]:
    files = {
        path: (file_at(target, path, cwd), (cwd / path).read_text(encoding="utf-8")) for path in CONVERSATION_FILES
    }
    parsed = {path: (rows_of(old, path), rows_of(new, path)) for path, (old, new) in files.items()}
    found = data_review(cwd, *(parsed[path][1][2] for path in CONVERSATION_FILES))
    # the `tiny` base builds its tokenizer from the training text, as prepare does
    training = [row.messages for row in parsed[CONVERSATION_FILES[0]][1][0] if row.messages]
    counter = counter_factory([m["content"] for messages in training for m in messages])
    lines = ["## Dataset", "", counter.how, ""]
    lines += [
        f"| file | conversations | added | removed | changed | {counter.unit} total | mean | max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    details: list[str] = []
    for path, ((old, _, _), (new, rejected, _)) in parsed.items():
        rejected = rejected + [error for error in found.errors if error.startswith(f"{path}:")]
        changes = compare_rows(old, new)
        before = length_stats([row.messages for row in old if row.messages], counter)
        after = length_stats([row.messages for row in new if row.messages], counter)
        lines.append(
            f"| `{path}` | {len(old)} → {len(new)} | {len(changes.added)} | "
            f"{len(changes.removed)} | {len(changes.changed)} | {before['total']} → {after['total']} "
            f"({signed(after['total'] - before['total'])}) | {before['mean']} → {after['mean']} | "
            f"{before['max']} → {after['max']} |"
        )
        if files[path][0] is None:
            details.append(f"- `{path}` is new on this branch.")
        if rejected:
            details.append(f"- `{path}`: prepare will reject {len(rejected)} row(s) (the data job stops):")
            details += [f"  - `{problem}`" for problem in rejected[:LISTED]]
            details += [f"  - … {len(rejected) - LISTED} more"] if len(rejected) > LISTED else []
        details += change_list(path, changes, counter)
    warnings = found.warnings()
    if warnings:
        details.append(f"- {len(warnings)} near-duplicate pair(s) (warnings, both places named):")
        details += [f"  - `{warning}`" for warning in warnings[:LISTED]]
        details += [f"  - … {len(warnings) - LISTED} more"] if len(warnings) > LISTED else []
    lines += ["", *details] if details else []
    return lines


def change_list(path: str, changes: Changes, counter: Counter) -> list[str]:
    def size(row: Row) -> int:
        return counter.count(row.messages) if row.messages else 0

    rows = [("added", row, size(row)) for row in changes.added]
    rows += [("removed", row, -size(row)) for row in changes.removed]
    rows += [("changed", new, size(new) - size(old)) for old, new in changes.changed]
    if not rows:
        return []
    lines = [f"<details><summary><code>{path}</code>: {len(rows)} change(s)</summary>", ""]
    lines += [f"| change | line | first question | Δ {counter.unit} |", "|---|---:|---|---:|"]
    lines += [
        f"| {kind} | {row.line} | {first_question(row.messages) if row.messages else '(not a valid conversation)'} "
        f"| {signed(delta)} |"
        for kind, row, delta in rows[:LISTED]
    ]
    if len(rows) > LISTED:
        lines.append(f"| … | | {len(rows) - LISTED} more | |")
    return [*lines, "", "</details>", ""]


def cases_of(text: str | None) -> dict[str, dict]:
    cases = {}
    for line in (text or "").splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("id"), str):
            cases[row["id"]] = row
    return cases


def inline(text: str) -> str:
    """User text (a case id) on one line, in a code span: a newline in it cannot start a line of the note
    (where GitLab would run `/label ...` as a quick action) nor end the span."""
    return " ".join(text.split()).replace("`", "'")


def cases_section(target: str, cwd: Path) -> list[str]:
    changes = compare(cases_of(file_at(target, CASES_FILE, cwd)), cases_of((cwd / CASES_FILE).read_text()))
    summary = (
        f"Gate cases (`{CASES_FILE}`): {len(changes.added)} added, {len(changes.removed)} removed, "
        f"{len(changes.changed)} changed, {changes.unchanged} unchanged."
    )
    named = [f"added `{inline(c['id'])}`" for c in changes.added]
    named += [f"removed `{inline(c['id'])}`" for c in changes.removed]
    named += [f"changed `{inline(new['id'])}`" for _, new in changes.changed]
    return [summary + (" " + ", ".join(named[:LISTED]) + "." if named else "")]


# --- pipeline, gate, links ---


def retrain_section(cwd: Path) -> list[str]:
    stale = stale_stages(cwd)
    if not stale:
        return [
            "## What would retrain",
            "",
            "Nothing: no stage's code, data, params or command changed (`dvc repro --dry --allow-missing`). "
            "Merging this reuses the current model.",
        ]
    after = downstream_of(stale, cwd)
    lines = ["## What would retrain", "", f"Inputs changed for: {', '.join(f'`{s}`' for s in stale)}."]
    if after:
        lines.append(f"Downstream, rerun when those outputs change: {', '.join(f'`{s}`' for s in after)}.")
    return lines


def release_edits_section(target: str, cwd: Path) -> list[str]:
    """A merge request that edits dvc.lock or the gate's outputs: only a retrain on the default branch
    writes them (what deploys reads), so a reviewer must see it."""
    changed = run(["git", "diff", "--name-only", f"{target}...HEAD"], cwd).stdout.splitlines()
    try:
        edited = edited_release_files(changed, release_files(declared_stages(cwd)))
    except PipelineError as error:
        return ["## Release files", "", f"Not checked: {error}"]
    if not edited:
        return []
    return [
        "## Release files edited",
        "",
        f"**This merge request edits {', '.join(f'`{path}`' for path in edited)}**, which only the pipeline writes "
        "(a retrain commits them on the default branch; deploy reads them). `python -m pipeline.ci stale` "
        "refuses a hand-edited one. Drop these changes unless a pipeline wrote them.",
    ]


def written_in_this_pipeline(cwd: Path, path: Path) -> bool:
    """The file exists and is not the version git has at HEAD: the committed gate files describe the
    model of the commit the MR starts from, not a candidate."""
    if not (cwd / path).is_file():
        return False
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(path)], cwd=cwd, capture_output=True)
    if tracked.returncode:
        return True
    return subprocess.run(["git", "diff", "--quiet", "HEAD", "--", str(path)], cwd=cwd).returncode != 0


def gate_section(cwd: Path) -> list[str]:
    table, metrics = cwd / GATE_REPORT, cwd / GATE_METRICS
    if not (written_in_this_pipeline(cwd, GATE_REPORT) or written_in_this_pipeline(cwd, GATE_METRICS)):
        return [
            "## Gate",
            "",
            "No candidate was trained in this pipeline (add the `train-candidate` label to train one on the GPU "
            "runner and get the before/after table here).",
        ]
    lines = ["## Gate (candidate)", ""]
    if metrics.is_file():
        try:
            passed = json.loads(metrics.read_text()).get("passed")
        except (json.JSONDecodeError, AttributeError):
            passed = None
        lines.append({True: "**Verdict: passed.**", False: "**Verdict: FAILED.**"}.get(passed, "Verdict: unknown."))
        lines.append("")
    if table.is_file():
        lines.append(table.read_text(encoding="utf-8").strip())
    return lines


# --- pictures (pipeline/plots.py draws them) ---


def curves_in(directory: Path) -> tuple:
    return tuple(
        read_curve(path.read_text(encoding="utf-8"), str(path)) if path.is_file() else None
        for path in (directory / "train" / "loss.tsv", directory / "eval" / "loss.tsv")
    )


def loss_picture(cwd: Path, head: str, target: str) -> Picture | None:
    """This branch's loss curves against the target's, when either was written here."""
    runs = [Run(f"this branch ({head})", *curves_in(cwd / PLOTS)), Run(target, *curves_in(cwd / TARGET_PLOTS))]
    if not any(run.train or run.eval for run in runs):
        return None
    missing = [run.label for run in runs if not (run.train or run.eval)]
    caption = "Train and eval loss per training step, this branch (solid) against the target (dashed)."
    if missing:
        caption += f" No loss curves of {', '.join(missing)} here."
    return Picture(
        "mr-loss.png", f"Loss curves: train and eval loss per step, {head} against {target}", caption, loss_png(runs)
    )


def gate_picture(cwd: Path, target: str) -> Picture | None:
    """The candidate's gate results per measure and model, the thresholds, the target's results marked."""
    if not written_in_this_pipeline(cwd, GATE_METRICS):
        return None
    try:
        candidate = json.loads((cwd / GATE_METRICS).read_text(encoding="utf-8"))
        old = json.loads(file_at(target, str(GATE_METRICS), cwd) or "null")
    except json.JSONDecodeError as error:
        log.warning("no gate picture: %s is not JSON (%s)", GATE_METRICS, error)
        return None
    try:
        rules = load_params(cwd / "params.yaml").gate
    except PipelineError as error:
        log.warning("gate picture: %s; thresholds of the defaults drawn", error)
        rules = GateParams()
    alt = "Gate chart: learn and keep scores, reference NLLs and forgetting of the base, merged model and each GGUF"
    caption = (
        "The candidate's gate: one bar per model (grey the base, blue merged, green/red each GGUF passing/failing), "
        f"the pass threshold dashed, `{target}`'s results as black diamonds."
    )
    data = gate_png(
        candidate if isinstance(candidate, dict) else {}, old if isinstance(old, dict) else None, rules, target
    )
    return Picture("mr-gate.png", alt, caption, data)


def file_pictures(cwd: Path, extra: Sequence[tuple[str, str]]) -> list[Picture]:
    """PNGs other commands wrote: a sweep's plot, and the EXTRA_PICTURES that exist."""
    found = [
        (path, f"mr-sweep-{path.stem}.png", f"Sweep {path.stem}: learn score against forgetting per experiment")
        for path in sorted((cwd / SWEEP_REPORTS).glob("*.png"))
    ]
    found += [(cwd / path, f"mr-{Path(path).stem}.png", alt) for path, alt in extra if (cwd / path).is_file()]
    return [Picture(filename, alt, f"{alt}.", path.read_bytes()) for path, filename, alt in found]


def lengths_picture(
    cwd: Path, target: str, counter_factory: Callable[[list[str]], Counter], max_seq_length: int
) -> Picture | None:
    """Tokens per conversation of this branch's train and eval files against the target's (prepare's
    histogram, pipeline/data_stats.py), so a reviewer sees what the MR adds to the length distribution."""
    series: dict[str, list[list[dict]]] = {}
    for path in CONVERSATION_FILES:
        for label, text in (
            ("this branch", (cwd / path).read_text(encoding="utf-8")),
            (target, file_at(target, path, cwd)),
        ):
            rows = rows_of(text, path)[0] if text else []
            series[f"{Path(path).stem} ({label})"] = [row.messages for row in rows if row.messages]
    if not any(series.values()):
        return None
    training = [m["content"] for messages in series["train (this branch)"] for m in messages]
    counter = counter_factory(training)
    lengths = {label: [counter.count(messages) for messages in rows] for label, rows in series.items() if rows}
    alt = f"Histogram of {counter.unit} per conversation, train and eval, this branch against {target}"
    caption = (
        f"{counter.unit.capitalize()} per conversation; the dashed line is data.max_seq_length ({max_seq_length})."
    )
    return Picture("mr-data-lengths.png", alt, caption, histogram_png(lengths, max_seq_length))


def pictures_of(cwd: Path, target: str, extra: Sequence[tuple[str, str]] = ()) -> list[Picture]:
    head = run(["git", "rev-parse", "--short", "HEAD"], cwd).stdout.strip() or "workspace"
    drawn = [loss_picture(cwd, head, target), gate_picture(cwd, target)]
    return [picture for picture in drawn if picture] + file_pictures(cwd, extra)


def pictures_section(pictures: Sequence[Picture]) -> list[str]:
    """Each picture linked by its file name (beside the report), its alt text saying what it shows."""
    if not pictures:
        return []
    lines = ["## Pictures"]
    for picture in pictures:
        lines += ["", f"![{picture.alt}]({picture.filename})", "", f"*{picture.caption}*"]
    return lines


def links_section(env: dict[str, str]) -> list[str]:
    """Links into GitLab for this job's artifacts and the candidate's plots (job id from PLOTS_JOB_ID)."""
    project, job = env.get("CI_PROJECT_URL"), env.get("CI_JOB_ID")
    if not project or not job:
        return []
    lines = ["## Links", "", f"- [This report and its inputs (job artifacts)]({project}/-/jobs/{job}/artifacts/browse)"]
    plots_job = env.get("PLOTS_JOB_ID")
    if plots_job:
        artifacts = f"{project}/-/jobs/{plots_job}/artifacts"
        lines.append(f"- [Loss plots of the candidate]({artifacts}/browse/plots)")
        lines.append(f"- [Plots diff against the target (HTML)]({artifacts}/file/reports/plots/index.html)")
    return lines


def build_report(
    cwd: Path,
    target_branch: str,
    env: dict[str, str],
    counter_factory: Callable[[list[str]], Counter],
    pictures: Sequence[Picture] = (),
) -> str:
    target = resolve_target(target_branch, cwd)
    head = run(["git", "rev-parse", "--short", "HEAD"], cwd).stdout.strip() or "workspace"
    sections = [
        [f"# Merge request report: `{head}` against `{target}`"],
        dataset_section(target, cwd, counter_factory),
        cases_section(target, cwd),
        release_edits_section(target, cwd),
        retrain_section(cwd),
        ["## Params", "", dvc_markdown(["dvc", "params", "diff", "--md", target], cwd)],
        ["## Metrics", "", dvc_markdown(["dvc", "metrics", "diff", "--md", target], cwd)],
        gate_section(cwd),
        pictures_section(pictures),
        links_section(env),
    ]
    return "\n\n".join("\n".join(section) for section in sections if section) + "\n"


def max_seq_length(params_path: Path) -> int:
    try:
        return load_params(params_path).data.max_seq_length
    except PipelineError as error:
        log.warning("data lengths: %s; the default data.max_seq_length drawn", error)
        return DataParams().max_seq_length


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n")[0])
    parser.add_argument("--target-branch", default="main", help="branch to compare with (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("reports/mr.md"), help="Markdown file to write")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="for the base model's tokenizer")
    parser.add_argument("--words", action="store_true", help="count words, do not load the tokenizer")
    args = parser.parse_args(argv)

    cwd = Path.cwd()
    with tempfile.TemporaryDirectory() as scratch:
        made: dict[tuple[str, ...], Counter] = {}

        def counter_factory(corpus: list[str]) -> Counter:
            if args.words:
                return word_counter("--words was given")
            # the dataset table and the length histogram count the same training text: one tokenizer load
            if tuple(corpus) not in made:
                made[tuple(corpus)] = make_counter(args.params, corpus, Path(scratch))
            return made[tuple(corpus)]

        target = resolve_target(args.target_branch, cwd)
        pictures = pictures_of(cwd, target, EXTRA_PICTURES)
        lengths = lengths_picture(cwd, target, counter_factory, max_seq_length(args.params))
        pictures = [*([lengths] if lengths else []), *pictures]
        text = build_report(cwd, args.target_branch, dict(os.environ), counter_factory, pictures)
    for picture in pictures:  # beside the report: its relative links work in any Markdown viewer
        write_bytes_atomic(args.out.parent / picture.filename, picture.data)
    write_text_atomic(args.out, text)
    log.info("wrote %s (%d lines, %d pictures)", args.out, text.count("\n"), len(pictures))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
