"""PEFT LoRA vs LoRAN (and the base model) taking turns in one process: the steadier comparison.

    python benchmarks/interleaved.py generation [--targets all|qv] [--rounds 30] [--new-tokens 64]
    python benchmarks/interleaved.py train      [--targets all|qv] [--rounds 12] [--tokens 256]
    python benchmarks/interleaved.py eval       [--targets all|qv] [--rounds 20] [--tokens 256]   # no-grad forward
    python benchmarks/interleaved.py train --paper [--dropout 0.2] [--rounds 8]   # the paper's recipe, 7B shapes

`bench.py` runs each method in its own process; on these machines the spread between processes (the same base
model at 34-40 tokens/s) is as large as the differences being measured. Here the models live in one process and
take turns, one generation (or one training step) each per round, the order rotating every round, so drift hits
all of them alike. Reported: each method's median, and the paired per-round ratio to LoRA (the two
measurements of a round are seconds apart) as median and range, plus in how many rounds LoRAN was ahead.
Same models as `bench.py`'s headline (hidden 1024, 8 layers, r = 8, float32, no dropout), or with ``--paper``
its ``paper`` preset (Llama-2-7B's layer shapes, 2 layers, r = 64, alpha 16, q/v, 512 tokens); memory is not
measured here (it cannot be interleaved): see `bench.py`.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import TARGETS, Case, _build  # noqa: E402


def interleave(runs: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each function, ``rounds`` times, the order rotating each round (one warm-up call)."""
    names = list(runs)
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def adapted_models(targets: str, paper: bool = False, dropout: float = 0.0) -> dict[str, torch.nn.Module]:
    from peft import LoraConfig, get_peft_model

    from peft_loran import LoranConfig

    case = Case(method="base", targets=targets)
    if paper:
        case = Case(method="base", hidden=4096, intermediate=11008, heads=32, vocab=1000, layers=2, targets="qv")
    base = _build(case)
    modules = TARGETS[case.targets]
    r, alpha = (64, 16) if paper else (8, 16)
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=modules, init_lora_weights=False, lora_dropout=dropout)
    loran = LoranConfig(r=r, loran_alpha=alpha, target_modules=modules, init_weights=False, loran_dropout=dropout)
    return {"base": base, "lora": get_peft_model(copy.deepcopy(base), lora),
            "loran": get_peft_model(copy.deepcopy(base), loran)}


def generation_runs(models: dict[str, torch.nn.Module], new_tokens: int) -> dict[str, Callable[[], None]]:
    prompt = torch.randint(0, 4096, (1, 16))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def generate(model):
        model.eval()
        return lambda: model.generate(input_ids=prompt, **kwargs)

    return {name: generate(model) for name, model in models.items()}


def eval_runs(models: dict[str, torch.nn.Module], tokens: int) -> dict[str, Callable[[], None]]:
    """One no-grad forward each (an evaluation batch); LoRAN as by default (no eval cache) and a copy with the cache
    on (``loran (eval cache)``)."""
    import peft_loran

    models = dict(models)
    models["loran (eval cache)"] = copy.deepcopy(models["loran"])
    peft_loran.set_eval_cache(models["loran (eval cache)"], True)
    ids = torch.randint(0, 4096, (1, tokens))

    def forward(model):
        model.eval()

        def run():
            with torch.no_grad():
                model(input_ids=ids)

        return run

    return {name: forward(model) for name, model in models.items()}


def train_runs(models: dict[str, torch.nn.Module], tokens: int, eager_copy: bool = True,
               vocab: int = 4096) -> dict[str, Callable[[], None]]:
    """One AdamW step each; ``loran (eager kernels)`` is a second LoRAN copy stepped with compilation off."""
    from peft_loran import kernels

    models = {"lora": models["lora"], "loran": models["loran"]}
    if eager_copy:
        models["loran (eager kernels)"] = copy.deepcopy(models["loran"])
    ids = torch.randint(0, vocab, (1, tokens))

    def step(model, eager_kernels=False):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def run():
            mode = kernels.kernel_compilation()
            # ours in a long job's steady state (compiled kernels from the start), or with the eager kernels
            kernels.set_kernel_compilation("0" if eager_kernels else "1")
            try:
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            finally:
                kernels.set_kernel_compilation(mode)

        return run

    runs = {"lora": step(models["lora"]), "loran": step(models["loran"])}
    if eager_copy:
        runs["loran (eager kernels)"] = step(models["loran (eager kernels)"], eager_kernels=True)
    return runs


def report(times: dict[str, list[float]], unit: str, per_call: float, reference: str = "lora") -> None:
    """``unit`` "tokens/s" (higher is better, ratios of speed) or "s/step" (lower is better, ratios of time); ratios
    paired per round against ``reference``."""
    speed = unit == "tokens/s"
    value = {name: (per_call / statistics.median(t) if speed else statistics.median(t)) for name, t in times.items()}
    print(f"| method | {unit} (median) | paired ratio to {reference}, median [min, max] | rounds ahead of {reference} |")
    print("|---|---|---|---|")
    for name, t in times.items():
        if name == reference:
            print(f"| {name} | {value[name]:.{1 if speed else 3}f} | 1.00x | |")
            continue
        ratios = [(lo / mine if speed else mine / lo) for mine, lo in zip(t, times[reference])]
        ahead = sum(mine < lo for mine, lo in zip(t, times[reference]))
        print(f"| {name} | {value[name]:.{1 if speed else 3}f} | {statistics.median(ratios):.3f}x "
              f"[{min(ratios):.2f}, {max(ratios):.2f}] | {ahead} of {len(t)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["generation", "train", "eval"])
    parser.add_argument("--targets", default="all", choices=sorted(TARGETS))
    parser.add_argument("--rounds", type=int, default=None, help="default: 30 (generation), 12 (train)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=None, help="training sequence length (256; --paper: 512)")
    parser.add_argument("--paper", action="store_true", help="the paper's recipe on Llama-2-7B's layer shapes")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapters' input (train)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    models = adapted_models(args.targets, args.paper, args.dropout)
    if args.what == "eval":
        rounds = args.rounds or 20
        tokens = args.tokens or 256
        times = interleave(eval_runs(models, tokens), rounds)
        print(f"evaluation forward (no grad), targets {args.targets}, {tokens} tokens, {rounds} interleaved rounds "
              "(a ratio above 1 means slower than the base model):")
        report(times, "s/step", 1.0, reference="base")
        return
    if args.what == "generation":
        rounds = args.rounds or 30
        with torch.no_grad():
            times = interleave(generation_runs(models, args.new_tokens), rounds)
        print(f"generation, targets {args.targets}, {args.new_tokens} new tokens, {rounds} interleaved rounds "
              "(unmerged adapters; a ratio above 1 means faster than LoRA):")
        report(times, "tokens/s", args.new_tokens)
    else:
        rounds = args.rounds or 12
        tokens = args.tokens or (512 if args.paper else 256)
        del models["base"]
        times = interleave(train_runs(models, tokens, eager_copy=not args.paper, vocab=1000 if args.paper else 4096),
                           rounds)
        what = "the paper's recipe (7B layer shapes, r = 64)" if args.paper else f"targets {args.targets}"
        print(f"training step, {what}, dropout {args.dropout}, {tokens} tokens, {rounds} interleaved rounds "
              "(a ratio above 1 means slower than LoRA):")
        report(times, "s/step", 1.0)


if __name__ == "__main__":
    main()
