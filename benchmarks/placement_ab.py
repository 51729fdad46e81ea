"""Control for the generation benchmark: does where a weight copy lies in memory change decoding speed?

    python benchmarks/placement_ab.py [--rounds 8] [--new-tokens 32]

The same base model three times, interleaved in one process: its own weights (allocated when the model is built:
glibc mmaps them, page offset 64), every Linear weight replaced by a plain ``clone()`` (a later allocation, as the
eval cache or a merge makes; after large frees glibc serves these from its heap at arbitrary page offsets), and
every Linear weight replaced by ``peft_loran.update.page_aligned_copy`` (what the eval cache and merges use).
No adapter code runs: any difference is placement. Prints tokens/s and the page offsets seen.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import Case, _build  # noqa: E402
from interleaved import generation_runs, interleave  # noqa: E402

from peft_loran.update import PAGE_BYTES, page_aligned_copy  # noqa: E402


def with_linear_weights(model: torch.nn.Module, copy_fn) -> torch.nn.Module:
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight = torch.nn.Parameter(copy_fn(module.weight.detach()), requires_grad=False)
    return model


def page_offsets(model: torch.nn.Module) -> list[int]:
    return sorted({m.weight.data_ptr() % PAGE_BYTES for m in model.modules() if isinstance(m, torch.nn.Linear)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    original = _build(Case(method="base")).eval()
    models = {
        "own weights": original,
        "plain clones": with_linear_weights(original, torch.Tensor.clone),
        "page-aligned copies": with_linear_weights(original, page_aligned_copy),
    }
    with torch.no_grad():
        times = interleave(generation_runs(models, args.new_tokens), args.rounds)
    own = args.new_tokens / statistics.median(times["own weights"])
    print(f"{args.new_tokens} new tokens, median of {args.rounds} interleaved rounds")
    print("| Linear weights | tokens/s | vs own weights | page offsets (bytes) |")
    print("|---|---|---|---|")
    for name, t in times.items():
        speed = args.new_tokens / statistics.median(t)
        offsets = page_offsets(models[name])
        shown = ", ".join(map(str, offsets[:4])) + (f", ... ({len(offsets)} distinct)" if len(offsets) > 4 else "")
        print(f"| {name} | {speed:.1f} | {speed / own:.2f}x | {shown} |")


if __name__ == "__main__":
    main()
