"""Stage baseline: the base model's gate evidence, measured once and kept between retrains.

    python -m pipeline.baseline --cases data/gate_cases.jsonl --probes data/base_answers/probes.jsonl \
        --base models/base --out models/baseline/evidence.json

The "before" of every gate run: the base's greedy answer to each gate case, the NLL of each case's
reference and of the base's own answers to the general probes (pipeline/evidence.py). It depends only
on the base, the cases' conversations and references, the probes and gate.max_new_tokens / gate.seed,
so DVC runs it again only when one of those changes, not when training does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cases import load_cases
from pipeline.common import PipelineError, get_logger, run_cli
from pipeline.evidence import BASELINE, decoding, measure, write_baseline
from pipeline.hf_evaluator import HFModel
from pipeline.params import load_params
from pipeline.prompts import read_base_answers

PARAMS = ("gate.max_new_tokens", "gate.seed", "gate.probe_max_tokens")
log = get_logger("baseline")


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(prog="python -m pipeline.baseline", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--cases", type=Path, default=Path("data/gate_cases.jsonl"), help="default: %(default)s")
    parser.add_argument(
        "--probes",
        type=Path,
        default=Path("data/base_answers/probes.jsonl"),
        help="the base's answers to general probes (default: %(default)s)",
    )
    parser.add_argument("--base", type=Path, default=Path("models/base"), help="base model (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=BASELINE, help="default: %(default)s")
    args = parser.parse_args(argv)

    gate = load_params(args.params).gate
    errors: list[str] = []
    cases = load_cases(args.cases, errors)
    if errors:
        raise PipelineError("\n".join(errors))
    probes = [probe for probe in read_base_answers(args.probes) if probe.answer]
    model = HFModel(args.base, gate.seed, "before")
    try:
        work = len(cases) + sum(1 for c in cases if c.reference) + len(probes)
        with tqdm(total=work, desc="baseline", unit="item") as bar:
            measured = measure(model, cases, probes, gate, bar.update)
    finally:
        model.close()
    write_baseline(args.out, measured, cases, probes, decoding(gate))
    log.info("base measured on %d cases and %d probes: %s", len(cases), len(probes), args.out)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
