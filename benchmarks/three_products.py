"""The three dense products exact LoRAN adds per adapted layer with dropout, at the main job's shapes (MiniLM q/v:
384 x 384, batch 8 x 128 tokens), timed alone: python benchmarks/three_products.py

Output on 2 cores of an AMD EPYC (AVX2), torch 2.13.0+cpu, 2026-12-07, nothing else running:
three 1024x384x384 products: 6.52 ms median; x12 layers = 78.3 ms per step; 69.5 GMAC/s; threads 2
"""
import statistics
import time

import torch

torch.manual_seed(0)
x, D, G = torch.randn(1024, 384), torch.randn(384, 384), torch.randn(1024, 384)


def three():
    return x @ D.T, G @ D, G.T @ x  # x_d D^T (forward), G D (input gradient), G^T x_d (the update's gradient)


for _ in range(20):
    three()
times = []
for _ in range(200):
    started = time.perf_counter()
    three()
    times.append(time.perf_counter() - started)
m = statistics.median(times)
print(f"three 1024x384x384 products: {m * 1e3:.2f} ms median; x12 layers = {12 * m * 1e3:.1f} ms per step; "
      f"{3 * 1024 * 384 * 384 / m / 1e9:.1f} GMAC/s; threads {torch.get_num_threads()}")
