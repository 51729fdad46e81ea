"""Where one adapted layer's training time goes: the fused LoRAN forward + backward against PEFT LoRA's math and
against the three layer-sized GEMMs LoRAN's gradient needs (blocked as the fused path blocks them, and as single
calls). Median milliseconds, 256 tokens, r = 8, Sinter, float32.

    BENCH_THREADS=2 python benchmarks/layer_breakdown.py
"""

from __future__ import annotations

import os
import sys

import torch

from peft_loran import functional as LF
from peft_loran import get_activation

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from block_size import timed  # noqa: E402  (median milliseconds)


def main(tokens: int = 256, rank: int = 8) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    activation = get_activation("sinter")
    print("| layer (out x in) | ours fused fwd+bwd | LoRA math fwd+bwd | 3 GEMMs, blocked | 3 GEMMs, one call each |")
    print("|---|---|---|---|---|")
    for out_f, in_f in [(1024, 1024), (2816, 1024), (1024, 2816)]:
        W = torch.randn(out_f, in_f) * 0.02
        A = (torch.randn(rank, in_f) * 0.02).requires_grad_()
        B = (torch.randn(out_f, rank) * 0.02).requires_grad_()
        x = torch.randn(tokens, in_f, requires_grad=True)
        g = torch.randn(tokens, out_f)
        update = LF.LowRankUpdate(A, B, [(None, None)], activation, 2.0)
        rows = update.plan(x.device, needs_grad=True, autograd=False).block_rows  # what the fused path uses

        def fused():
            LF.loran_matmul(x, update, weight=W).backward(g)

        def lora():
            (x @ W.T + 2.0 * (x @ A.T) @ B.T).backward(g)

        @torch.no_grad()
        def gemms_blocked():  # forward, dH = G^T x, dx = G W_eff: per block of rows
            for i0 in range(0, out_f, rows):
                w, gb = W[i0:i0 + rows], g[:, i0:i0 + rows]
                x @ w.T, gb.T @ x, gb @ w

        @torch.no_grad()
        def gemms_whole():
            x @ W.T, g.T @ x, g @ W

        print(f"| {out_f} x {in_f} | {timed(fused):.1f} | {timed(lora):.1f} | "
              f"{timed(gemms_blocked):.1f} | {timed(gemms_whole):.1f} |")


if __name__ == "__main__":
    main()
