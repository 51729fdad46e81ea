"""Control for the generation benchmark: the same base model with every Linear weight replaced by a plain clone
(a later, separate allocation, as the eval cache makes), interleaved with the original in one process.

    python benchmarks/clone_placement_ab.py
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import Case, _build  # noqa: E402


def main(new_tokens: int = 32, rounds: int = 8) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    original = _build(Case(method="base")).eval()
    cloned = copy.deepcopy(original)
    with torch.no_grad():
        for module in cloned.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight = torch.nn.Parameter(module.weight.detach().clone(), requires_grad=False)
    prompt = torch.randint(0, 4096, (1, 16))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    times: dict[str, list[float]] = {"original weights": [], "cloned weights": []}
    models = {"original weights": original, "cloned weights": cloned}
    with torch.no_grad():
        for model in models.values():
            model.generate(input_ids=prompt, **kwargs)
        for _ in range(rounds):
            for name, model in models.items():
                t0 = time.perf_counter()
                model.generate(input_ids=prompt, **kwargs)
                times[name].append(time.perf_counter() - t0)
    for name, t in times.items():
        print(f"{name}: {new_tokens / statistics.median(t):.1f} tokens/s (median of {rounds})")


if __name__ == "__main__":
    main()
