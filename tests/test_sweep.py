"""Sweep files and the gate's ranking, without running DVC (tests/test_sweep_dvc.py runs real experiments)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.common import PipelineError
from pipeline.sweep import COLLECT_JOB, child_pipeline, gitlab_settings
from pipeline.sweep_spec import load_sweep, markdown_table, outcome, parse_sweep, rank, sweep_experiments

ROOT = Path(__file__).resolve().parent.parent
PARAMS = (ROOT / "params.yaml").read_text()


def errors_of(text: str) -> list[str]:
    with pytest.raises(PipelineError) as caught:
        parse_sweep(text, PARAMS, "sweeps/x.yaml", "x")
    return [line.strip() for line in str(caught.value).splitlines()[1:]]


def test_the_example_recipe_sweep_is_a_2x2_grid_of_four_points_in_file_order():
    sweep = load_sweep(ROOT / "sweeps" / "recipe.yaml", ROOT / "params.yaml")
    assert sweep.name == "recipe" and sweep.max_points == 4
    assert [sweep.experiment(p) for p in sweep.points] == ["recipe-1", "recipe-2", "recipe-3", "recipe-4"]
    assert [p.overrides for p in sweep.points] == [
        {"train.replay": 0.5, "train.max_steps": 42},
        {"train.replay": 0.5, "train.max_steps": 60},
        {"train.replay": 1.0, "train.max_steps": 42},
        {"train.replay": 1.0, "train.max_steps": 60},
    ]
    assert sweep.points[0].set_args() == ["-S", "train.replay=0.5", "-S", "train.max_steps=42"]


def test_the_fanned_out_recipe_is_one_gpu_job_per_point_and_a_collecting_job_that_needs_them_all():
    child = child_pipeline(load_sweep(ROOT / "sweeps" / "recipe.yaml", ROOT / "params.yaml"))
    points = ["recipe-1", "recipe-2", "recipe-3", "recipe-4"]
    jobs = {name: job for name, job in child.items() if name not in ("stages", "default", "variables")}
    assert list(jobs) == [*points, COLLECT_JOB]
    overrides = [
        "-S train.replay=0.5 -S train.max_steps=42",
        "-S train.replay=0.5 -S train.max_steps=60",
        "-S train.replay=1.0 -S train.max_steps=42",
        "-S train.replay=1.0 -S train.max_steps=60",
    ]
    for name, sets in zip(points, overrides, strict=True):
        job = jobs[name]
        assert job["tags"] == ["gpu"] and job["stage"] == "train" and "needs" not in job and "resource_group" not in job
        assert job["variables"] == {"LLM_GITOPS_GATE_NO_FAIL": "1"}
        # the push token is scoped to the parent's git-push environment: the point must name it to get it
        assert job["environment"] == {"name": "git-push", "action": "prepare"}
        assert job["script"][1:] == [f"dvc exp run --pull gate -n {name} {sets}", f"dvc exp push origin {name}"]
        assert job["script"][0].startswith(".ci/push-auth || ")  # no token: fails before it trains
    collect = jobs[COLLECT_JOB]
    assert collect["needs"] == points and collect["when"] == "always" and collect["tags"] == ["gpu"]
    assert "for name in recipe-1 recipe-2 recipe-3 recipe-4; do dvc exp pull origin" in collect["script"][0]
    assert collect["script"][1] == "python -m pipeline.sweep show recipe"
    assert collect["artifacts"]["paths"] == ["reports/sweep/"]
    # a child pipeline gets nothing of the parent's configuration: it sets up its own jobs
    assert child["default"] == {"before_script": ["source .ci/env"]} and child["variables"]["GIT_DEPTH"] == "0"


def test_a_point_value_is_quoted_for_the_shell_in_the_generated_job():
    sweep = parse_sweep("points:\n  - {train.lora.target_modules: [q_proj, v_proj]}\n", PARAMS, "sweeps/x.yaml", "x")
    run = child_pipeline(sweep)["x-1"]["script"][1]
    assert (
        run
        == "dvc exp run --pull gate -n x-1 -S 'train.lora.target_modules=['\"'\"'q_proj'\"'\"','\"'\"'v_proj'\"'\"']'"
    )


def test_grid_points_come_first_then_the_listed_points_with_hydra_style_overrides():
    text = "grid:\n  train.lora.r: [8, 16]\npoints:\n"
    text += "  - {train.learning_rate: 3.0e-4, train.lora.target_modules: [q_proj]}\n"
    sweep = parse_sweep(text, PARAMS, "sweeps/x.yaml", "x")
    assert [p.overrides for p in sweep.points] == [
        {"train.lora.r": 8},
        {"train.lora.r": 16},
        {"train.learning_rate": 3.0e-4, "train.lora.target_modules": ["q_proj"]},
    ]
    assert sweep.points[2].set_args() == [
        "-S",
        "train.learning_rate=0.0003",
        "-S",
        "train.lora.target_modules=['q_proj']",
    ]
    assert sweep.keys == ["train.lora.r", "train.learning_rate", "train.lora.target_modules"]


def test_an_unknown_key_names_its_line_and_the_known_keys():
    assert errors_of("grid:\n  train.lora.r: [8]\n  train.learning_rat: [1.0e-3]\n  trian.seed: [1]\n") == [
        "sweeps/x.yaml:3: train.learning_rat: unknown key (known: seed, epochs, max_steps, cycles, fit_nll, fit_learn, "
        "replay, replay_kl, question_noise, neftune_alpha, batch_size, grad_accum, learning_rate, scheduler, "
        "warmup_ratio, weight_decay, max_grad_norm, lora, qlora, "
        "pad_token, gradient_checkpointing, bf16, padding_free, attention, packing, optimizer, liger, "
        "num_processes, checkpoint_steps, early_stopping_patience, keep_best, logging_steps, cpu_threads)",
        "sweeps/x.yaml:4: trian.seed: unknown key (known: data, base, base_answers, train, merge, convert, quantize, "
        "gate, modelfile, deploy)",
    ]


def test_wrong_types_and_impossible_values_are_params_yaml_errors_at_the_values_line():
    text = "grid:\n  train.lora.r:\n    - 8\n    - sixteen\n  train.max_steps: [0, 42]\n"
    text += "points:\n  - {train.learning_rate: 1e-3}\n"
    assert errors_of(text) == [
        "sweeps/x.yaml:4: train.lora.r: expected an integer, got 'sixteen'",
        "sweeps/x.yaml:5: train.max_steps: must be -1 or > 0, got 0",
        "sweeps/x.yaml:7: train.learning_rate: expected a number, got '1e-3'"
        " (YAML reads 1e-3 as a string: write 1.0e-3)",
    ]


def test_an_empty_grid_a_value_that_is_no_list_and_a_section_are_refused():
    assert errors_of("grid: {}\n") == ["sweeps/x.yaml:1: grid: empty grid: map params.yaml keys to lists of values"]
    assert errors_of("grid:\n  train.replay: []\n  train.seed: 7\n  train.lora: [8]\n") == [
        "sweeps/x.yaml:2: train.replay: empty list: a grid key needs at least one value",
        "sweeps/x.yaml:3: train.seed: expected a list of values, got 7",
        "sweeps/x.yaml:4: train.lora: expected a mapping of keys",
    ]
    assert errors_of("name: recipe\n") == ["sweeps/x.yaml:1: (top level): no grid and no points: nothing to run"]


def test_more_points_than_max_points_and_unknown_top_level_keys_are_refused():
    text = "max_points: 3\ngrid:\n  train.replay: [0.5, 1.0]\n  train.max_steps: [42, 60]\nmax_point: 2\n"
    assert errors_of(text) == [
        "sweeps/x.yaml:1: max_points: the sweep has 4 points, more than 3",
        "sweeps/x.yaml:5: max_point: unknown key (known: name, max_points, grid, points)",
    ]
    assert errors_of("name: two words\ngrid:\n  train.seed: [1]\n") == [
        "sweeps/x.yaml:1: name: must be letters, digits, '.', '_' or '-' (an experiment name), got 'two words'"
    ]


def test_the_cli_reports_a_bad_sweep_file_before_running_anything(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  train.replay: [-1.0]\n")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.sweep", "run", str(bad)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr == f"error: invalid sweep:\n  {bad}:2: train.replay: must be >= 0, got -1.0\n"


def experiment(name: str, passed: bool, learn: float, forgetting: float, keep: float, ship: str | None) -> dict:
    """One entry of `dvc exp show --json`'s experiments, as DVC 3 writes it."""
    data = {
        "rev": f"rev-{name}",
        "params": {"params.yaml": {"data": {"train": {"max_steps": 42, "replay": learn}, "gate": {"seed": 42}}}},
        "metrics": {
            "metrics/gate.json": {
                "data": {
                    "passed": passed,
                    "ship": ship,
                    "learn": {"before": 0.0, "merged": learn, "q4_k_m": learn},
                    "keep": {"before": 0.9, "merged": keep, "q4_k_m": keep},
                    "forgetting": {"merged": forgetting, "q4_k_m": forgetting},
                }
            },
            "metrics/train.json": {"data": {"runtime_s": 12.5, "steps": 42}},
            "metrics/convert.json": {"data": {"outtype": "f16", "bytes": 2_000_000}},
            "metrics/quantize/q4_k_m.json": {"data": {"bytes": 700_000}},
        },
    }
    return {"revs": [{"rev": data["rev"], "name": name, "data": data}], "name": name}


SHOWN = [
    {"rev": "workspace", "name": None, "data": {}, "experiments": None},
    {
        "rev": "abc",
        "name": "main",
        "experiments": [
            experiment("s-1", False, 0.9, 0.01, 0.9, None),
            experiment("s-2", True, 0.8, 0.20, 0.9, "q4_k_m"),
            experiment("s-3", True, 0.8, 0.10, 0.9, "q4_k_m"),
            experiment("s-4", True, 0.9, 0.30, 0.5, "q4_k_m"),
            experiment("other-1", True, 1.0, 0.0, 1.0, "q4_k_m"),
        ],
    },
]


def test_ranking_puts_passed_first_then_learn_then_forgetting_and_failed_last_with_its_reason():
    found = sweep_experiments(SHOWN, "s")
    assert [name for name, _ in found] == ["s-1", "s-2", "s-3", "s-4"]  # not other-1
    outcomes = [outcome(name, data, [] if name != "s-1" else ["no GGUF passed the gate"]) for name, data in found]
    ranked = rank(outcomes)
    assert [o.name for o in ranked] == ["s-4", "s-3", "s-2", "s-1"]
    assert ranked[0].gguf_bytes == 700_000 and ranked[0].runtime_s == 12.5
    assert ranked[-1].reasons == ["no GGUF passed the gate"] and ranked[-1].learn == 0.9  # the merged model's
    table = markdown_table(ranked, "s")
    assert "| `train.replay` |" in table and "`train.max_steps`" not in table  # only the params that differ
    assert "| 1 | `s-4` | 0.9 | passed | q4_k_m | 0.900 | 0.500 | 0.300 | 0.7 | 12.5 | 42 |" in table
    assert "| 4 | `s-1` | 0.9 | failed: no GGUF passed the gate | – | 0.900 | 0.900 | 0.010 | – | 12.5 | 42 |" in table


def test_equal_gate_numbers_rank_by_name_so_the_order_never_depends_on_dvc():
    found = [(n, d) for n, d in sweep_experiments(SHOWN, "s") if n in ("s-2", "s-3")]
    same = [outcome(name, {**data, "metrics": found[0][1]["metrics"]}, []) for name, data in reversed(found)]
    assert [o.name for o in rank(same)] == ["s-2", "s-3"]


def test_the_merge_request_needs_a_token_the_api_url_and_the_project():
    env = {"CI_API_V4_URL": "https://gitlab.example.com/api/v4", "CI_PROJECT_ID": "42"}
    assert gitlab_settings(env) is None
    assert gitlab_settings({**env, "GITLAB_TOKEN": "t"}) == ("https://gitlab.example.com", "42", "t")
    assert gitlab_settings({**env, "GITLAB_REPORT_TOKEN": "r"}) == ("https://gitlab.example.com", "42", "r")


def double_the_queue(monkeypatch, queue_tasks, workers: int = 0, start_worker=lambda: None, sleep=lambda s: None):
    """pipeline.sweep with `dvc queue` replaced: `queue_tasks` gives each poll's lines, `workers` the count."""
    from pipeline import sweep as sweep_cli

    monkeypatch.setattr(sweep_cli, "queue_tasks", queue_tasks)
    monkeypatch.setattr(sweep_cli, "dvc", lambda *args: "")
    monkeypatch.setattr(sweep_cli, "shown", lambda rev="HEAD": [])
    monkeypatch.setattr(sweep_cli, "start_worker", start_worker)
    monkeypatch.setattr(sweep_cli, "stop_workers", lambda: None)
    monkeypatch.setattr(sweep_cli, "queue_workers", lambda: workers)
    monkeypatch.setattr(sweep_cli.time, "sleep", sleep)


def test_a_point_removed_from_the_queue_ends_the_sweep_with_a_warning_instead_of_waiting_forever(monkeypatch, caplog):
    """`dvc queue remove <name>` takes a point off the queue: it never finishes, and the sweep used to poll for it
    forever. The queue here is a double of `dvc queue status`'s lines; the other points finished."""
    from pipeline import sweep as sweep_cli
    from pipeline.sweep import Task

    sweep = load_sweep(ROOT / "sweeps" / "recipe.yaml", ROOT / "params.yaml")
    polls = iter(range(1000))

    def queue_tasks():
        if next(polls) < 2:
            return []  # the leftover check and the snapshot before queuing: an empty queue
        finished = [Task(f"t{i}", f"recipe-{i}", "Success") for i in (1, 2, 4)]  # recipe-3 was removed
        return finished

    double_the_queue(monkeypatch, queue_tasks)

    with caplog.at_level("WARNING"):
        tasks = sweep_cli.run_sweep(sweep, replace=False)

    assert [t.name for t in tasks] == ["recipe-1", "recipe-2", "recipe-4"]
    assert "1 point(s) left the queue without running (removed?): recipe-3" in caplog.text


def test_the_queue_is_polled_a_second_after_a_change_then_less_often_up_to_fifteen_seconds(monkeypatch):
    """Each poll is a `dvc queue status` process (about 1 s of CPU beside the training): a point seen
    running is polled after 1, 1.5, 2.25 ... s, at most every 15 s; a gate-only point of seconds is seen
    finished seconds late, not 15 s late. The queue is a double of `dvc queue status`'s lines."""
    from pipeline import sweep as sweep_cli
    from pipeline.sweep import Task

    sweep = load_sweep(ROOT / "sweeps" / "recipe.yaml", ROOT / "params.yaml")
    names = [sweep.experiment(point) for point in sweep.points]
    statuses = ["Queued", "Running", *["Running"] * 9, "Success"]
    polls = iter(range(1000))

    def queue_tasks():
        poll = next(polls)
        if poll < 2:
            return []  # the leftover check and the snapshot before queuing: an empty queue
        status = statuses[min(poll - 2, len(statuses) - 1)]
        return [Task(f"t{i}", name, status) for i, name in enumerate(names)]

    slept: list[float] = []
    double_the_queue(monkeypatch, queue_tasks, workers=1, sleep=slept.append)

    sweep_cli.run_sweep(sweep, replace=False)

    assert slept == [1.0, 1.0, 1.5, 2.25, 3.375, 5.0625, 7.59375, 11.390625, 15.0, 15.0, 15.0]


def test_a_worker_that_ran_a_point_and_left_the_others_queued_is_replaced_after_two_polls(monkeypatch):
    """DVC's worker can take a shutdown meant for an earlier one, run one task and leave (see
    tests/test_sweep_dvc.py): once a worker was seen, two polls with tasks queued, none running and no
    worker start another, without waiting WORKERLESS_S. The queue and its workers are doubles."""
    from pipeline import sweep as sweep_cli
    from pipeline.sweep import Task

    sweep = load_sweep(ROOT / "sweeps" / "recipe.yaml", ROOT / "params.yaml")
    first, *others = [sweep.experiment(point) for point in sweep.points]
    started: list[int] = []  # the poll at which each worker was started
    poll = -3  # the leftover check and the snapshot before queuing come first: polls -2 and -1

    def queue_tasks():
        nonlocal poll
        poll += 1
        if poll < 0:
            return []
        first_status = "Running" if poll == 0 else "Success"
        rest = "Success" if len(started) > 1 and poll > started[-1] else "Queued"
        return [Task("t0", first, first_status), *(Task(f"t{i}", n, rest) for i, n in enumerate(others, 1))]

    # no worker shows after the first point: it left
    double_the_queue(monkeypatch, queue_tasks, start_worker=lambda: started.append(poll))

    tasks = sweep_cli.run_sweep(sweep, replace=False)

    assert started == [-1, 2]  # the sweep's own worker, then another at the second workerless poll
    assert all(t.status == "Success" for t in tasks)
