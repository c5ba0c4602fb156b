"""params.yaml is validated on load, and dvc.yaml lists exactly the params each stage reads."""

from __future__ import annotations

import importlib

import pytest
import yaml

from pipeline.common import PipelineError
from pipeline.params import parse_params
from tests.conftest import ROOT


def error_of(text: str) -> str:
    with pytest.raises(PipelineError) as raised:
        parse_params(text)
    return str(raised.value)


def test_committed_params_load_with_the_documented_defaults(repo_params):
    assert repo_params.base.model == "smollm2"
    assert repo_params.train.lora.target_modules == "all-linear"
    assert repo_params.train.learning_rate == pytest.approx(1e-3)
    assert repo_params.merge.dtype == "float16"
    assert repo_params.convert.outtype == "f16" and repo_params.quantize.types == ["q8_0", "q4_k_m"]
    assert repo_params.train.bf16 == "auto" and repo_params.train.cpu_threads is None  # torch's default threads


def test_an_empty_file_means_all_defaults():
    params = parse_params("")
    assert params.train.seed == 42 and params.base.model == "smollm2"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "train:\n  lora:\n    rank: 8\n",
            "params.yaml:3: train.lora.rank: unknown key (known: r, alpha, dropout, target_modules)",
        ),
        (
            "trian:\n  seed: 1\n",
            "params.yaml:1: trian: unknown key "
            "(known: data, base, base_answers, train, merge, convert, quantize, gate, modelfile, deploy)",
        ),
        ("train:\n  epochs: three\n", "params.yaml:2: train.epochs: expected an integer, got 'three'"),
        ("train:\n  qlora: 1\n", "params.yaml:2: train.qlora: expected true or false, got 1"),
        (
            "train:\n  learning_rate: 1e-3\n",
            "train.learning_rate: expected a number, got '1e-3' (YAML reads 1e-3 as a string: write 1.0e-3)",
        ),
        ("train:\n  learning_rate: 0.0\n", "params.yaml:2: train.learning_rate: must be in (0, 1), got 0.0"),
        ("train:\n  batch_size: 0\n", "params.yaml:2: train.batch_size: must be > 0, got 0"),
        ("train:\n  lora:\n    dropout: 1.5\n", "params.yaml:3: train.lora.dropout: must be in [0, 1), got 1.5"),
        ("train:\n  max_steps: 0\n", "params.yaml:2: train.max_steps: must be -1 or > 0, got 0"),
        ("train:\n  cpu_threads: 0\n", "params.yaml:2: train.cpu_threads: must be > 0 or null, got 0"),
        (
            "train:\n  scheduler: warm\n",
            "train.scheduler: expected one of 'linear', 'cosine', 'constant', 'constant_with_warmup', got 'warm'",
        ),
        (
            "merge:\n  dtype: int4\n",
            "params.yaml:2: merge.dtype: expected one of 'float16', 'bfloat16', 'float32', got 'int4'",
        ),
        ("base: smollm2\n", "params.yaml:1: base: expected a mapping of keys"),
        ("data:\n  max_seq_length: -5\n", "params.yaml:2: data.max_seq_length: must be > 0, got -5"),
        (
            "data:\n  near_duplicate_threshold: 0\n",
            "params.yaml:2: data.near_duplicate_threshold: must be in (0, 1], got 0",
        ),
        (
            "data:\n  sources:\n    - path: data/faq.csv\n      format: xlsx\n",
            "params.yaml:4: data.sources[0].format: expected one of 'messages', 'text', 'alpaca', 'sharegpt', "
            "'openai', 'csv', 'tsv', 'parquet', 'hf_disk', got 'xlsx'",
        ),
        (
            "data:\n  sources:\n    - path: a.jsonl\n    - path: b.jsonl\n      wieght: 2\n",
            "params.yaml:5: data.sources[1].wieght: unknown key "
            "(known: path, format, role, weight, max_rows, columns, roles)",
        ),
        (
            "data:\n  sources:\n    - path: a.csv\n      columns: {prompt: 3}\n",
            "params.yaml:4: data.sources[0].columns: expected a mapping of a string to a string, got {'prompt': 3}",
        ),
        (
            "data:\n  sources: null\n  eval_fraction: 1.0\n",
            "params.yaml:3: data.eval_fraction: must be in [0, 1), got 1.0",
        ),
        (
            "data:\n  allow_gate_cases: learn-loop\n",
            "params.yaml:2: data.allow_gate_cases: expected a list of a string, got 'learn-loop'",
        ),
        (
            "convert:\n  outtype: q4_k_m\n",
            "params.yaml:2: convert.outtype: expected one of 'f16', 'bf16', 'f32', 'q8_0', got 'q4_k_m'",
        ),
        (
            "quantize:\n  types: [q8_0, q4_k_xl]\n",
            "params.yaml:2: quantize.types: expected a list of one of 'q4_0', 'q4_1', 'q5_0', 'q5_1', 'q8_0', 'q2_k', "
            "'q3_k_s', 'q3_k_m', 'q3_k_l', 'q4_k_s', 'q4_k_m', 'q5_k_s', 'q5_k_m', 'q6_k', 'iq4_nl', 'iq4_xs', "
            "got ['q8_0', 'q4_k_xl']",
        ),
        ("quantize:\n  types: [q8_0, q8_0]\n", "quantize.types: must be a non-empty list without repeats"),
        ("train:\n  replay: -0.5\n", "params.yaml:2: train.replay: must be >= 0, got -0.5"),
        ("train:\n  neftune_alpha: 0\n", "params.yaml:2: train.neftune_alpha: must be > 0 or null, got 0"),
        ("train:\n  replay_kl: -1\n", "params.yaml:2: train.replay_kl: must be >= 0, got -1"),
        ("train:\n  question_noise: 1.0\n", "params.yaml:2: train.question_noise: must be in [0, 1), got 1.0"),
        (
            "train:\n  packing: true\n  replay_kl: 0.5\n",
            "params.yaml:3: train.replay_kl: needs train.packing: false (a packed row mixes replayed and other "
            "conversations); 0 to pack",
        ),
        ("train:\n  cycles: 0\n", "params.yaml:2: train.cycles: must be > 0, got 0"),
        ("train:\n  fit_nll: 0\n", "params.yaml:2: train.fit_nll: must be > 0, got 0"),
        ("train:\n  fit_learn: 1.5\n", "params.yaml:2: train.fit_learn: must be in (0, 1] or null, got 1.5"),
        (
            "train:\n  packing: true\n  cycles: 2\n",
            "params.yaml:3: train.cycles: needs train.packing: false (the fit is measured on our own conversations, "
            "not packed rows); 1 to pack",
        ),
        ("gate:\n  max_forgetting: -1\n", "params.yaml:2: gate.max_forgetting: must be >= 0, got -1"),
        ("gate:\n  learn_min_nll_drop: lots\n", "gate.learn_min_nll_drop: expected a number, got 'lots'"),
        (
            "gate:\n  unstable: ignore\n",
            "params.yaml:2: gate.unstable: expected one of 'likelihood', 'keywords', 'fail', got 'ignore'",
        ),
        ("base_answers:\n  max_new_tokens: 0\n", "params.yaml:2: base_answers.max_new_tokens: must be > 0, got 0"),
    ],
)
def test_bad_params_name_the_line_and_key(text, message):
    assert message in error_of(text)


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "base:\n  model: org/model\n  revision: main\n  trust_remote_code: true\n",
            "params.yaml:3: base.revision: must be a 40-hex commit (trust_remote_code runs org/model's code), "
            "got 'main'",
        ),
        (
            "base:\n  model: org/model\n  trust_remote_code: true\n",
            "params.yaml:3: base.trust_remote_code: true for a hub model needs base.revision pinned to a 40-hex "
            "commit (trust_remote_code runs org/model's code), got None",
        ),
        (
            f"base:\n  model: org/model\n  revision: {COMMIT.upper()}\n  trust_remote_code: true\n",
            "params.yaml:3: base.revision: must be a 40-hex commit",
        ),
        (
            "modelfile:\n  license: ../secrets/token.txt\n",
            "params.yaml:2: modelfile.license: must be a path inside modelfiles/ without '..', "
            "got '../secrets/token.txt'",
        ),
        (
            "modelfile:\n  license: modelfiles/../.env\n",
            "params.yaml:2: modelfile.license: must be a path inside modelfiles/ without '..'",
        ),
        (
            "modelfile:\n  license: /etc/passwd\n",
            "params.yaml:2: modelfile.license: must be a relative path inside modelfiles/, got the absolute path "
            "'/etc/passwd'",
        ),
        (
            "modelfile:\n  license: LICENSE\n",
            "params.yaml:2: modelfile.license: must be a file inside modelfiles/ (the modelfile stage tracks it), "
            "got 'LICENSE'",
        ),
        ("modelfile:\n  license: modelfiles\n", "params.yaml:2: modelfile.license: must be a file inside modelfiles/"),
    ],
)
def test_remote_code_needs_a_pinned_commit_and_the_license_stays_in_modelfiles(text, message):
    assert message in error_of(text)


@pytest.mark.parametrize(
    ("text", "revision", "license"),
    [
        (f"base:\n  model: org/model\n  revision: {COMMIT}\n  trust_remote_code: true\n", COMMIT, None),
        ("base:\n  model: org/model\n  revision: main\n", "main", None),  # no remote code: a branch is allowed
        ("base:\n  model: tiny\n  trust_remote_code: true\n", None, None),  # embedded: no hub code runs
        ("modelfile:\n  license: modelfiles/LICENSE.txt\n", None, "modelfiles/LICENSE.txt"),
        ("modelfile:\n  license: ./modelfiles/l/apache-2.0.txt\n", None, "./modelfiles/l/apache-2.0.txt"),
    ],
)
def test_a_pinned_commit_and_a_license_inside_modelfiles_load(text, revision, license):
    params = parse_params(text)
    assert (params.base.revision, params.modelfile.license) == (revision, license)


def test_a_local_directory_base_needs_no_revision_for_remote_code(tmp_path, monkeypatch):
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    params = parse_params("base:\n  model: org/model\n  trust_remote_code: true\n")
    assert params.base.trust_remote_code is True and params.base.revision is None


def test_every_problem_is_reported_at_once_in_file_order():
    message = error_of("train:\n  epochs: 0\n  bogus: 1\nmerge:\n  atol: -1\n")
    lines = message.splitlines()[1:]
    assert [line.strip().split(":")[1] for line in lines] == ["2", "3", "5"]


def test_invalid_yaml_is_one_clear_error():
    assert error_of("train: [unclosed\n").startswith("params.yaml: invalid YAML")


STAGES = {
    "prepare": "pipeline.prepare",
    "base": "pipeline.base",
    "base_answers": "pipeline.base_answers",
    "baseline": "pipeline.baseline",
    "train": "pipeline.train",
    "merge": "pipeline.merge",
    "convert": "pipeline.convert",
    "quantize": "pipeline.quantize",
}


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_lists_exactly_the_params_the_stage_reads(stage):
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    declared = importlib.import_module(STAGES[stage]).PARAMS
    assert sorted(dvc["stages"][stage]["params"]) == sorted(declared)


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_runs_the_stage_module_and_tracks_its_code(stage):
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    module = STAGES[stage]
    assert spec["cmd"].startswith(f"python -m {module} ")
    assert module.replace(".", "/") + ".py" in spec["deps"]
