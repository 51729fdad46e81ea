"""Time of one fused LoRAN layer (forward + backward) by block size, with the compiled and with the eager
element-wise kernels, next to the plain base layer.

    python benchmarks/block_size.py            # prints a markdown table: "compiled / eager" milliseconds

The block budget (elements of one ``(rows, in)`` block) trades cache locality of the element-wise passes against
GEMM width; ``PEFT_LORAN_BLOCK_ELEMENTS`` / ``LoranConfig(block_rows=...)`` set it.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from peft_loran import functional as LF
from peft_loran import get_activation, set_kernel_compilation

SHAPES = [(1024, 1024), (2816, 1024), (1024, 2816)]
EXPONENTS = [16, 17, 18, 19, 20]


def timed(fn, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    act = get_activation("sinter")
    print("| layer (out x in) | base layer | " + " | ".join(f"2^{e}" for e in EXPONENTS) + " |")
    print("|---|---|" + "---|" * len(EXPONENTS))
    for out_f, in_f in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(256, in_f, requires_grad=True)
        W = torch.randn(out_f, in_f) * 0.02
        A = torch.randn(8, in_f, requires_grad=True)
        B = (torch.randn(out_f, 8) * 0.01).requires_grad_()

        def base():
            y = x @ W.T
            y.backward(torch.ones_like(y))

        cells = []
        for e in EXPONENTS:
            times = []
            for mode in ("1", "0"):
                set_kernel_compilation(mode)
                # the CPU plan's height for this budget and kernel, given as the update's explicit block height
                rows = LF.cpu_block_rows(in_f, compiled=mode == "1", budget=2**e)
                update = LF.LowRankUpdate(A, B, [(None, None)], act, 2.0, block_rows=rows)

                def fused():
                    y = LF.loran_matmul(x, update, weight=W)
                    y.backward(torch.ones_like(y))

                times.append(timed(fused))
            set_kernel_compilation(None)
            cells.append(" / ".join(f"{t:.1f}" for t in times))
        print(f"| {out_f} x {in_f} | {timed(base):.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
