"""What the CPU plan's block budget does to a whole model's step, alternating budgets in one process (so machine load
hits all alike): the no-grad evaluation forward of the hidden-1024, all-seven model (the figures behind
``functional.CPU_NO_GRAD_BLOCK_ELEMENTS``), and the paper's training step at Llama-2-7B layer shapes (behind the
row floor for wide layers).

    python benchmarks/block_budget.py eval      # PEFT_LORAN_COMPILE=1 or 0 chooses the kernel
    python benchmarks/block_budget.py train --dropout 0.2

Each budget is set with ``PEFT_LORAN_BLOCK_ELEMENTS`` (read on every call); "default" is the plan's own choice.
Prints median seconds per budget and, for ``eval``, the ratio to the base model measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import Case, _adapt, _build  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["eval", "train"])
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if args.what == "eval":
        case = Case(method="loran", targets="all")
        budgets = ["", str(2**19), str(2**20), str(2**21), str(2**22)]
    else:
        case = Case(method="loran", hidden=4096, intermediate=11008, heads=32, vocab=1000, alpha=16.0, targets="qv",
                    layers=2, tokens=512, rank=64, dropout=args.dropout)
        budgets = ["", str(2**22), str(2**23), str(2**24)]
    model = _build(case)
    ids = torch.randint(0, case.vocab, (1, case.tokens))
    result = {"kernel mode": os.environ.get("PEFT_LORAN_COMPILE", "auto"), "case": args.what}
    if args.what == "eval":
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
            result["base_s"] = median_seconds(lambda: model(input_ids=ids), 7)
    model = _adapt(model, case)
    if args.what == "eval":
        model.eval()

        def run():
            with torch.no_grad():
                model(input_ids=ids)
    else:
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def run():
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {b: [] for b in budgets}
    for budget in budgets:  # warm-up (and compilation) per budget
        os.environ["PEFT_LORAN_BLOCK_ELEMENTS"] = budget
        run()
    for _ in range(args.rounds):
        for budget in budgets:
            os.environ["PEFT_LORAN_BLOCK_ELEMENTS"] = budget
            times[budget].append(median_seconds(run, 3 if args.what == "eval" else 1))
    os.environ.pop("PEFT_LORAN_BLOCK_ELEMENTS", None)
    for budget, values in times.items():
        seconds = statistics.median(values)
        entry = {"seconds": round(seconds, 4)}
        if "base_s" in result:
            entry["vs_base"] = round(seconds / result["base_s"], 2)
        result[budget or "default"] = entry
    print(json.dumps(result))


if __name__ == "__main__":
    main()
