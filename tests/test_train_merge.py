"""Train and merge on the tiny model: labels, pad token, resized vocabulary, merge verification."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from pipeline.common import PipelineError, read_jsonl
from pipeline.train import Device, attention_for, build_trainer, check_device, precision
from tests.conftest import MULTI_TURN
from tests.test_templates import trained_runs

CPU = Device(cuda=False, bf16=False)


def test_trainer_labels_only_the_assistant_turns_of_a_multi_turn_conversation(tiny_base, repo_params, tmp_path):
    rows = [{"messages": MULTI_TURN}]
    setup = build_trainer(tiny_base, rows, rows, repo_params.train, repo_params.data, tmp_path, CPU)
    trainer, tokenizer, shipped = setup.trainer, setup.tokenizer, setup.shipped_template
    row = trainer.train_dataset[0]
    # train ids == the ids the shipped (serving) template produces
    assert (
        row["input_ids"]
        == tokenizer.apply_chat_template(MULTI_TURN, chat_template=shipped, return_dict=True)["input_ids"]
    )
    runs = trained_runs(row["input_ids"], [label != -100 for label in row["labels"]])
    assert [tokenizer.decode(run) for run in runs] == [
        'PROC main:\n  PRINT "Hello Chris"\nENDP </s>',
        'PROC main:\n  PRINT "Hello Chris"\n  GET\nENDP </s>',
    ]
    assert all(run[-1] == tokenizer.eos_token_id for run in runs)  # the model learns to stop
    trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    assert tokenizer.encode("You are an OPL expert.", add_special_tokens=False)[1] not in trained


def test_a_tokenizer_without_pad_gets_a_new_pad_token_and_resized_embeddings(tiny_base, repo_params, tmp_path):
    rows = [{"messages": MULTI_TURN}]
    setup = build_trainer(tiny_base, rows, rows, repo_params.train, repo_params.data, tmp_path, CPU)
    trainer, tokenizer, resized = setup.trainer, setup.tokenizer, setup.embeddings_resized
    model = trainer.model.get_base_model()
    assert resized and tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 512
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size == len(tokenizer) == 513
    embeddings = model.get_input_embeddings().weight
    assert embeddings[512].tolist() == pytest.approx(embeddings[:512].mean(0).tolist(), abs=1e-6)


def test_smollm2_pad_equal_to_eos_is_replaced(smollm2_tokenizer):
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.vocab import ensure_pad_token

    tokenizer = copy.deepcopy(smollm2_tokenizer)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2  # as shipped: the case to fix
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            tie_word_embeddings=True,
        )
    )
    assert ensure_pad_token(tokenizer, model, "<pad>") is True
    assert tokenizer.convert_ids_to_tokens(tokenizer.pad_token_id) == "<pad>" and tokenizer.pad_token_id == 49152
    assert model.config.pad_token_id == model.generation_config.pad_token_id == 49152
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 49153


def test_qlora_without_cuda_is_one_clear_error(repo_params):
    qlora = dataclasses.replace(repo_params.train, qlora=True)
    with pytest.raises(PipelineError, match=r"train\.qlora: true needs a CUDA GPU"):
        check_device(qlora, CPU)


def test_attention_auto_never_attends_densely_over_a_padding_free_row(repo_params):
    cuda = Device(cuda=True, bf16=True, tf32=True)
    train = repo_params.train
    assert attention_for(train, cuda) == "flex_attention"  # dense sdpa masks over a packed row cost 2x on a GPU
    assert attention_for(train, CPU) == "sdpa_packed"  # SDPA on each conversation's slice
    assert attention_for(dataclasses.replace(train, padding_free=False), cuda) == "sdpa"
    assert attention_for(dataclasses.replace(train, padding_free=False), CPU) == "sdpa"
    assert attention_for(dataclasses.replace(train, padding_free=False, packing=True), cuda) == "flex_attention"
    assert attention_for(dataclasses.replace(train, attention="eager"), cuda) == "eager"


def test_the_recorded_precision_is_what_this_machine_trains_in(repo_params):
    train = repo_params.train  # bf16: auto, the committed default
    assert precision(train, Device(cuda=True, bf16=True)) == "bf16"
    assert precision(train, Device(cuda=False, bf16=True)) == "bf16-autocast"  # AMX / AVX512-BF16
    assert precision(train, CPU) == "fp32"
    assert precision(dataclasses.replace(train, bf16=False), Device(cuda=False, bf16=True)) == "fp32"
    assert precision(dataclasses.replace(train, qlora=True), Device(cuda=True, bf16=False)) == "nf4+fp32"


def test_training_is_seeded_with_deterministic_kernels_and_the_configured_cpu_threads():
    import torch

    from pipeline.common import deterministic_torch

    threads = torch.get_num_threads()
    try:
        deterministic_torch(7, cpu_threads=1)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.get_num_threads() == 1
        first = torch.rand(3)
        deterministic_torch(7)  # null: the thread count is left as it is
        assert torch.equal(torch.rand(3), first) and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def trained_and_merged(tiny_base, tiny_params_file, tiny_prepared, tmp_path_factory, monkeypatch_module):
    """The train and merge stages, run through their CLIs on the tiny model and the real dataset."""
    from pipeline import merge, train

    work = tmp_path_factory.mktemp("tiny-run")
    monkeypatch_module.setenv("LLM_GITOPS_CHECKPOINTS", str(work / "checkpoints"))
    shutil.copytree(tiny_prepared, work / "prepared")
    params = str(tiny_params_file)
    train.main(
        [
            "--params",
            params,
            "--base",
            str(tiny_base),
            "--data",
            str(work / "prepared"),
            "--out",
            str(work / "adapter"),
            "--metrics",
            str(work / "train.json"),
            "--plots",
            str(work / "plots"),
        ]
    )
    merge.main(
        [
            "--params",
            params,
            "--base",
            str(tiny_base),
            "--adapter",
            str(work / "adapter"),
            "--probe",
            str(work / "prepared" / "eval.jsonl"),
            "--out",
            str(work / "merged"),
            "--metrics",
            str(work / "merge.json"),
        ]
    )
    return work


def test_train_writes_adapter_with_resized_embeddings_metrics_and_loss_curves(trained_and_merged, repo_params):
    from safetensors import safe_open

    adapter = trained_and_merged / "adapter"
    with safe_open(adapter / "adapter_model.safetensors", "pt") as weights:
        embedding_keys = [k for k in weights.keys() if "embed_tokens" in k or "lm_head" in k]  # noqa: SIM118
        assert embedding_keys and all(weights.get_tensor(k).shape[0] == 513 for k in embedding_keys)
    assert json.loads((adapter / "tokenizer_config.json").read_text())["pad_token"] == "<pad>"
    assert "generation" not in (adapter / "chat_template.jinja").read_text()  # the serving template ships
    # all-linear's modules in one order, so the same training writes the same adapter_config.json every run
    modules = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert modules == sorted(modules)
    assert {name.rsplit(".", 1)[-1] for name in modules} == {
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"
    }  # fmt: skip
    metrics = json.loads((trained_and_merged / "train.json").read_text())
    assert metrics["embeddings_resized"] is True and metrics["pad_token"] == "<pad>"
    assert metrics["precision"] == precision(repo_params.train, Device.detect())
    assert metrics["steps"] > 0 and metrics["best_eval_loss"] <= metrics["first_eval_loss"]
    train_curve = (trained_and_merged / "plots" / "train" / "loss.tsv").read_text().splitlines()
    eval_curve = (trained_and_merged / "plots" / "eval" / "loss.tsv").read_text().splitlines()
    assert train_curve[0] == eval_curve[0] == "step\tepoch\tloss"
    assert len(train_curve) - 1 == metrics["steps"] and len(eval_curve) - 1 == round(metrics["epochs_run"])
    assert not any((trained_and_merged / "checkpoints").glob("train-*"))  # cleaned once the stage completed


def test_merged_model_matches_the_adapter_model_and_has_one_vocabulary_size(trained_and_merged):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.merge import compare, logits, probe_batch
    from pipeline.vocab import resize_embeddings

    merged_dir = trained_and_merged / "merged"
    report = json.loads((trained_and_merged / "merge.json").read_text())
    assert report["merge_max_abs_logit_diff"] < 1e-4 and report["saved_max_abs_logit_diff"] < 0.1
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["vocab_size"] == 513 and config["pad_token_id"] == 512 and config["dtype"] == "float16"

    # Independently: reload the saved fp16 model and the adapter model and compare logits.
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert len(tokenizer) == merged.get_input_embeddings().weight.shape[0] == 513
    base_dir = Path(
        json.loads((trained_and_merged / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    resize_embeddings(base, len(tokenizer))
    adapter = PeftModel.from_pretrained(base, trained_and_merged / "adapter").eval()
    batch = probe_batch(
        tokenizer, [row["messages"] for row in read_jsonl(trained_and_merged / "prepared" / "eval.jsonl")]
    )
    worst, top1 = compare(logits(adapter, batch), logits(merged, batch))
    assert worst < 0.1 and top1 > 0.99


def test_merge_refuses_a_tokenizer_that_disagrees_with_the_embeddings(tiny_base):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.vocab import check_vocab_consistency

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})  # 513 tokens, 512 embedding rows
    with pytest.raises(PipelineError) as raised:
        check_vocab_consistency(model, tokenizer, "merged model")
    assert str(raised.value) == (
        "merged model: vocabulary sizes disagree: config.vocab_size = 512, input embedding rows = 512, "
        "len(tokenizer) = 513, output embedding rows = 512"
    )
