"""The paper's LoRAN recipe: Llama-2-7B, 4-bit (QLoRA) base, r=64, alpha=16, dropout=0.2, q_proj/v_proj,
Sinter a=5e-5, w=1e4, on a summarization-style task, with transformers' Trainer under accelerate.

    # one GPU
    accelerate launch --config_file examples/accelerate/single_gpu.yaml examples/paper_recipe.py \
        --model meta-llama/Llama-2-7b-hf --output-dir runs/paper
    # several GPUs, data parallel (each GPU holds the 4-bit model)
    accelerate launch --config_file examples/accelerate/multi_gpu_ddp.yaml examples/paper_recipe.py ...
    # FSDP (bf16 base, or 4-bit with --quant-storage bfloat16), DeepSpeed ZeRO-2/3:
    accelerate launch --config_file examples/accelerate/fsdp.yaml examples/paper_recipe.py --quant-storage bfloat16 ...
    accelerate launch --config_file examples/accelerate/deepspeed_zero3.yaml examples/paper_recipe.py --no-4bit ...

Data: ``--train-file`` (JSONL/CSV with source/target fields; e.g. SAMSum exported as dialogue/summary with
``--source-field dialogue --target-field summary``) or a bundled task (``--task bbc-headline``, the default).
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Trainer, TrainingArguments

import peft_loran  # noqa: F401  (registers LoRAN with PEFT)
from peft import get_peft_model, prepare_model_for_kbit_training
from peft_loran import LoranConfig
from peft_loran_cli.data import load_task, user_task
from peft_loran_cli.encoding import Encoded, collate


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="meta-llama/Llama-2-7b-hf")
    p.add_argument("--task", default="bbc-headline")
    p.add_argument("--train-file")
    p.add_argument("--source-field", default="source")
    p.add_argument("--target-field", default="target")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--no-4bit", dest="four_bit", action="store_false", help="bf16 base instead of 4-bit")
    p.add_argument("--quant-storage", default=None, help="bnb_4bit_quant_storage (bfloat16 for FSDP + QLoRA)")
    p.add_argument("--cpu", action="store_true", help="smoke-test on CPU (float32, no quantization)")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {}
    if args.cpu:
        args.four_bit = False
    elif args.four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=getattr(torch, args.quant_storage) if args.quant_storage else torch.uint8)
    else:
        kwargs["dtype"] = torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    if args.four_bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)

    config = LoranConfig(r=64, loran_alpha=16, loran_dropout=0.2, target_modules=["q_proj", "v_proj"],
                         activation="sinter", sinter_amplitude=5e-5, sinter_frequency=1e4, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    task = (user_task(args.train_file, None, "generate", source_field=args.source_field,
                      target_field=args.target_field) if args.train_file else load_task(args.task))
    train_set = Encoded(task.train, tokenizer, "generate", args.max_length)
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 30), logging_steps=10, save_steps=max(args.max_steps // 4, 1), bf16=not args.cpu,
        gradient_checkpointing=not args.cpu, gradient_checkpointing_kwargs={"use_reentrant": False},
        report_to=[], use_cpu=args.cpu, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, data_collator=collate(tokenizer))
    trainer.train()
    if trainer.is_world_process_zero():
        print(f"trained on {trainer.args.world_size} process(es), {trainer.accelerator.distributed_type}", flush=True)
    trainer.save_model(args.output_dir)  # the adapter, in PEFT format (rank 0 only under accelerate)


if __name__ == "__main__":
    main()
