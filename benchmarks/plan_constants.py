"""Whether each tuning constant of the plan earns its place: every case with the constant as shipped and without it
(or at its old value), side by side, each run in a fresh process, alternating, medians of ``--rounds``.

    python benchmarks/plan_constants.py [--rounds 3] [--json results/benchmarks/plan-constants-<cpu>.json]

Cases (bench.py's Llama-shaped models, random weights, float32, CPU):

* ``CPU_BLOCK_ELEMENTS`` (2^21, one budget for every call) against the budgets of 0.4.0 (2^18 eager / 2^19 compiled
  with a backward, 2^21 without): a training step at hidden 1024 with all seven projections (r = 8, 256 tokens), a
  training step at Llama-2-7B's q/v shapes (r = 64, 512 tokens), an evaluation forward at hidden 1024, all seven;
* the eager kernel's budget: 2^21 against 2^18 (the old eager budget), training at hidden 1024, all seven;
* ``INLINE_PRODUCT_MAX_RANK`` (8) against 0 (``B A`` always a GEMM): training at hidden 1024, all seven, r = 8;
* ``AUTO_COMPILE_MIN_ELEMENTS`` (2^20): a short job on 384-wide layers (MiniLM's width, the command line's main
  job: 6 layers, q/v, 128 tokens x 8, 60 steps) on an empty inductor cache with the eager kernel (what auto gives
  there) against the compiled kernel (what a lower threshold would give): the whole process's wall time.

Each figure is a median step (or forward) time in ms; "worth" is how much slower the case runs without the constant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import json, os, statistics, sys, time
t_process = time.perf_counter()
import torch
sys.path.insert(0, {here!r})
from bench import Case, _adapt, _build
from peft_loran import kernels, plan
for name, value in {patch!r}.items():
    setattr(kernels if hasattr(kernels, name) else plan, name, value)
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
case = Case(**{case!r})
model = _adapt(_build(Case(**{{**{case!r}, "method": "base"}})), case)
ids = torch.randint(0, case.vocab, (case.batch, case.tokens))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
def step():
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
def evaluate():
    with torch.no_grad():
        model(input_ids=ids)
fn = evaluate if {kind!r} == "eval" else step
model.train(fn is step)
times = []
for i in range({warm} + {steps}):
    t0 = time.perf_counter()
    fn()
    if i >= {warm}:
        times.append(time.perf_counter() - t0)
print(json.dumps({{"ms": 1000 * statistics.median(times), "process_s": time.perf_counter() - t_process}}))
"""

#: name -> (what, case, kind, steps, [(label, env, patch)...]); the first variant is what ships
EXPERIMENTS = {
    "budget, training, hidden 1024, all seven": (
        dict(method="loran", hidden=1024, layers=8, tokens=256, rank=8, targets="all"), "train", 5, [
            ("2^21 (ships)", {}, {}),
            ("0.4.0: 2^19 (compiled, with backward)", {"PEFT_LORAN_BLOCK_ELEMENTS": str(2**19)}, {})]),
    "budget, training, 7B q/v, r 64": (
        dict(method="loran", hidden=4096, intermediate=11008, heads=32, vocab=1000, layers=2, tokens=512, rank=64,
             alpha=16.0, targets="qv"), "train", 3, [
            ("2^21 (ships)", {}, {}),
            ("2^19", {"PEFT_LORAN_BLOCK_ELEMENTS": str(2**19)}, {})]),
    "budget, evaluation forward, hidden 1024, all seven": (
        dict(method="loran", hidden=1024, layers=8, tokens=256, rank=8, targets="all"), "eval", 8, [
            ("2^21 (ships)", {}, {}),
            ("2^19", {"PEFT_LORAN_BLOCK_ELEMENTS": str(2**19)}, {})]),
    "eager kernel's budget, training, hidden 1024, all seven": (
        dict(method="loran", hidden=1024, layers=8, tokens=256, rank=8, targets="all"), "train", 5, [
            ("2^21 (ships)", {"PEFT_LORAN_COMPILE": "0"}, {}),
            ("0.4.0: 2^18", {"PEFT_LORAN_COMPILE": "0", "PEFT_LORAN_BLOCK_ELEMENTS": str(2**18)}, {})]),
    "INLINE_PRODUCT_MAX_RANK, training, hidden 1024, all seven, r 8": (
        dict(method="loran", hidden=1024, layers=8, tokens=256, rank=8, targets="all"), "train", 5, [
            ("8 (ships)", {}, {}),
            ("0: B A always a GEMM", {}, {"INLINE_PRODUCT_MAX_RANK": 0})]),
    "AUTO_COMPILE_MIN_ELEMENTS, a 60-step job on 384-wide layers, empty compiler cache": (
        dict(method="loran", hidden=384, intermediate=1536, heads=12, vocab=4096, layers=6, tokens=128, batch=8,
             rank=8, targets="qv"), "job", 60, [
            ("2^20: eager kernel (ships)", {}, {}),
            ("compiled kernel", {"PEFT_LORAN_COMPILE": "1"}, {})]),
}


def run_once(case: dict, kind: str, steps: int, env: dict, patch: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        code = CHILD.format(here=HERE, patch=patch, case=case, kind="eval" if kind == "eval" else "train",
                            warm=0 if kind == "job" else 2, steps=steps)
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                             env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, **env})
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["wall_s"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="run the experiments whose name contains this text")
    parser.add_argument("--json", help="write every measurement here")
    args = parser.parse_args()
    results = {}
    for name, (case, kind, steps, variants) in EXPERIMENTS.items():
        if args.only and args.only not in name:
            continue
        runs: dict[str, list[dict]] = {label: [] for label, _, _ in variants}
        for round_ in range(args.rounds):
            order = variants if round_ % 2 == 0 else variants[::-1]
            for label, env, patch in order:
                runs[label].append(run_once(case, kind, steps, env, patch))
                print(f"  {name} | {label}: {json.dumps(runs[label][-1])}", file=sys.stderr, flush=True)
        key = "wall_s" if kind == "job" else "ms"
        results[name] = {label: {"median": statistics.median(r[key] for r in rs), "unit": "s" if kind == "job" else
                                 "ms", "runs": rs} for label, rs in runs.items()}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"\nCPU: {cpu}, {os.cpu_count()} cores; medians of {args.rounds} fresh processes, alternating\n")
    print("| case | as shipped | without (what) | without / as shipped |\n|---|---|---|---|")
    for name, variants in results.items():
        (shipped, first), (label, other) = list(variants.items())[:2]
        unit = first["unit"]
        print(f"| {name} | {first['median']:.1f} {unit} | {other['median']:.1f} {unit} ({label}) | "
              f"{other['median'] / first['median']:.2f}x |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cpu": cpu, "rounds": args.rounds, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
