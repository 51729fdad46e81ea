"""Per-call cost of an unmerged LoRAN layer on the eval-cache path (one token, the decode case) next to a bare
``nn.Linear`` of the same size, and what the cache's staleness check costs on its own.

    python benchmarks/cached_call.py [--size 1024] [--rank 8]

Best of five loops of 3,000 calls each, in one process (2 threads).
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import inject_adapter_in_model
from torch import nn

from peft_loran import LoranConfig


def per_call_us(fn, calls: int = 3000) -> float:
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(args.size, args.size)

    layer = inject_adapter_in_model(LoranConfig(r=args.rank, target_modules=["layer"], init_weights=False),
                                    One()).layer.eval()
    bare = nn.Linear(args.size, args.size).eval()
    x = torch.randn(1, 1, args.size)
    with torch.no_grad():
        layer(x)
        (entry,) = layer._loran_cache.values()
        factors = layer._factors("default")
        settings = [(layer.loran_scaling["default"], layer.loran_activation["default"])]
        weight = layer.get_base_layer().weight
        rows = [("bare nn.Linear", per_call_us(lambda: bare(x))),
                ("LoRAN layer, cached", per_call_us(lambda: layer(x))),
                ("  of which the staleness check", per_call_us(lambda: entry.matches(factors, settings, weight)))]
    print(f"| {args.size}x{args.size}, r = {args.rank}, one token | us per call |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
