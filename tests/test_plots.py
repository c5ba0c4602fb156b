"""The report's pictures (pipeline/plots.py): real PNGs that decode, of a fixed size under the note's limit,
and the same bytes for the same inputs (so the MR note does not upload them again)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib
import pytest
from PIL import Image

from pipeline.common import PipelineError
from pipeline.params import GateParams
from pipeline.plots import DPI, MAX_BYTES, MEASURES, Run, gate_png, loss_png, model_order, read_curve, sweep_png
from pipeline.sweep_spec import Outcome

ROOT = Path(__file__).resolve().parent.parent


def tsv(losses: list[float]) -> str:
    return "step\tepoch\tloss\n" + "".join(
        f"{i + 1}\t{(i + 1) / 10:.4f}\t{loss:.6f}\n" for i, loss in enumerate(losses)
    )


def runs(shift: float = 0.0) -> list[Run]:
    branch = Run(
        "this branch (abc1234)", read_curve(tsv([3.0, 2.1, 1.4 + shift, 1.1]), "a"), read_curve(tsv([2.9, 1.6]), "b")
    )
    target = Run("origin/main", read_curve(tsv([3.1, 2.4, 1.8, 1.5]), "c"), None)
    return [branch, target]


def gate_metrics() -> dict:
    """The committed metrics/gate.json: the target's (main's) model."""
    return json.loads((ROOT / "metrics" / "gate.json").read_text())


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes every pixel: a truncated or corrupt PNG fails here
    return image


def outcome(name: str, passed: bool, learn: float, forgetting: float) -> Outcome:
    return Outcome(name, "rev", {}, passed, "q4_k_m", learn, 0.8, forgetting, 1000, 60.0, 42)


def test_every_picture_decodes_at_its_fixed_size_and_stays_under_the_limit():
    candidate = gate_metrics()
    pictures = {
        "loss": (loss_png(runs()), (1000, 400)),
        "gate": (gate_png(candidate, candidate, GateParams(), "origin/main"), (1100, 650)),
        "sweep": (
            sweep_png([outcome("recipe-1", True, 0.875, 0.06), outcome("recipe-2", False, 0.5, 0.3)], "r"),
            (800, 550),
        ),
    }
    for name, (data, size) in pictures.items():
        image = decoded(data)
        assert (image.format, image.size) == ("PNG", size), name
        assert 5_000 < len(data) <= MAX_BYTES, (name, len(data))
        assert not {"Software", "Creation Time", "date:create"} & set(image.info), (name, image.info)
    assert DPI == 100


def test_the_same_inputs_give_the_same_bytes_whatever_the_local_matplotlib_style():
    candidate = gate_metrics()
    first = loss_png(runs()), gate_png(candidate, None, GateParams(), "origin/main")
    with matplotlib.rc_context({"lines.linewidth": 6, "font.size": 20, "axes.facecolor": "black"}):
        again = loss_png(runs()), gate_png(candidate, None, GateParams(), "origin/main")
    assert again == first


def test_other_inputs_give_other_bytes():
    assert loss_png(runs(shift=0.2)) != loss_png(runs())
    candidate = gate_metrics()
    changed = {**candidate, "learn": {**candidate["learn"], "q4_k_m": 0.5}}
    assert gate_png(changed, None, GateParams(), "main") != gate_png(candidate, None, GateParams(), "main")
    stricter = GateParams(max_forgetting=0.05)
    assert gate_png(candidate, None, stricter, "main") != gate_png(candidate, None, GateParams(), "main")


def test_the_thresholds_drawn_are_the_gates_rules_against_the_base():
    rules = GateParams()
    candidate = gate_metrics()
    drawn = {m.title: m.threshold(m.values(candidate).get("before"), rules) for m in MEASURES}
    before_learn, before_keep = candidate["learn"]["before"], candidate["keep"]["before"]
    assert drawn == {
        "learn score": max(rules.learn_min_score, before_learn + rules.learn_min_gain),  # 0.75 over a base at 0
        "keep score": pytest.approx(before_keep - rules.keep_max_drop),
        "forgetting": rules.max_forgetting,
        "learn reference NLL": pytest.approx(candidate["nll"]["learn"]["before"] - rules.learn_min_nll_drop),
        "keep reference NLL": pytest.approx(candidate["nll"]["keep"]["before"] + rules.keep_max_nll_rise),
    }
    assert drawn["learn score"] == 0.75


def test_models_are_drawn_base_merged_then_widest_gguf_first():
    assert model_order(["q4_k_m", "before", "q8_0", "merged", "f16"]) == ["before", "merged", "f16", "q8_0", "q4_k_m"]


def test_a_loss_file_that_is_not_the_train_stages_tsv_is_one_clear_error():
    assert read_curve("", "plots/train/loss.tsv") is None
    assert read_curve("step\tepoch\tloss\n", "plots/train/loss.tsv") is None
    with pytest.raises(PipelineError, match=r"plots/train/loss\.tsv: line 3: step and loss must be numbers"):
        read_curve("step\tepoch\tloss\n1\t0.1\t2.5\n2\t0.2\tnan?\n", "plots/train/loss.tsv")
    with pytest.raises(
        PipelineError, match=r"plots/eval/loss\.tsv: line 1: a loss TSV needs the columns step and loss"
    ):
        read_curve("epoch,loss\n1,2\n", "plots/eval/loss.tsv")
