"""Operators dispatched per adapted layer per training step: a proxy for kernel launches, which bound a GPU step at
the sizes where LoRAN's extra arithmetic is microseconds.

    python benchmarks/op_count.py                      # the table of docs/benchmarks.md
    python benchmarks/op_count.py --json results/benchmarks/op-count.json

One adapted ``width x width`` linear layer (r = 64, 512 tokens, bias), one forward and backward of ``mean(y^2)``,
counted on the CPU with the profiler, two ways: *operators*, every operator called from Python (``aten::`` ops
outside other ``aten::`` ops, what a ``TorchDispatchMode`` sees) plus every compiled kernel (``cpp_fused_*`` /
``triton_*``); and *kernels*, the innermost ``aten::`` ops that compute something (not views, transposes,
allocations or no-op conversions) plus the compiled kernels: the closer proxy for launches on a GPU. Methods: PEFT LoRA, the naive dense LoRAN (``f(BA)``
through plain autograd), ours on the CPU plan (cache-sized blocks) and on the accelerator plan (the GPU's default:
as few blocks as the budget allows, ``PEFT_LORAN_PLAN=accelerator``), each with the eager kernel and with the
compiled one (``PEFT_LORAN_COMPILE=0`` / ``1``). Each row runs in a fresh process. Counts do not depend on timing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

METHODS = {  # name: (method, environment)
    "PEFT LoRA": ("lora", {}),
    "naive dense LoRAN": ("naive", {}),
    "ours, CPU plan, eager kernel": ("loran", {"PEFT_LORAN_PLAN": "cpu", "PEFT_LORAN_COMPILE": "0"}),
    "ours, CPU plan, compiled kernel": ("loran", {"PEFT_LORAN_PLAN": "cpu", "PEFT_LORAN_COMPILE": "1"}),
    "ours, accelerator plan, eager kernel": ("loran", {"PEFT_LORAN_PLAN": "accelerator", "PEFT_LORAN_COMPILE": "0"}),
    "ours, accelerator plan, compiled kernel": ("loran", {"PEFT_LORAN_PLAN": "accelerator",
                                                          "PEFT_LORAN_COMPILE": "1"}),
}


def count(method: str, width: int, dropout: float, rank: int, tokens: int) -> dict:
    import torch
    import torch._inductor.config as inductor_config
    from torch import nn
    from torch.profiler import ProfilerActivity, profile

    inductor_config.cpp.enable_kernel_profile = True  # compiled CPU kernels appear in the profile by name
    torch.manual_seed(0)
    base = nn.Linear(width, width)
    base.requires_grad_(False)
    x = torch.randn(tokens, width)

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = base

    if method == "naive":
        A = nn.Parameter(torch.randn(rank, width) * 0.01)
        B = nn.Parameter(torch.zeros(width, rank))
        drop = nn.Dropout(dropout)

        def step():
            m = B @ A
            d = m + 5e-5 * m * torch.sin(1e4 * m)
            y = base(x) + (16 / rank) * drop(x) @ d.T
            (y * y).mean().backward()
    else:
        from peft import LoraConfig, inject_adapter_in_model

        if method == "lora":
            config = LoraConfig(r=rank, lora_alpha=16, lora_dropout=dropout, target_modules=["layer"])
        else:
            import peft_loran

            config = peft_loran.LoranConfig(r=rank, loran_alpha=16, loran_dropout=dropout, target_modules=["layer"])
        layer = inject_adapter_in_model(config, Holder()).layer.train()

        def step():
            y = layer(x)
            (y * y).mean().backward()

    step()  # warm-up: compiles where the compiled kernel is used
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = leaves = compiled = 0
    for event in prof.events():
        name = event.name
        if "cpp_fused" in name or name.startswith("triton_"):
            compiled += 1
        elif name.startswith("aten::"):
            ops += not _inside_aten(event)
            computes = name not in NO_KERNEL and not any(c.name.startswith("aten::") for c in event.cpu_children)
            leaves += computes
    return {"operators": ops + compiled, "kernels": leaves + compiled, "compiled_kernels": compiled}


#: Operators that launch no kernel of their own: views, layout, allocation, no-op conversions.
NO_KERNEL = {f"aten::{n}" for n in (
    "view", "t", "transpose", "as_strided", "slice", "select", "expand", "detach", "alias", "_unsafe_view", "unsqueeze",
    "squeeze", "permute", "reshape", "_reshape_alias", "empty", "empty_strided", "empty_like", "resolve_conj",
    "resolve_neg", "lift_fresh", "numpy_T", "split", "chunk", "narrow", "unbind", "result_type", "conj", "to",
    "contiguous", "flatten", "view_as", "expand_as", "matrix_H", "mT")}


def _inside_aten(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="1024,4096")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--json", help="write the raw counts here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(count(**spec)))
        return
    rows = []
    widths = [int(w) for w in args.widths.split(",")]
    for label, (method, env) in METHODS.items():
        for dropout in (0.0, 0.2):
            row = {"method": label, "dropout": dropout}
            for width in widths:
                spec = dict(method=method, width=width, dropout=dropout, rank=args.rank, tokens=args.tokens)
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                                     capture_output=True, text=True, env={**os.environ, **env}, check=False)
                if out.returncode != 0:
                    raise RuntimeError(out.stderr[-3000:])
                row[width] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    naive = {(r["dropout"], w): r[w] for r in rows if r["method"] == "naive dense LoRAN" for w in widths}
    head = "| method | dropout | " + " | ".join(f"operators at {w} (vs naive) | kernels at {w} (compiled; vs naive)"
                                              for w in widths) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(widths))]
    for r in rows:
        cells = []
        for w in widths:
            ref = naive[(r["dropout"], w)]
            cells.append(f"{r[w]['operators']} ({r[w]['operators'] / ref['operators']:.2f}x) | {r[w]['kernels']} "
                         f"({r[w]['compiled_kernels']}; {r[w]['kernels'] / ref['kernels']:.2f}x)")
        lines.append(f"| {r['method']} | {r['dropout']} | " + " | ".join(cells) + " |")
    print(f"Command: `python benchmarks/op_count.py --widths {args.widths} --rank {args.rank} --tokens {args.tokens}`\n")
    print("\n".join(lines))
    if args.json:
        with open(args.json + ".tmp", "w") as fh:
            json.dump({"rank": args.rank, "tokens": args.tokens, "rows": rows}, fh, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
