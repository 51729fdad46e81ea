"""How long the path of one call is: the distinct Python functions (and files) a call runs in peft_loran and in PEFT's
``peft/tuners``, for PEFT LoRA and for LoRAN on the same layer.

    python benchmarks/call_path.py            # the table (docs/design.md, "Reading the code")
    python benchmarks/call_path.py --list     # and every function, in the order first called

One ``nn.Linear(1024, 1024)`` adapted with r = 8 and dropout 0.05 in float32 on the CPU; each call is made once to
warm up (compilation, caches), then traced with ``sys.setprofile``; a function counts once however often it runs.
Comprehensions and generator expressions are functions of their own in Python 3.11 and count. The counts do not depend
on timing or on the machine, only on the code (and, for LoRAN, on whether this machine can compile its kernel: the
table says which kernel ran).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

TRACKED = (os.sep + "peft_loran" + os.sep, os.sep + "peft" + os.sep + "tuners" + os.sep)


def trace(fn) -> list[tuple[str, str, int]]:
    """The distinct (file, function, first line) that ``fn()`` calls in the tracked files, in order."""
    seen: dict = {}

    def profile(frame, event, arg):
        if event == "call" and any(part in frame.f_code.co_filename for part in TRACKED):
            code = frame.f_code
            seen.setdefault((code.co_filename, code.co_name, code.co_firstlineno), None)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return list(seen)


def build(method: str):
    from peft import LoraConfig, get_peft_model

    from peft_loran import LoranConfig

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1024, 1024)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    config = (LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["lin"]) if method == "lora" else
              LoranConfig(r=8, loran_alpha=16, loran_dropout=0.05, target_modules=["lin"]))
    return get_peft_model(One(), config)


def calls(model) -> dict:
    layer = model.base_model.model.lin
    x = torch.randn(16, 1024)

    def training():
        model.train()
        layer(x).sum().backward()

    def no_grad():
        model.eval()
        with torch.no_grad():
            layer(x)

    def merge_unmerge():
        layer.merge()
        layer.unmerge()

    return {"training forward + backward": training, "no-grad forward": no_grad, "merge() + unmerge()": merge_unmerge}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print every function too")
    args = parser.parse_args()
    import peft_loran  # noqa: F401  (registers LoRAN)

    counts = {}
    for method in ("lora", "loran"):
        for name, fn in calls(build(method)).items():
            fn()  # warm-up: compilation, first-call caches
            functions = trace(fn)
            counts[(method, name)] = functions
            if args.list:
                print(f"\n{method}, {name}:")
                for path, function, line in functions:
                    print(f"  {os.path.relpath(path, os.path.dirname(os.path.dirname(path)))}:{line} {function}")
    from peft_loran import kernels

    compiled = kernels.choose_kernel(build("loran").base_model.model.lin.loran_activation["default"], True, 2**20,
                                     torch.device("cpu"), "cpu", False).name
    print(f"\n| call | PEFT LoRA | LoRAN ({compiled} kernel) |\n|---|---|---|")
    for name in calls(build("lora")):
        cells = []
        for method in ("lora", "loran"):
            functions = counts[(method, name)]
            cells.append(f"{len(functions)} functions in {len({path for path, _, _ in functions})} files")
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
