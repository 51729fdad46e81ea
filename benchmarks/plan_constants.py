"""Whether each tuning constant of the plan earns its place: each case with the constant as shipped and without it (or
at its former value), side by side.

    python benchmarks/plan_constants.py [--rounds 8] [--only budget] [--json results/benchmarks/plan-constants-cpu.json]

The block budget is a module constant read when a call is planned, so its variants take turns in one process on one
model, the order alternating every round: drift on a noisy machine hits both alike, and the ratio is paired per
round. ``AUTO_COMPILE_MIN_ELEMENTS`` decides whether a run compiles at all, a one-time cost, so
its variants are whole fresh processes on an empty compiler cache, alternating.

Cases (bench.py's Llama-shaped models, random weights, float32, CPU, AdamW steps):

* ``CPU_BLOCK_ELEMENTS`` = 2^21 (one budget for every call) against 2^19 (0.4.0's budget for the compiled kernel with
  a backward to follow) and 2^18 (0.4.0's eager budget): a training step at hidden 1024 with all seven projections
  (r = 8, 256 tokens), one at Llama-2-7B's q/v shapes (r = 64, 512 tokens), an evaluation forward at hidden 1024;
  the eager kernel (``PEFT_LORAN_COMPILE=0``) training at hidden 1024;
* ``AUTO_COMPILE_MIN_ELEMENTS`` = 2^20: a 60-step job on 384-wide layers (MiniLM's width: 6 layers, q/v, batch 8 x
  128 tokens) with the eager kernel (what auto gives there) against the compiled one (what a lower threshold would
  give), each process's whole wall time on an empty inductor cache.
* ``INLINE_PRODUCT_MAX_RANK`` = 8 (the compiled kernels form ``B A`` inside their element-wise loop up to rank 8)
  against 0 (``B A`` always a GEMM): the evaluation forward and a training step at hidden 1024, all seven, r = 8.
  Measured at commit ed89ffd on the AVX2 EPYC (0.97x training, 1.01x evaluation without it; the floats were then
  loaded inside the loop) it was removed; after the floats became literals it measured 1.02-1.08x (evaluation, four
  runs, median 1.055x) and 1.03x (training) without it on an AVX-512 EPYC and came back. The old rows stay in
  results/benchmarks/plan-constants-cpu.json.
* The compiled kernels' inline sine and cosine (``peft_loran.trig``, used where ``kernels.MAX_ARGUMENT`` bounds a
  block's arguments) against torch's: the evaluation forward and a training step at hidden 1024, all seven, r = 8.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import cpu_name, write_json  # noqa: E402

#: the compiled kernels with torch's sine: no block's arguments are bounded within a negative limit
TORCH_SINE = {"MAX_ARGUMENT": -1.0}
HIDDEN_1024 = dict(hidden=1024, layers=8, tokens=256, rank=8)
SEVEN_B_QV = dict(hidden=4096, intermediate=11008, heads=32, vocab=1000, layers=2, tokens=512, rank=64, alpha=16.0,
                  targets="qv")


def in_process(case: dict, kind: str, variants: list[tuple[str, dict]], rounds: int,
               compile_mode: str = "auto") -> dict:
    """Variants (label, {module constant: value}) taking turns on one model; seconds per call."""
    import torch

    from bench import Case, _adapt, _build
    from peft_loran import kernels, plan

    kernels.set_kernel_compilation(compile_mode)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    full = Case(**{"method": "loran", "targets": "all", **case})
    model = _adapt(_build(Case(**{**full.__dict__, "method": "base"})), full)
    ids = torch.randint(0, full.vocab, (full.batch, full.tokens))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def call():
        if kind == "eval":
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            return
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def setting(values: dict):
        for key, value in values.items():
            setattr(kernels if hasattr(kernels, key) else plan, key, value)

    shipped = {key: getattr(kernels if hasattr(kernels, key) else plan, key) for _, v in variants for key in v}
    times: dict[str, list[float]] = {label: [] for label, _ in variants}
    for label, values in variants:  # warm-up: compile every variant's graphs
        setting({**shipped, **values})
        call()
    for r in range(rounds):
        for label, values in (variants if r % 2 == 0 else variants[::-1]):
            setting({**shipped, **values})
            t0 = time.perf_counter()
            call()
            times[label].append(time.perf_counter() - t0)
    setting(shipped)
    kernels.set_kernel_compilation(None)
    first = variants[0][0]
    return {label: {"median_ms": 1000 * statistics.median(t), "unit": "ms",
                    "paired_ratio": statistics.median(x / y for x, y in zip(t, times[first])), "times": t}
            for label, t in times.items()}


JOB_CHILD = r"""
import sys, time
t0 = time.perf_counter()
import torch
sys.path.insert(0, {here!r})
from bench import Case, _adapt, _build
torch.set_num_threads(2)
case = Case(method="loran", hidden=384, intermediate=1536, heads=12, layers=6, tokens=128, batch=8, rank=8,
            targets="qv", dropout=0.05)
model = _adapt(_build(Case(**{{**case.__dict__, "method": "base"}})), case)
ids = torch.randint(0, case.vocab, (case.batch, case.tokens))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
model.train()
for _ in range(60):
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
print(time.perf_counter() - t0)
"""


def job(rounds: int) -> dict:
    variants = [("eager kernel: auto below 2^20 (ships)", "auto"), ("compiled kernel", "1")]
    times: dict[str, list[float]] = {label: [] for label, _ in variants}
    for r in range(rounds):
        for label, mode in (variants if r % 2 == 0 else variants[::-1]):
            with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
                started = time.perf_counter()
                subprocess.run([sys.executable, "-c", JOB_CHILD.format(here=HERE)], check=True, capture_output=True,
                               env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PEFT_LORAN_COMPILE": mode})
                times[label].append(time.perf_counter() - started)
    first = variants[0][0]
    return {label: {"median_ms": 1000 * statistics.median(t), "unit": "s",
                    "paired_ratio": statistics.median(x / y for x, y in zip(t, times[first])), "times": t}
            for label, t in times.items()}


EXPERIMENTS = {
    "CPU_BLOCK_ELEMENTS, training, hidden 1024, all seven": lambda n: in_process(
        HIDDEN_1024, "train", [("2^21 (ships)", {}), ("2^19", {"CPU_BLOCK_ELEMENTS": 2**19})], n),
    "CPU_BLOCK_ELEMENTS, evaluation forward, hidden 1024, all seven": lambda n: in_process(
        HIDDEN_1024, "eval", [("2^21 (ships)", {}), ("2^19", {"CPU_BLOCK_ELEMENTS": 2**19})], 2 * n),
    "CPU_BLOCK_ELEMENTS, eager kernel, training, hidden 1024, all seven": lambda n: in_process(
        HIDDEN_1024, "train", [("2^21 (ships)", {}), ("2^18", {"CPU_BLOCK_ELEMENTS": 2**18})], n,
        compile_mode="0"),
    "CPU_BLOCK_ELEMENTS, training, Llama-2-7B q/v, r 64": lambda n: in_process(
        SEVEN_B_QV, "train", [("2^21 (ships)", {}), ("2^19", {"CPU_BLOCK_ELEMENTS": 2**19})], max(3, n // 2)),
    "INLINE_PRODUCT_MAX_RANK, evaluation forward, hidden 1024, all seven, r 8": lambda n: in_process(
        HIDDEN_1024, "eval", [("8 (ships)", {}), ("0: B A always a GEMM", {"INLINE_PRODUCT_MAX_RANK": 0})], 2 * n),
    "INLINE_PRODUCT_MAX_RANK, training, hidden 1024, all seven, r 8": lambda n: in_process(
        HIDDEN_1024, "train", [("8 (ships)", {}), ("0: B A always a GEMM", {"INLINE_PRODUCT_MAX_RANK": 0})], n),
    "inline sine (trig), evaluation forward, hidden 1024, all seven, r 8": lambda n: in_process(
        HIDDEN_1024, "eval", [("inline (ships)", {}), ("torch's sine", TORCH_SINE)], 2 * n),
    "inline sine (trig), training, hidden 1024, all seven, r 8": lambda n: in_process(
        HIDDEN_1024, "train", [("inline (ships)", {}), ("torch's sine", TORCH_SINE)], n),
    "AUTO_COMPILE_MIN_ELEMENTS, a 60-step job on 384-wide layers, empty compiler cache": lambda n: job(max(3, n // 3)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--only", help="run the experiments whose name contains this text")
    parser.add_argument("--json", help="write every measurement here")
    args = parser.parse_args()
    results = {}
    for name, run in EXPERIMENTS.items():
        if not args.only or args.only in name:
            results[name] = run(args.rounds)
            print(f"  {name}: {json.dumps({k: round(v['median_ms'], 1) for k, v in results[name].items()})}",
                  file=sys.stderr, flush=True)
    print(f"CPU: {cpu_name()}, {os.environ.get('BENCH_THREADS', os.cpu_count())} threads\n")
    print("| case | as shipped | without (what) | without / as shipped, paired median |\n|---|---|---|---|")
    for name, variants in results.items():
        (_, first), (label, other) = list(variants.items())[:2]
        scale, unit = (1000.0, "s") if first["unit"] == "s" else (1.0, "ms")
        print(f"| {name} | {first['median_ms'] / scale:.{1 if unit == 's' else 0}f} {unit} | "
              f"{other['median_ms'] / scale:.{1 if unit == 's' else 0}f} {unit} ({label}) | "
              f"{other['paired_ratio']:.2f}x |")
    if args.json:
        write_json(args.json, {"cpu": cpu_name(), "rounds": args.rounds, "results": results})


if __name__ == "__main__":
    main()
