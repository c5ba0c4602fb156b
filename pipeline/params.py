"""params.yaml: typed sections, validated on load.

Unknown keys, wrong types and impossible values all become one PipelineError that names
`file:line: key` for every problem, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml

from pipeline.common import PipelineError
from pipeline.model_names import PARTS, name_part_error

DEFAULT_PARAMS = Path("params.yaml")
# A git commit on the hub: with trust_remote_code the model repository's Python runs here, so it must be
# the code that was reviewed, not whatever a branch or tag points at by the next run.
HUB_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# modelfile.license is read by the modelfile stage, which tracks this directory (and ships the text).
LICENSE_DIR = "modelfiles"


def _check(predicate, message: str) -> dict:
    return {"check": (predicate, message)}


POSITIVE = _check(lambda v: v > 0, "must be > 0")
NON_NEGATIVE = _check(lambda v: v >= 0, "must be >= 0")
FRACTION = _check(lambda v: 0 <= v < 1, "must be in [0, 1)")


SourceFormat = Literal["messages", "text", "alpaca", "sharegpt", "openai", "csv", "tsv", "parquet", "hf_disk"]


@dataclass(frozen=True)
class SourceParams:
    # A file or directory in data/ (pipeline/sources.py reads each format).
    path: str = ""
    format: SourceFormat = "messages"
    # train: trained on (less data.eval_fraction when no source is `eval`); eval: held out for the eval loss.
    role: Literal["train", "eval"] = "train"
    # Mixing: 2 = every conversation twice, 0.5 = a seeded half of them, 1.5 = all once and a seeded half again.
    weight: float = field(default=1.0, metadata=POSITIVE)
    # Only the first N valid conversations; null = all.
    max_rows: int | None = field(default=None, metadata=_check(lambda v: v is None or v > 0, "must be > 0 or null"))
    # csv, tsv, parquet, hf_disk: our field -> the column holding it. Fields: prompt, response, system
    # (one exchange), or messages (a column of message lists; JSON text in a CSV).
    columns: dict[str, str] = field(default_factory=dict)
    # sharegpt: the `from` values -> roles (default human/gpt/system -> user/assistant/system).
    roles: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DataParams:
    # Longest conversation, in tokens after the chat template, that training may see.
    max_seq_length: int = field(default=512, metadata=POSITIVE)
    # false: a longer conversation is an error; true: it is dropped and counted in metrics/data.json.
    drop_too_long: bool = False
    # Word 3-gram Jaccard similarity from which two texts are near-duplicates: a warning between conversations,
    # an error between a gate case's prompt and a training user turn (pipeline/data_checks.py).
    near_duplicate_threshold: float = field(default=0.8, metadata=_check(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    # Gate case ids whose prompt may appear in the training data (their scores then measure recall).
    allow_gate_cases: list[str] = field(default_factory=list)
    # Where the conversations come from; null = prepare's --train and --eval files (data/train.jsonl, data/eval.jsonl).
    sources: list[SourceParams] | None = None
    # Without an eval source: the share of each train source held out for the eval loss, chosen by a hash of
    # each conversation's user turns (stable when rows are appended; a question's variants stay together).
    eval_fraction: float = field(default=0.0, metadata=FRACTION)
    # Seed of the mixing samples (weights that are not whole numbers).
    seed: int = 42


def _chat_families() -> list[str]:
    from pipeline.chat_templates import CHAT_TEMPLATES  # the chat families' one home

    return list(CHAT_TEMPLATES)


CHAT_FAMILY = {
    "check": (
        lambda v: v is None or v in _chat_families(),
        lambda: f"must be null or a chat family ({', '.join(_chat_families())})",
    ),
    "check_strings": True,
}


@dataclass(frozen=True)
class BaseParams:
    # smollm2 | gemma3-270m (opt-in: make gemma) | tiny | a hub id (org/name) | a local directory
    model: str = "smollm2"
    revision: str | None = None
    trust_remote_code: bool = False
    # The chat family whose template a base without one (a pretrained model) is given; null = the base's own.
    chat_template: str | None = field(default=None, metadata=CHAT_FAMILY)
    # dtype of the materialised base; auto keeps the checkpoint's own (float32 for the embedded ones)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"


@dataclass(frozen=True)
class BaseAnswersParams:
    # Greedy answer length for the general prompts; replay answers not finished within it are dropped.
    max_new_tokens: int = field(default=128, metadata=POSITIVE)
    seed: int = 42


@dataclass(frozen=True)
class LoraParams:
    r: int = field(default=16, metadata=POSITIVE)
    alpha: int = field(default=32, metadata=POSITIVE)
    dropout: float = field(default=0.05, metadata=FRACTION)
    target_modules: str | list[str] = "all-linear"


@dataclass(frozen=True)
class TrainParams:
    seed: int = 42
    # At most this many passes over the data.
    epochs: int = field(default=5, metadata=POSITIVE)
    # > 0: a budget of optimizer steps (still at most `epochs` epochs), so a small dataset gets more passes
    # than a large one; -1 = exactly `epochs` epochs.
    max_steps: int = field(default=-1, metadata=_check(lambda v: v == -1 or v > 0, "must be -1 or > 0"))
    # Learning-rate cycles of `max_steps` steps each (the schedule restarts; pipeline/cycles.py): after each,
    # another one only while our training answers' mean NLL (nats/token) is above `fit_nll`, or the gate's
    # learn cases, answered greedily as the gate asks them, score below `fit_learn` (null = not asked).
    # 1 = one schedule.
    cycles: int = field(default=1, metadata=POSITIVE)
    fit_nll: float = field(default=0.5, metadata=POSITIVE)
    fit_learn: float | None = field(
        default=None, metadata=_check(lambda v: v is None or 0 < v <= 1, "must be in (0, 1] or null")
    )
    # Replay: base_answers' conversations (the base's own answers to general prompts) mixed into training,
    # as a share of the training conversations (0.5: one replayed per two of ours); 0 = none.
    replay: float = field(default=0.0, metadata=NON_NEGATIVE)
    # beta of a KL(base || model) term on the replayed answers' tokens (pipeline/replay_kl.py): the base's
    # whole next-token distribution, not only its greedy answer; 0 = plain replay. Not with packing.
    replay_kl: float = field(default=0.0, metadata=NON_NEGATIVE)
    # One extra copy of each training conversation whose user turns' first lines lose about this share of their
    # words (seeded; pipeline/question_noise.py), so answers hang on the words that carry the fact; 0 = none.
    question_noise: float = field(default=0.0, metadata=FRACTION)
    # NEFTune: noise of this alpha added to the input embeddings while training; null = off.
    neftune_alpha: float | None = field(
        default=None, metadata=_check(lambda v: v is None or v > 0, "must be > 0 or null")
    )
    batch_size: int = field(default=8, metadata=POSITIVE)
    grad_accum: int = field(default=1, metadata=POSITIVE)
    learning_rate: float = field(default=1e-3, metadata=_check(lambda v: 0 < v < 1, "must be in (0, 1)"))
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = field(default=0.0, metadata=FRACTION)
    weight_decay: float = field(default=0.0, metadata=NON_NEGATIVE)
    max_grad_norm: float = field(default=1.0, metadata=POSITIVE)
    lora: LoraParams = field(default_factory=LoraParams)
    # 4-bit NF4 base (bitsandbytes); needs a CUDA GPU.
    qlora: bool = False
    # Used when the tokenizer has no pad token or pads with eos; added (and embeddings resized) if new.
    pad_token: str = "<pad>"
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    # bf16 autocast: auto = on a CUDA GPU that supports it, or a CPU with bf16 matrix units (AMX/AVX512-BF16)
    bf16: bool | Literal["auto"] = "auto"
    # Concatenate each batch without pad tokens (position ids keep the sequences apart): no compute on padding.
    padding_free: bool = True
    # auto = for padding-free or packed batches flex_attention on a CUDA GPU (block-sparse: no attention across
    # the packed conversations) and sdpa_packed elsewhere (SDPA on each conversation's slice,
    # pipeline/packed_attention.py); else sdpa. sdpa on a packed row computes a dense mask over all of it.
    attention: Literal["auto", "sdpa", "sdpa_packed", "flex_attention", "eager"] = "auto"
    # Pack conversations into rows of data.max_seq_length tokens (best-fit; loss masking unchanged).
    packing: bool = False
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit"] = (
        "adamw_torch"
    )
    # Liger kernels (CUDA, needs the liger-kernel package).
    liger: bool = False
    # > 1: run under torchrun with one process per GPU (DDP); batch_size is split between them.
    num_processes: int = field(default=1, metadata=POSITIVE)
    # Save a resumable checkpoint every N optimizer steps; 0 = at the end of every epoch.
    checkpoint_steps: int = field(default=0, metadata=NON_NEGATIVE)
    # Evaluations (one per epoch) without a better eval loss before training stops; 0 = never stop early.
    early_stopping_patience: int = field(default=2, metadata=NON_NEGATIVE)
    # true: the adapter of the evaluation with the best eval loss ships; false: the last step's. A small eval
    # set's loss can bottom out long before the facts are learned, so with a step budget the last is the default.
    keep_best: bool = True
    logging_steps: int = field(default=1, metadata=POSITIVE)
    # torch's CPU threads for this stage; null = torch's default (the machine's cores). The thread count
    # changes how sums are split, so fixing it is part of getting the same model on another CPU.
    cpu_threads: int | None = field(default=None, metadata=_check(lambda v: v is None or v > 0, "must be > 0 or null"))


@dataclass(frozen=True)
class MergeParams:
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    # Max |logit| difference allowed between the merged model as saved and the adapter model
    # (fp16 rounding of SmolLM2's weights moves its logits by about 0.08).
    atol: float = field(default=0.25, metadata=POSITIVE)
    # Share of probe positions whose top-1 token must stay the same after the cast to `dtype`.
    min_top1_agreement: float = field(default=0.99, metadata=_check(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    # Max |logit| difference allowed for the merge itself, before the cast to `dtype`.
    merge_atol: float = field(default=1e-3, metadata=POSITIVE)


@dataclass(frozen=True)
class ConvertParams:
    # Type of the 2-D weights in the GGUF; 1-D tensors (norms) are always f32, as llama.cpp writes them.
    outtype: Literal["f16", "bf16", "f32", "q8_0"] = "f16"
    # general.name in the GGUF; null = llama.cpp's rule (model card, config, else the directory name).
    model_name: str | None = None


# llama.cpp quantization types that need no importance matrix (llama-quantize's names, lower case).
QuantType = Literal[
    "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l",
    "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs",
]  # fmt: skip


@dataclass(frozen=True)
class QuantizeParams:
    # One GGUF per type (models/gguf/model-<type>.gguf), each its own DVC stage item.
    types: list[QuantType] = field(
        default_factory=lambda: ["q8_0", "q4_k_m"],
        metadata=_check(lambda v: len(v) == len(set(v)) > 0, "must be a non-empty list without repeats"),
    )
    # true: every weight in the named type (llama-quantize --pure); false: llama.cpp's k-quant mixes.
    pure: bool = False


UNIT = _check(lambda v: 0 <= v <= 1, "must be in [0, 1]")


@dataclass(frozen=True)
class GateParams:
    # Greedy decoding, the same for every model scored (and for Ollama's served check at deploy).
    max_new_tokens: int = field(default=96, metadata=POSITIVE)
    seed: int = 42
    n_ctx: int = field(default=2048, metadata=POSITIVE)
    # learn cases: mean after-score at least this, and at least this much above the base model's.
    learn_min_score: float = field(default=0.75, metadata=UNIT)
    learn_min_gain: float = field(default=0.5, metadata=UNIT)
    # keep cases: mean after-score may fall below the base model's by at most this (overtraining check).
    keep_max_drop: float = field(default=0.125, metadata=UNIT)
    # a GGUF's mean score may fall below the merged HF model's by at most this (conversion/quantization loss).
    gguf_max_drop: float = field(default=0.125, metadata=UNIT)
    # Reference likelihoods (nats per token, mean over the cases that have a `reference`):
    # learn cases' must fall by at least this against the base...
    learn_min_nll_drop: float = field(default=0.5, metadata=NON_NEGATIVE)
    # ...keep cases' may rise by at most this...
    keep_max_nll_rise: float = field(default=0.25, metadata=NON_NEGATIVE)
    # ...and the base's own answers to the general probes (stage base_answers) by at most this: forgetting.
    max_forgetting: float = field(default=0.25, metadata=NON_NEGATIVE)
    # The probes' likelihood is taken over the first this many tokens of each base answer: they carry what
    # the answer says (a long answer's tail follows from its own start), at half the cost of 128.
    probe_max_tokens: int = field(default=64, metadata=POSITIVE)
    # A case whose keyword score differs between the fine-tuned variants (merged, GGUFs) while their
    # reference NLLs agree within this is unstable: greedy noise, not a different model.
    unstable_nll_tolerance: float = field(default=0.1, metadata=NON_NEGATIVE)
    # How an unstable case counts: likelihood = passed when its reference NLL meets the rule of its kind
    # (learn: fell by learn_min_nll_drop; keep: rose at most keep_max_nll_rise); keywords = as answered;
    # fail = 0 on every variant.
    unstable: Literal["likelihood", "keywords", "fail"] = "likelihood"
    # which GGUF ships: auto = the smallest file that passes on its answers as given (no case decided as
    # unstable), else the smallest that passes; or one of quantize.types / convert.outtype.
    ship: str = "auto"


def _name_part(kind: str) -> dict:
    return {**_check(lambda v: name_part_error(kind, v) is None, f"must be {PARTS[kind][1]}"), "check_strings": True}


@dataclass(frozen=True)
class DeployParams:
    """python -m pipeline.deploy / pipeline.rollback: where models go. Environment and flags override."""

    # Docker registry (distribution's registry:2) as host:port; DEPLOY_REGISTRY overrides, --registry both.
    registry: str = field(default="registry.local:5000", metadata=_name_part("registry"))
    # true: the registry speaks plain HTTP (Ollama's push --insecure); false: HTTPS that Ollama's host trusts.
    insecure: bool = True
    # Repository <namespace>/<model>, lower case: registries answer 404 to upper case.
    namespace: str = field(default="llm-gitops", metadata=_name_part("namespace"))
    model: str = field(default="opl-assistant", metadata=_name_part("model"))
    # Ollama servers that serve the model (the rig, the workstation); OLLAMA_HOST (comma-separated) overrides.
    hosts: list[str] = field(
        default_factory=lambda: ["http://127.0.0.1:11434"],
        metadata=_check(lambda v: len(v) > 0, "must list at least one Ollama host"),
    )
    # Transient failures (unreachable, 5xx, a cut stream) are retried this many times, after backoff_s, 2x, 4x...
    retries: int = field(default=3, metadata=NON_NEGATIVE)
    backoff_s: float = field(default=2.0, metadata=NON_NEGATIVE)
    # Longest silence on one HTTP connection (a model load; long uploads stream progress inside it).
    timeout_s: float = field(default=600.0, metadata=POSITIVE)
    # Overall deadline of one operation, all its attempts together: a GGUF upload, a create or push stream
    # (a server streaming progress forever is cut), a blob download. Keep it below the deploy jobs' timeout.
    deadline_s: float = field(default=3600.0, metadata=POSITIVE)
    # Deployment records (JSON Lines) appended by deploy and rollback; CI keeps it as an artifact, and each
    # deployed version's record and gate verdict also lives in the registry (<model>-releases).
    records: str = "deployments/records.jsonl"
    # Retention (python -m pipeline.retention): the newest this many versions stay in the registry, besides
    # `latest`, every version a git tag `model-v*` names, and every version deployed in the last keep_days
    # (0: none kept by date).
    keep_versions: int = field(default=5, metadata=POSITIVE)
    keep_days: int = field(default=30, metadata=NON_NEGATIVE)


@dataclass(frozen=True)
class ModelfileParams:
    # SYSTEM: Ollama's chat puts it first in a conversation that has no system message of its own;
    # null = none (the model's chat template then applies its own default, e.g. SmolLM2's).
    system: str | None = None
    # PARAMETER num_ctx: the context window Ollama runs the model with, in tokens.
    num_ctx: int = field(default=2048, metadata=POSITIVE)
    # PARAMETER num_gpu: layers offloaded to the GPU; 0 = CPU only; null = Ollama decides.
    num_gpu: int | None = field(default=None, metadata=_check(lambda v: v is None or v >= 0, "must be >= 0 or null"))
    # LICENSE: a UTF-8 text file shipped as the model's license, a relative path inside modelfiles/ (which the stage
    # tracks); null = no LICENSE.
    license: str | None = None


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    base: BaseParams = field(default_factory=BaseParams)
    base_answers: BaseAnswersParams = field(default_factory=BaseAnswersParams)
    train: TrainParams = field(default_factory=TrainParams)
    merge: MergeParams = field(default_factory=MergeParams)
    convert: ConvertParams = field(default_factory=ConvertParams)
    quantize: QuantizeParams = field(default_factory=QuantizeParams)
    gate: GateParams = field(default_factory=GateParams)
    modelfile: ModelfileParams = field(default_factory=ModelfileParams)
    deploy: DeployParams = field(default_factory=DeployParams)


def _key_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """Map dotted key -> 1-based line number, from the YAML node tree."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key + "."))
    elif isinstance(node, yaml.SequenceNode):  # data.sources[0].path
        for index, item in enumerate(node.value):
            key = f"{prefix.rstrip('.')}[{index}]"
            lines[key] = item.start_mark.line + 1
            lines.update(_key_lines(item, key + "."))
    return lines


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_describe(typing.get_args(tp)[0])} to {_describe(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping of keys"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is list:
        return isinstance(value, list) and all(_matches(v, typing.get_args(tp)[0]) for v in value)
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        return isinstance(value, dict) and all(
            _matches(k, key_type) and _matches(v, value_type) for k, v in value.items()
        )
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _dataclass_items(tp: Any) -> type | None:
    """The section type of `list[Section]` or `list[Section] | None`, else None."""
    for option in typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,):
        if typing.get_origin(option) is list and dataclasses.is_dataclass(typing.get_args(option)[0]):
            return typing.get_args(option)[0]
    return None


def _build(cls: type, raw: Any, prefix: str, errors: list[tuple[str, str]]) -> Any:
    if not isinstance(raw, dict):
        errors.append((prefix.rstrip(".") or "(top level)", "expected a mapping of keys"))
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            errors.append((f"{prefix}{key}", f"unknown key (known: {', '.join(fields)})"))
    values = {}
    for name, spec in fields.items():
        if name not in raw:
            continue
        key, value, tp = f"{prefix}{name}", raw[name], hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, value, key + ".", errors)
            continue
        if not _matches(value, tp):
            hint = ""
            if isinstance(value, str) and _matches(0.5, tp) and _is_number(value):
                hint = " (YAML reads 1e-3 as a string: write 1.0e-3)"
            errors.append((key, f"expected {_describe(tp)}, got {value!r}{hint}"))
            continue
        item = _dataclass_items(tp)
        if item is not None and value is not None:  # a list of sections (data.sources), each checked as one
            values[name] = [_build(item, entry, f"{key}[{i}].", errors) for i, entry in enumerate(value)]
            continue
        check = spec.metadata.get("check")
        checked = not isinstance(value, str) or spec.metadata.get("check_strings", False)
        if check and checked and not check[0](value):
            message = check[1]() if callable(check[1]) else check[1]  # callable: choices read when needed
            errors.append((key, f"{message}, got {value!r}"))
            continue
        values[name] = float(value) if tp is float else value
    return cls(**values)


def _remote_code_error(base: BaseParams, raw: Any) -> tuple[str, str] | None:
    """A hub base (org/name, not a local directory) with trust_remote_code needs a pinned commit."""
    if not base.trust_remote_code or "/" not in base.model or Path(base.model).is_dir():
        return None
    if isinstance(base.revision, str) and HUB_COMMIT.match(base.revision):
        return None
    reason = f"a 40-hex commit (trust_remote_code runs {base.model}'s code), got {base.revision!r}"
    given = isinstance(raw, dict) and isinstance(raw.get("base"), dict) and "revision" in raw["base"]
    if given:
        return "base.revision", f"must be {reason}"
    return "base.trust_remote_code", f"true for a hub model needs base.revision pinned to {reason}"


def _license_error(path: str) -> str | None:
    """Why `path` is not a file inside modelfiles/ (relative, no ..), or None."""
    parts = PurePosixPath(path).parts
    if PurePosixPath(path).is_absolute():
        return f"must be a relative path inside {LICENSE_DIR}/, got the absolute path {path!r}"
    if ".." in parts:
        return f"must be a path inside {LICENSE_DIR}/ without '..', got {path!r}"
    if len(parts) < 2 or parts[0] != LICENSE_DIR:
        return f"must be a file inside {LICENSE_DIR}/ (the modelfile stage tracks it), got {path!r}"
    return None


def _cross_errors(params: Params, raw: Any) -> list[tuple[str, str]]:
    """Rules between keys, or beyond a value's type: checked once every key has its own value."""
    errors = []
    if error := _remote_code_error(params.base, raw):
        errors.append(error)
    if params.modelfile.license is not None and (reason := _license_error(params.modelfile.license)):
        errors.append(("modelfile.license", reason))
    if params.train.cycles > 1 and params.train.packing:
        reason = "needs train.packing: false (the fit is measured on our own conversations, not packed rows); 1 to pack"
        errors.append(("train.cycles", reason))
    if params.train.replay_kl and params.train.packing:
        reason = "needs train.packing: false (a packed row mixes replayed and other conversations); 0 to pack"
        errors.append(("train.replay_kl", reason))
    return errors


def build_params(raw: Any) -> tuple[Params, list[tuple[str, str]]]:
    """Params from an already loaded mapping, and every (dotted key, reason) wrong in it. The sweep
    (pipeline/sweep_spec.py) checks params.yaml with a point's overrides applied through this."""
    errors: list[tuple[str, str]] = []
    params = _build(Params, raw if raw is not None else {}, "", errors)
    return params, errors + _cross_errors(params, raw)


def parse_params(text: str, source: str = "params.yaml") -> Params:
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PipelineError(f"{source}: invalid YAML: {error}") from None
    lines = _key_lines(node) if node is not None else {}
    params, errors = build_params(raw)
    if errors:
        located = sorted((lines.get(key, 1), key, message) for key, message in errors)
        report = [f"{source}:{line}: {key}: {message}" for line, key, message in located]
        raise PipelineError("invalid params:\n  " + "\n  ".join(report))
    return params


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise PipelineError(f"{path}: cannot read params: {error.strerror}") from None
    return parse_params(text, str(path))
