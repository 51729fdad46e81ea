"""transformers' Trainer, TRL's SFTTrainer and QLoRA through the command line, with LoRAN adapters."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_loran import LoranConfig

from .conftest import tiny_llama
from .conftest import make_tiny_lm
from .test_cli import run


def text_dataset(n=16):
    from datasets import Dataset

    return Dataset.from_dict({"text": [f"story {i}: the quick brown fox jumps over the lazy dog" for i in range(n)]})


def adapter_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "loran_" in n}


def assert_moved(before: dict, after: dict) -> None:
    """Training changed the adapter: every B (zero at the start) is non-zero now, and A moved too."""
    assert before.keys() == after.keys() and before
    for name in before:
        if "loran_B" in name:
            assert float(before[name].abs().sum()) == 0.0 and float(after[name].abs().sum()) > 0, name
    assert any(not torch.equal(before[n], after[n]) for n in before if "loran_A" in n)


def test_transformers_trainer_save_reload_generate(tiny_lm, tmp_path):  # noqa: F811
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainingArguments)

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm),
                           LoranConfig(r=4, target_modules=["q_proj", "v_proj"], loran_dropout=0.1))
    data = text_dataset().map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=5e-3, report_to=[], save_strategy="no", logging_steps=1,
                             gradient_accumulation_steps=2, gradient_checkpointing=True, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    before = adapter_state(model)
    result = trainer.train()
    assert_moved(before, adapter_state(model))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert result.global_step == 4 and len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    trainer.save_model(str(tmp_path / "adapter"))
    # what was saved is what was trained: the reloaded adapter gives the in-memory model's logits
    ids = torch.tensor([[101, 2000, 2001, 2002]])
    model.eval()
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), tmp_path / "adapter")
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, model(input_ids=ids).logits)
    model.eval()
    prompt = tok("story 3:", return_tensors="pt")
    prompt = {k: prompt[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded.generate(**prompt, max_new_tokens=6, do_sample=False), expected)


def test_trl_sft_trainer_save_reload_generate(tiny_lm, tmp_path):  # noqa: F811
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'peft-loran[trl]')")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    config = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=4,
                           learning_rate=5e-3, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                           max_length=32)
    trainer = trl.SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_lm), args=config,
                             train_dataset=text_dataset(), processing_class=tok,
                             peft_config=LoranConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert isinstance(trainer.model, PeftModel)
    assert trainer.model.peft_config["default"].peft_type == "LORAN"
    before = adapter_state(trainer.model)
    trainer.train()
    assert_moved(before, adapter_state(trainer.model))
    assert trainer.state.global_step == 3
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), tmp_path / "adapter").eval()
    prompt = torch.tensor([[101, 2000]])
    out = reloaded.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    trained = trainer.model.eval()
    assert torch.equal(out, trained.generate(input_ids=prompt, max_new_tokens=4, do_sample=False))


def tiny_bert(tokenizer_dir, path, hidden: int = 64) -> str:
    """A tiny BERT whose widths bitsandbytes' 4-bit kernels accept (multiples of 64), saved with its tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def printed_number(capsys, metric: str) -> tuple[float, str]:
    """``evaluate``'s number (from its JSON line) and its result line."""
    lines = capsys.readouterr().out.splitlines()
    return json.loads(lines[0])[metric], next(line for line in lines if line.startswith(f"{metric}: "))


@pytest.mark.parametrize("kind", ["generate", "classify"])
def test_a_4bit_run_is_evaluated_inspected_and_exported_on_its_4bit_base(kind, tokenizer_dir, tmp_path, capsys):
    """QLoRA through the command line: a generator and a classifier (its head stays a float nn.Linear, trained and
    saved) train on an NF4 base; ``evaluate`` with no options loads the base as the run did (the task record says
    so) and reports the run's own number; inspect and export load it the same way."""
    pytest.importorskip("bitsandbytes")
    if kind == "generate":  # every width a multiple of 64: bitsandbytes' 4-bit kernels work in blocks of 64
        model_dir = make_tiny_lm(tokenizer_dir, tmp_path / "lm128", hidden=128, intermediate=256)
        rows = [json.dumps({"source": f"article {i} about things", "target": f"title {i}"}) for i in range(12)]
        options, metric = ["--task-type", "generate"], "rougeL"
    else:
        model_dir = tiny_bert(tokenizer_dir, tmp_path / "bert64")
        rows = [json.dumps({"text": f"{w} item {i}", "label": w}) for i in range(8) for w in ("oven", "tide", "orbit")]
        options, metric = ["--task-type", "classify", "--targets", "query,value"], "accuracy"
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(rows))
    out = tmp_path / "q"
    assert run(["train", "--model", model_dir, "--train-file", str(path), *options, "--steps", "2", "--batch-size",
                "2", "--max-length", "32", "--load-in-4bit", "--output-dir", str(out), "--quiet"]) == 0
    trained = json.loads((out / "metrics.json").read_text())["metrics"][metric]
    record = json.loads((out / "adapter" / "peft_loran_task.json").read_text())
    assert record["base_loading"]["quantization"] == "nf4"
    if kind == "classify":  # the head was trained in float and saved with the adapter
        from safetensors import safe_open

        with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as fh:
            head = [k for k in fh.keys() if "classifier" in k and k.endswith("weight")]
            assert head and fh.get_tensor(head[0]).dtype == torch.float32
    capsys.readouterr()
    assert run(["evaluate", str(out / "adapter"), "--quiet"]) == 0
    value, line = printed_number(capsys, metric)
    assert "base model loaded in 4-bit NF4" in line and value == pytest.approx(trained, abs=1e-6)
    assert run(["inspect", str(out / "adapter"), "--output", str(tmp_path / "s.png"), "--quiet"]) == 0
    assert run(["export", str(out / "adapter"), "--merge", "--output-dir", str(tmp_path / "merged"), "--quiet"]) == 0
    assert "4-bit base dequantized" in capsys.readouterr().out


def test_loran_model_under_trainer_trains_only_adapter(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(0), LoranConfig(target_modules="all-linear"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = torch.arange(1, 13).repeat(8, 1)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, learning_rate=1e-2)
    before = adapter_state(model)
    Trainer(model=model, args=args, train_dataset=data).train()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert_moved(before, adapter_state(model))
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "loran_B" in n)
