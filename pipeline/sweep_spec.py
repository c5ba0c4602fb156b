"""Sweep files (sweeps/*.yaml): a grid and/or a list of points over params.yaml keys, validated like
params.yaml before anything runs; and the ranking of a sweep's experiments by the gate.

    name: recipe                 # optional: the experiments are <name>-1, <name>-2, ... (default: file stem)
    max_points: 8                # optional: refuse a sweep larger than this
    grid:                        # every combination of these values, in the order written
      train.replay: [0.5, 1.0]
      train.max_steps: [42, 60]
    points:                      # optional: more points, each a set of overrides, after the grid's
      - {train.learning_rate: 3.0e-4, train.lora.r: 8}

Every point, applied to params.yaml, must pass pipeline/params.py's typed validation; every problem is
reported as `sweeps/x.yaml:LINE: key: reason`, as params.yaml's are.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.common import PipelineError
from pipeline.params import build_params

TOP_LEVEL = ("name", "max_points", "grid", "points")
# an experiment name is a git ref component: keep to what needs no quoting anywhere
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Point:
    """One experiment: params.yaml keys (dotted) and their values, in the order the sweep file gives them."""

    index: int  # 1-based: the experiment is <sweep>-<index>
    overrides: dict[str, Any]

    def set_args(self) -> list[str]:
        """`dvc exp run -S` arguments (Hydra's override grammar, which DVC parses)."""
        args = []
        for key, value in self.overrides.items():
            args += ["-S", f"{key}={override_value(value)}"]
        return args

    def label(self) -> str:
        return " ".join(f"{key}={override_value(value)}" for key, value in self.overrides.items())


@dataclass(frozen=True)
class Sweep:
    name: str
    source: str
    points: list[Point]
    max_points: int | None = None

    def experiment(self, point: Point) -> str:
        return f"{self.name}-{point.index}"

    @property
    def keys(self) -> list[str]:
        return list(dict.fromkeys(key for point in self.points for key in point.overrides))


def override_value(value: Any) -> str:
    """A value as Hydra reads it back: YAML-style null/true/false, quoted strings, [a,b] lists."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    return repr(value)


def with_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """params.yaml's mapping with dotted keys set (missing sections created, so the validator names them)."""
    result = copy.deepcopy(raw)
    for key, value in overrides.items():
        node = result
        *parents, last = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    return result


def _located(node: yaml.Node | None) -> int:
    return node.start_mark.line + 1 if node is not None else 1


def _mapping(node: yaml.Node | None) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): (k, v) for k, v in node.value}


class _Errors:
    """(line, key, reason), reported sorted and without repeats (a bad grid value is in many points)."""

    def __init__(self, source: str):
        self.source = source
        self.items: set[tuple[int, str, str]] = set()

    def add(self, line: int, key: str, reason: str) -> None:
        self.items.add((line, key, reason))

    def raise_any(self) -> None:
        if self.items:
            report = [f"{self.source}:{line}: {key}: {reason}" for line, key, reason in sorted(self.items)]
            raise PipelineError("invalid sweep:\n  " + "\n  ".join(report))


def _check_point(params_raw: dict, overrides: dict[str, Any], lines: dict[str, int], errors: _Errors, at: int) -> None:
    """Apply the overrides to params.yaml and validate; each problem goes to the line of the key behind it."""
    _, problems = build_params(with_overrides(params_raw, overrides))
    for key, reason in problems:
        # the validator names the params key (train.lora.r) or the first unknown section on its path
        owner = next((k for k in overrides if k == key or k.startswith(key + ".") or key.startswith(k + ".")), key)
        errors.add(lines.get(owner, at), owner, reason)


def parse_sweep(text: str, params_text: str, source: str, default_name: str) -> Sweep:
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
        params_raw = yaml.safe_load(params_text) or {}
    except yaml.YAMLError as error:
        raise PipelineError(f"{source}: invalid YAML: {error}") from None
    errors = _Errors(source)
    if not isinstance(raw, dict):
        errors.add(1, "(top level)", "expected a mapping with grid and/or points")
        errors.raise_any()
    top = _mapping(node)
    for key in raw:
        if key not in TOP_LEVEL:
            errors.add(_located(top[str(key)][0]), str(key), f"unknown key (known: {', '.join(TOP_LEVEL)})")

    name = raw.get("name", default_name)
    if not isinstance(name, str) or not NAME.match(name):
        line = _located(top["name"][0]) if "name" in top else 1
        errors.add(line, "name", f"must be letters, digits, '.', '_' or '-' (an experiment name), got {name!r}")
    max_points = raw.get("max_points")
    if max_points is not None and (not isinstance(max_points, int) or isinstance(max_points, bool) or max_points < 1):
        errors.add(_located(top["max_points"][0]), "max_points", f"must be an integer > 0, got {max_points!r}")
        max_points = None

    grid_points: list[dict[str, Any]] = []
    lines: dict[str, int] = {}
    grid = raw.get("grid")
    if "grid" in raw:
        grid_line = _located(top["grid"][0])
        if not isinstance(grid, dict) or not grid:
            errors.add(grid_line, "grid", "empty grid: map params.yaml keys to lists of values")
        else:
            grid_nodes = _mapping(top["grid"][1])
            for key, values in grid.items():
                key_node, value_node = grid_nodes[str(key)]
                lines[str(key)] = _located(key_node)
                if not isinstance(values, list):
                    errors.add(_located(key_node), str(key), f"expected a list of values, got {values!r}")
                elif not values:
                    errors.add(_located(key_node), str(key), "empty list: a grid key needs at least one value")
                else:
                    # each value on its own first: the error points at the value's own line
                    for value, item in zip(values, value_node.value, strict=True):
                        _check_point(params_raw, {str(key): value}, {str(key): _located(item)}, errors, grid_line)
            if all(isinstance(v, list) and v for v in grid.values()):
                keys = [str(k) for k in grid]
                grid_points = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]

    listed: list[dict[str, Any]] = []
    if "points" in raw:
        points = raw["points"]
        points_line = _located(top["points"][0])
        if not isinstance(points, list) or not points:
            errors.add(points_line, "points", "expected a non-empty list of overrides (key: value mappings)")
        else:
            for number, (point, point_node) in enumerate(zip(points, top["points"][1].value, strict=True), 1):
                if not isinstance(point, dict) or not point:
                    errors.add(_located(point_node), f"points[{number}]", "expected a mapping of params.yaml keys")
                    continue
                point_lines = {str(k): _located(k_node) for k, (k_node, _) in _mapping(point_node).items()}
                _check_point(params_raw, {str(k): v for k, v in point.items()}, point_lines, errors, points_line)
                listed.append({str(k): v for k, v in point.items()})
    if "grid" not in raw and "points" not in raw:
        errors.add(1, "(top level)", "no grid and no points: nothing to run")

    # the contract: every whole point must parse (keys may interact); a key already reported at its
    # value's line is not reported again at its own
    reported = {key for _, key, _ in errors.items}
    whole = _Errors(source)
    for overrides in grid_points:
        _check_point(params_raw, overrides, lines, whole, 1)
    errors.items |= {item for item in whole.items if item[1] not in reported}
    everything = grid_points + listed
    if max_points is not None and len(everything) > max_points:
        errors.add(
            _located(top["max_points"][0]),
            "max_points",
            f"the sweep has {len(everything)} points, more than {max_points}",
        )
    errors.raise_any()
    return Sweep(name, source, [Point(i, o) for i, o in enumerate(everything, 1)], max_points)


def load_sweep(path: str | Path, params: str | Path = "params.yaml") -> Sweep:
    path, params = Path(path), Path(params)
    try:
        text, params_text = path.read_text(encoding="utf-8"), params.read_text(encoding="utf-8")
    except OSError as error:
        raise PipelineError(f"{error.filename}: cannot read: {error.strerror}") from None
    return parse_sweep(text, params_text, str(path), path.stem)


# --- ranking ---


@dataclass(frozen=True)
class Outcome:
    """One experiment of a sweep as `dvc exp show --json` (and its verdict file) recorded it."""

    name: str
    rev: str
    params: dict[str, Any]  # flattened params.yaml: dotted key -> value
    passed: bool
    ship: str | None
    learn: float | None  # the judged variant's (the shipped GGUF, else the merged model) learn score
    keep: float | None
    forgetting: float | None
    gguf_bytes: int | None  # the shipped GGUF's size
    runtime_s: float | None
    steps: int | None
    reasons: list[str] = field(default_factory=list)

    def rank_key(self) -> tuple:
        # passed first, then learn (high), forgetting (low), keep (high), GGUF size (small); name breaks ties
        missing = float("inf")
        return (
            not self.passed,
            -(self.learn if self.learn is not None else -missing),
            self.forgetting if self.forgetting is not None else missing,
            -(self.keep if self.keep is not None else -missing),
            self.gguf_bytes if self.gguf_bytes is not None else missing,
            self.name,
        )


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _data(files: dict | None, name: str) -> dict:
    return ((files or {}).get(name) or {}).get("data") or {}


def outcome(name: str, data: dict, reasons: list[str]) -> Outcome:
    """An Outcome from one experiment's `data` in `dvc exp show --json`."""
    metrics = data.get("metrics") or {}
    gate = _data(metrics, "metrics/gate.json")
    train = _data(metrics, "metrics/train.json")
    ship = gate.get("ship")
    judged = ship or "merged"
    size_file = "metrics/convert.json" if _data(metrics, "metrics/convert.json").get("outtype") == ship else None
    size_file = size_file or f"metrics/quantize/{ship}.json"
    return Outcome(
        name=name,
        rev=data.get("rev", ""),
        params=flatten(_data(data.get("params"), "params.yaml")),
        passed=bool(gate.get("passed")),
        ship=ship,
        learn=(gate.get("learn") or {}).get(judged),
        keep=(gate.get("keep") or {}).get(judged),
        forgetting=(gate.get("forgetting") or {}).get(judged),
        gguf_bytes=_data(metrics, size_file).get("bytes") if ship else None,
        runtime_s=train.get("runtime_s"),
        steps=train.get("steps"),
        reasons=reasons if not gate.get("passed") else [],
    )


def sweep_experiments(shown: list[dict], sweep: str) -> list[tuple[str, dict]]:
    """(name, data) of the experiments named <sweep>-<n>, from `dvc exp show --json`, every baseline."""
    pattern = re.compile(rf"^{re.escape(sweep)}-\d+$")
    found = []
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            name = experiment.get("name") or ""
            revs = experiment.get("revs") or []
            if pattern.match(name) and revs and revs[0].get("data"):
                found.append((name, revs[0]["data"]))
    return found


def rank(outcomes: list[Outcome]) -> list[Outcome]:
    return sorted(outcomes, key=Outcome.rank_key)


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(ranked: list[Outcome], sweep: str) -> str:
    """The ranked experiments: the params that differ between them, the gate's numbers, train time."""
    keys = sorted({k for o in ranked for k in o.params})
    differing = [k for k in keys if len({repr(o.params.get(k)) for o in ranked}) > 1]
    header = ["#", "experiment", *[f"`{k}`" for k in differing], "gate", "ship", "learn", "keep", "forgetting"]
    header += ["GGUF (MB)", "train (s)", "steps"]
    lines = [
        f"Sweep `{sweep}`: {len(ranked)} experiments, ranked by the gate (passed first, then learn score, "
        "forgetting, keep score, GGUF size).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---:", "---", *["---"] * len(differing), "---", "---", *["---:"] * 6]) + "|",
    ]
    for place, o in enumerate(ranked, 1):
        verdict = "passed" if o.passed else "failed: " + "; ".join(o.reasons or ["(no reason recorded)"])
        size = None if o.gguf_bytes is None else o.gguf_bytes / 1e6
        cells = [str(place), f"`{o.name}`", *[str(o.params.get(k)) for k in differing], verdict.replace("|", "\\|")]
        cells += [o.ship or "–", _number(o.learn), _number(o.keep), _number(o.forgetting), _number(size, 1)]
        cells += [_number(o.runtime_s, 1), "–" if o.steps is None else str(o.steps)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def as_json(ranked: list[Outcome]) -> list[dict]:
    import dataclasses

    return [{"rank": place, **dataclasses.asdict(o)} for place, o in enumerate(ranked, 1)]
