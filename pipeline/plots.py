"""The pictures of the merge request report and of a sweep, rendered headless with matplotlib (Agg).

- loss curves: train and eval loss per step (what the train stage writes to plots/{train,eval}/loss.tsv),
  this branch against the target branch;
- the gate: per measure (learn and keep score, their reference NLL, forgetting), one bar per model
  (the base, the merged HF model, every GGUF) with the pass threshold drawn, the target's values marked;
- a sweep: learn score against forgetting, one point per experiment.

Every picture is PNG bytes that depend on the inputs only: a fixed size and dpi, matplotlib's default
style whatever the machine's matplotlibrc says, and no metadata (no software version, no date), so the
same inputs give the same bytes and the MR note does not upload a picture again.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib import style as mpl_style
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from pipeline.common import PipelineError
from pipeline.params import GateParams
from pipeline.sweep_spec import Outcome

DPI = 100
MAX_BYTES = 150_000  # what a note may carry per picture
LOSS_SIZE = (10.0, 4.0)  # inches: 1000 x 400 px, about GitLab's note width
GATE_SIZE = (11.0, 6.5)
SWEEP_SIZE = (8.0, 5.5)
COLOURS = {"before": "#9e9e9e", "merged": "#1f77b4", "pass": "#2ca02c", "fail": "#d62728"}


@dataclass(frozen=True)
class Picture:
    """A rendered picture: the file name it is written under, its alt text and caption, its PNG bytes."""

    filename: str
    alt: str
    caption: str
    data: bytes


@dataclass(frozen=True)
class Curve:
    steps: tuple[float, ...]
    losses: tuple[float, ...]


@dataclass(frozen=True)
class Run:
    """One branch's loss curves (None: that curve is not available)."""

    label: str
    train: Curve | None
    eval: Curve | None


def read_curve(text: str | None, source: str) -> Curve | None:
    """A loss TSV as the train stage writes it (step, epoch, loss); None for no text or no rows."""
    if not text:
        return None
    lines = text.splitlines()
    header = lines[0].split("\t") if lines else []
    if "step" not in header or "loss" not in header:
        raise PipelineError(f"{source}: line 1: a loss TSV needs the columns step and loss, got {header}")
    step, loss = header.index("step"), header.index("loss")
    steps, losses = [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            steps.append(float(fields[step]))
            losses.append(float(fields[loss]))
        except (IndexError, ValueError):
            raise PipelineError(f"{source}: line {number}: step and loss must be numbers, got {line!r}") from None
    return Curve(tuple(steps), tuple(losses)) if steps else None


def png(figure: Figure) -> bytes:
    """The figure as PNG bytes with no metadata: the same figure gives the same bytes. Reduced to a palette
    of 256 colours (no dithering: flat colours and text stay crisp), about a third of the RGBA size."""
    rendered = io.BytesIO()
    FigureCanvasAgg(figure).print_png(rendered, metadata={"Software": None})
    palette = Image.open(rendered).convert("RGB").quantize(256, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = io.BytesIO()
    palette.save(out, format="PNG", optimize=True)  # Pillow writes no date or software chunk of its own
    data = out.getvalue()
    if len(data) > MAX_BYTES:
        raise PipelineError(f"picture of {len(data)} bytes is over the {MAX_BYTES} a report picture may have")
    return data


def new_figure(size: tuple[float, float]) -> Figure:
    return Figure(figsize=size, dpi=DPI, layout="constrained")


def loss_png(runs: Sequence[Run]) -> bytes:
    """Train and eval loss against the step, side by side, one line per run (the first solid)."""
    with mpl_style.context("default"):
        figure = new_figure(LOSS_SIZE)
        panels = figure.subplots(1, 2)
        for axes, kind in zip(panels, ("train", "eval"), strict=True):
            for place, run in enumerate(runs):
                curve = getattr(run, kind)
                if curve is None:
                    continue
                style = {"linestyle": "-" if place == 0 else "--", "marker": "o" if kind == "eval" else None}
                axes.plot(curve.steps, curve.losses, label=run.label, linewidth=1.8, markersize=4, **style)
            axes.set_title(f"{kind} loss (lower is better)")
            axes.set_xlabel("training step")
            axes.set_ylabel("loss (cross-entropy, nats/token)")
            axes.grid(True, alpha=0.3)
            if axes.lines:
                axes.legend(loc="upper right")
            else:
                axes.text(0.5, 0.5, "not available", ha="center", va="center", transform=axes.transAxes)
        return png(figure)


def model_order(names: Sequence[str]) -> list[str]:
    """before, merged, then the GGUFs from the widest type to the narrowest (f16, q8_0, q4_k_m)."""

    def key(name: str) -> tuple:
        digits = "".join(c for c in name.split("_")[0] if c.isdigit())
        bits = int(digits) if digits else 0
        return ({"before": 0, "merged": 1}.get(name, 2), not name.startswith(("f", "bf")), -bits, name)

    return sorted(names, key=key)


@dataclass(frozen=True)
class Measure:
    """One panel of the gate picture: where its values are in metrics/gate.json and its rule."""

    title: str
    path: tuple[str, ...]
    unit: str
    higher_is_better: bool

    def values(self, gate: dict) -> dict[str, float]:
        node = gate
        for key in self.path:
            node = node.get(key) if isinstance(node, dict) else None
        return {k: float(v) for k, v in (node or {}).items() if isinstance(v, (int, float))}

    def threshold(self, before: float | None, rules: GateParams) -> float | None:
        """The value a fine-tuned model must reach (higher is better) or stay under (lower is better)."""
        if self.path == ("forgetting",):
            return rules.max_forgetting
        if before is None:
            return None
        return {
            ("learn",): max(rules.learn_min_score, before + rules.learn_min_gain),
            ("keep",): before - rules.keep_max_drop,
            ("nll", "learn"): before - rules.learn_min_nll_drop,
            ("nll", "keep"): before + rules.keep_max_nll_rise,
        }[self.path]


MEASURES = (
    Measure("learn score", ("learn",), "mean keyword score", True),
    Measure("keep score", ("keep",), "mean keyword score", True),
    Measure("forgetting", ("forgetting",), "NLL rise, nats/token", False),
    Measure("learn reference NLL", ("nll", "learn"), "nats/token", False),
    Measure("keep reference NLL", ("nll", "keep"), "nats/token", False),
)


def gate_png(candidate: dict, target: dict | None, rules: GateParams, target_label: str) -> bytes:
    """metrics/gate.json as bars per model and measure, thresholds dashed, the target's values as diamonds."""
    passed = candidate.get("variants_passed") or {}
    ship = candidate.get("ship")
    shipped = "ships" if candidate.get("passed") else "judged"  # a failed gate ships nothing
    with mpl_style.context("default"):
        figure = new_figure(GATE_SIZE)
        grid = figure.subplots(2, 3)
        for axes, measure in zip(grid.flat, MEASURES, strict=False):
            values = measure.values(candidate)
            models = model_order(list(values))
            colours = [
                COLOURS.get(m) or (COLOURS["pass"] if passed.get(m, candidate.get("passed")) else COLOURS["fail"])
                for m in models
            ]
            bars = axes.bar(range(len(models)), [values[m] for m in models], color=colours, width=0.7)
            for bar, model in zip(bars, models, strict=True):
                if model == ship:
                    bar.set_edgecolor("black")
                    bar.set_linewidth(2)
            axes.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
            old = measure.values(target or {})
            marked = [(i, old[m]) for i, m in enumerate(models) if m in old]
            if marked:
                axes.scatter(*zip(*marked, strict=True), marker="D", s=36, color="black", edgecolors="white", zorder=3)
            line = measure.threshold(values.get("before"), rules)
            better = "higher" if measure.higher_is_better else "lower"
            title = f"{measure.title} ({better} is better)"
            if line is not None:
                axes.axhline(line, color=COLOURS["fail"], linestyle="--", linewidth=1.2)
                title += f"\npass: {'at least' if measure.higher_is_better else 'at most'} {line:.3f} (red dashes)"
            axes.set_xticks(range(len(models)), [f"{m}\n({shipped})" if m == ship else m for m in models])
            axes.set_title(title, fontsize=10.5)
            axes.tick_params(axis="x", labelsize=9)
            axes.set_ylabel(measure.unit)
            top = max([*values.values(), *old.values(), line or 0.0, 0.0])
            axes.set_ylim(0, top * 1.25 if top > 0 else 1.0)
            axes.grid(True, axis="y", alpha=0.3)
        legend = grid.flat[-1]
        legend.axis("off")
        verdict = {True: "PASSED", False: "FAILED"}.get(candidate.get("passed"), "unknown")
        lines = [
            f"Gate verdict: {verdict}" + (f", ships {ship}" if ship and candidate.get("passed") else ""),
            "",
            "bars: this branch's candidate",
            "  grey: the base model (before)",
            "  blue: the merged HF model",
            "  green / red: a GGUF that passes / fails",
            f"  black outline: the GGUF that {'ships' if candidate.get('passed') else 'was judged'}",
            "red dashes: the pass threshold",
            *(
                ["black diamonds: the gate results on", f"  {target_label}"]
                if target
                else [f"no gate results on {target_label}"]
            ),
        ]
        legend.text(0.02, 0.98, "\n".join(lines), va="top", ha="left", fontsize=10, transform=legend.transAxes)
        return png(figure)


def sweep_png(ranked: Sequence[Outcome], sweep_name: str) -> bytes:
    """Learn score against forgetting, one labelled point per experiment (green passed, red failed)."""
    with mpl_style.context("default"):
        figure = new_figure(SWEEP_SIZE)
        axes = figure.subplots()
        for place, o in enumerate(ranked, 1):
            x, y = o.forgetting if o.forgetting is not None else 0.0, o.learn if o.learn is not None else 0.0
            axes.scatter([x], [y], color=COLOURS["pass"] if o.passed else COLOURS["fail"], s=40, zorder=2)
            axes.annotate(f"{place}. {o.name}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
        axes.set_xlabel("forgetting (NLL rise on the base's own answers, nats/token)")
        axes.set_ylabel("learn score")
        axes.set_title(f"sweep {sweep_name}: green passed the gate, red failed")
        axes.margins(0.15)
        axes.grid(True, alpha=0.3)
        return png(figure)
