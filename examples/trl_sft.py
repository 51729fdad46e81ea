"""Supervised fine-tuning with TRL's SFTTrainer and a LoRAN adapter: prompt -> completion pairs from your JSONL or
CSV file, the adapter saved in PEFT's format and reloaded for generation.

    python examples/trl_sft.py --model smollm2 --train-file replies.jsonl --prompt-field question \
        --completion-field answer --output-dir runs/sft
    # the paper's QLoRA base (bitsandbytes): --load-in-4bit

``--model`` is a local model folder, a hub id where the machine is online, or ``smollm2`` (the bundled SmolLM2-135M).
TRL's SFTTrainer takes the PEFT config as ``peft_config``: with ``import peft_loran`` a ``LoranConfig`` works there
exactly as a ``LoraConfig`` does.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import peft_loran  # noqa: F401  (registers LoRAN with PEFT)
from peft_loran import LoranConfig
from peft_loran_cli.data import read_rows
from peft_loran_cli.loading import qlora_quantization
from peft_loran_cli.models import resolve_model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--train-file", required=True, help="JSONL or CSV with a prompt and a completion field")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--completion-field", default="completion")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA: NF4 base with double quantization")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    model_path = resolve_model(args.model)
    rows = read_rows(args.train_file)
    data = Dataset.from_list([{"prompt": str(r[args.prompt_field]), "completion": " " + str(r[args.completion_field])}
                              for r in rows])
    quantization = {"quantization_config": qlora_quantization()} if args.load_in_4bit else {}
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    config = SFTConfig(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                       learning_rate=args.lr, max_length=args.max_length, logging_steps=10, save_strategy="no",
                       report_to=[], use_cpu=not torch.cuda.is_available())
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_path, **quantization), args=config,
                         train_dataset=data, processing_class=tokenizer,
                         peft_config=LoranConfig(r=args.rank, loran_alpha=2 * args.rank, loran_dropout=0.05,
                                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    trainer.train()
    trainer.save_model(args.output_dir)  # adapter_config.json + adapter_model.safetensors (PEFT's format)

    # reload the saved adapter as a user of the result would, and answer the first prompt
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path, **quantization),
                                      args.output_dir).eval()
    prompt = tokenizer(data[0]["prompt"], return_tensors="pt")
    prompt = {k: prompt[k] for k in ("input_ids", "attention_mask")}  # some tokenizers add token_type_ids
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    print(f"adapter saved to {args.output_dir}")
    print(f"prompt:    {data[0]['prompt']}")
    print(f"generated: {tokenizer.decode(out[0, prompt['input_ids'].shape[1]:], skip_special_tokens=True).strip()}")


if __name__ == "__main__":
    main()
