"""Why the compiled kernels take their float arguments as literals (``kernels.WITH_COMPILE_SETTINGS``).

    python benchmarks/compiled_constants.py [--rounds 30]

The compiled no-grad kernel computes ``W + s (f(B A) - offset)`` for a block of rows. Its floats (``s``, the offset,
Sinter's ``a`` and ``w``) can reach inductor as dynamic scalars (one compiled kernel for every setting) or as
literals (one compilation per setting). This compiles the same arithmetic both ways, shapes dynamic in both, and
times them taking turns in one process on blocks of the shapes the CPU plan cuts from ``interleaved.py``'s model
(hidden 1024, intermediate 2816) and from Llama-2-7B's q/v (4096 wide), plus ``torch.sin`` over as many elements for
scale. Reported per block: ns per weight element (medians) and the paired per-round ratio dynamic / literal.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import cpu_name  # noqa: E402
from interleaved import interleave  # noqa: E402

from peft_loran import kernels  # noqa: E402
from peft_loran.activations import get_activation  # noqa: E402

SINTER = get_activation("sinter")


def fused_pass(base: torch.Tensor, B_rows: torch.Tensor, A: torch.Tensor, scaling: float, offset: float,
               *params: float) -> torch.Tensor:
    """The compiled ``value`` kernel's arithmetic for a block, without the output cast."""
    y = SINTER.definition.function(B_rows @ A, *params)[0]
    return base + scaling * (y - offset)


def separate_copy(fn: types.FunctionType, name: str) -> types.FunctionType:
    """``fn`` with its own code object: dynamo keeps compiled code per code object, so the two variants must not
    share one."""
    return types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    # this torch's default, stated so that the comparison holds where the default differs
    dynamic = torch._dynamo.config.patch(specialize_float=False)(
        torch.compile(separate_copy(fused_pass, "dynamic_floats"), dynamic=True))
    literal = kernels.WITH_COMPILE_SETTINGS(torch.compile(separate_copy(fused_pass, "literal_floats"), dynamic=True))
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; Sinter a = 5e-5, "
          f"w = 1e4, r = 8, float32, {args.rounds} rounds (medians)\n")
    print("| block (rows x in) | floats as dynamic scalars (ns/elem) | floats as literals | torch.sin alone | "
          "dynamic / literal (paired, range) |")
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    for rows, cols in [(1024, 1024), (2048, 1024), (1024, 2816), (512, 4096)]:
        W, B, A = torch.randn(rows, cols), torch.randn(rows, 8) * 0.01, torch.randn(8, cols) * 0.01
        call = (W, B, A, 2.0, SINTER.offset, *SINTER.values)
        times = interleave({"dynamic": lambda: dynamic(*call), "literal": lambda: literal(*call),
                            "sin": lambda: torch.sin(W)}, args.rounds)
        per = {name: statistics.median(t) / (rows * cols) * 1e9 for name, t in times.items()}  # ns per element
        ratios = sorted(dyn / lit for dyn, lit in zip(times["dynamic"], times["literal"]))
        print(f"| {rows} x {cols} | {per['dynamic']:.2f} | {per['literal']:.2f} | {per['sin']:.2f} | "
              f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f}) |")


if __name__ == "__main__":
    main()
