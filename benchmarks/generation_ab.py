"""Generation speed of an unmerged LoRAN adapter vs an unmerged PEFT LoRA adapter, interleaved in one process.

    python benchmarks/generation_ab.py [--targets all|qv] [--rounds 10] [--new-tokens 64]

`bench.py` runs each method in its own process, where the spread between processes (the same base model at
34-40 tokens/s) is as large as the difference being measured. Here the base model, a LoRA copy and a LoRAN copy
live in one process and take turns, round after round, so drift hits all three alike; the medians are compared.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import statistics
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import TARGETS, Case, _build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="all", choices=sorted(TARGETS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    from peft import LoraConfig, get_peft_model

    from peft_loran import LoranConfig

    base = _build(Case(method="base", targets=args.targets)).eval()
    targets = TARGETS[args.targets]
    models = {
        "base": base,
        "lora": get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                               init_lora_weights=False)).eval(),
        "loran": get_peft_model(copy.deepcopy(base), LoranConfig(r=8, loran_alpha=16, target_modules=targets,
                                                                 init_weights=False)).eval(),
    }
    prompt = torch.randint(0, 4096, (1, 16))
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model.generate(input_ids=prompt, **kwargs)  # warm-up (LoRAN: builds its eval cache)
        for _ in range(args.rounds):
            for name, model in models.items():
                t0 = time.perf_counter()
                model.generate(input_ids=prompt, **kwargs)
                times[name].append(time.perf_counter() - t0)
    speed = {name: args.new_tokens / statistics.median(t) for name, t in times.items()}
    print(f"targets {args.targets}, {args.new_tokens} new tokens, median of {args.rounds} interleaved rounds:")
    print("| base tok/s | LoRA tok/s | LoRAN tok/s | LoRAN / LoRA | LoRA / base | LoRAN / base |")
    print("|---|---|---|---|---|---|")
    print(f"| {speed['base']:.1f} | {speed['lora']:.1f} | {speed['loran']:.1f} | {speed['loran'] / speed['lora']:.2f}x | "
          f"{speed['lora'] / speed['base']:.2f}x | {speed['loran'] / speed['base']:.2f}x |")


if __name__ == "__main__":
    main()
