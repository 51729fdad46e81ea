"""How far the default (no eval cache) evaluation forward is from the floor that exact LoRAN sets on this CPU.

    python benchmarks/eval_floor.py [--rounds 20] [--tokens 256]

Without the eval cache an exact no-grad forward of an adapted layer is ``x (W + s f(B A))^T``: one GEMM as the base
layer's, plus, per call, ``B A`` and ``f`` over every element of the weight, folded into ``W`` in one fused pass. That
pass is the floor: no exact method skips ``f`` on an element (Sinter's ``sin(w x)`` has no low-rank form). This
measures, in one process, on `interleaved.py`'s model (hidden 1024, 8 layers, r = 8, all seven projections):

* per distinct layer shape: the base layer's forward, the adapted layer's no-grad forward and the fused pass alone
  (``W + D`` block by block, the kernel the forward runs), and ``torch.sin`` over as many elements, in ns per
  weight element; the calls take turns each round;
* the whole model: base and LoRAN no-grad forwards, taking turns, and the ratio the floor predicts,
  ``1 + (sum over adapted layers of the fused pass) / base forward``.

So the measured ratio minus the predicted one is what the layer path adds beyond the unavoidable arithmetic.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import cpu_name  # noqa: E402
from interleaved import adapted_models, interleave  # noqa: E402


def adapted_layers(model: torch.nn.Module) -> dict[tuple[int, int], tuple[int, torch.nn.Module]]:
    """One adapted layer per distinct ``(out, in)`` shape, with how many layers of the model have that shape."""
    from peft_loran.layer import LoranLayer

    found: dict[tuple[int, int], tuple[int, torch.nn.Module]] = {}
    for module in model.modules():
        if isinstance(module, LoranLayer):
            count, first = found.get(module.update_shape, (0, module))
            found[module.update_shape] = (count + 1, first)
    return found


def layer_runs(layer: torch.nn.Module, tokens: int) -> dict[str, Callable[[], object]]:
    out_features, in_features = layer.update_shape
    x = torch.randn(1, tokens, in_features)
    weight = layer.get_base_layer().weight.detach()
    update = layer.low_rank_update("default")
    plan = update.plan(autograd=False)
    sin_input = torch.randn(out_features, in_features)

    def fused():
        for _ in update.blocks(plan, base=weight, out_dtype=weight.dtype):
            pass

    return {"base layer": lambda: layer.get_base_layer()(x), "adapted layer": lambda: layer(x),
            "fused pass": fused, "torch.sin": lambda: torch.sin(sin_input)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    models = adapted_models("all")
    base, loran = models["base"].eval(), models["loran"].eval()
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; {args.tokens} tokens, {args.rounds} rounds (medians)\n")
    print("| layer (out x in) | layers | base GEMM (ns/elem) | fused pass | torch.sin | adapted layer | "
          "(base + fused) / base | adapted / base |")
    print("|---|---|---|---|---|---|---|---|")
    fused_total = 0.0
    with torch.no_grad():
        for (rows, cols), (count, layer) in sorted(adapted_layers(loran).items()):
            med = {k: statistics.median(v) for k, v in interleave(layer_runs(layer, args.tokens), args.rounds).items()}
            per = {k: v / (rows * cols) * 1e9 for k, v in med.items()}
            fused_total += count * med["fused pass"]
            print(f"| {rows} x {cols} | {count} | {per['base layer']:.2f} | {per['fused pass']:.2f} | "
                  f"{per['torch.sin']:.2f} | {per['adapted layer']:.2f} | "
                  f"{(med['base layer'] + med['fused pass']) / med['base layer']:.2f}x | "
                  f"{med['adapted layer'] / med['base layer']:.2f}x |")
        ids = torch.randint(0, 4096, (1, args.tokens))
        times = interleave({"base": lambda: base(input_ids=ids), "loran": lambda: loran(input_ids=ids)}, args.rounds)
    ratios = sorted(b / a for a, b in zip(times["base"], times["loran"]))
    base_s = statistics.median(times["base"])
    print(f"\nwhole model, no-grad forward: base {base_s * 1e3:.1f} ms, LoRAN / base {statistics.median(ratios):.3f}x "
          f"(paired per round, range {ratios[0]:.2f}-{ratios[-1]:.2f}); the floor predicts "
          f"{1 + fused_total / base_s:.3f}x (fused passes {fused_total * 1e3:.1f} ms per forward)")


if __name__ == "__main__":
    main()
