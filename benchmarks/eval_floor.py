"""How far the default (no eval cache) evaluation forward is from the floor that exact LoRAN sets on this CPU.

    python benchmarks/eval_floor.py [--rounds 20] [--tokens 256]

Without the eval cache an exact no-grad forward of an adapted layer is ``x (W + s f(B A))^T``: one GEMM as the base
layer's, plus, per call, ``B A`` and ``f`` over every element of the weight, folded into ``W`` in one fused pass. That
pass is the floor: no exact method skips ``f`` on an element (Sinter's ``sin(w x)`` has no low-rank form). This
measures, in one process, on `interleaved.py`'s model (hidden 1024, 8 layers, r = 8, all seven projections):

* per distinct layer shape: the base layer's forward, the adapted layer's no-grad forward and the fused pass alone
  (``W + D`` block by block, the kernel the forward runs), the same pass with torch's sine in place of the kernels'
  inline one (``fused, torch.sin``: peft_loran.trig's gain), with ``sin(w x)`` replaced by ``w x`` (so the
  difference is what the sine costs inside it) and with ``f`` the identity (``B A``, the scaling and the base
  alone), and ``torch.sin`` over as many elements, in ns per weight element; the calls take turns each round;
* the whole model: base, LoRAN and LoRAN with torch's sine in its kernels, no-grad forwards taking turns, and the
  ratio the floor predicts,
  ``1 + (sum over adapted layers of the fused pass) / base forward``; with each forward's page faults and system
  time. Then again while the process also holds an eval-cached copy of the LoRAN model (as `interleaved.py eval`
  does), and once more after the copy is freed: what the process's other allocations do to LoRAN's per-call blocks.

So the measured ratio minus the predicted one is what the layer path adds beyond the unavoidable arithmetic.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import os
import resource
import statistics
import sys
from typing import Callable

import torch

import peft_loran

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


def register_variants() -> None:
    """Sinter without its sine (``x + a x (w x)``) and the identity, as user activations: the compiled kernel runs
    them on the same path as Sinter, so the differences are the sine's cost and the rest of ``f``'s."""
    peft_loran.register_activation("sinter-no-sin", lambda x, a, w: x + a * x * (w * x),
                                   lambda x, a, w: 1 + 2 * a * w * x, params={"a": 5e-5, "w": 1e4}, overwrite=True)
    peft_loran.register_activation("f-identity", lambda x: x, lambda x: torch.ones_like(x), overwrite=True)


def fused_pass(update, weight: torch.Tensor, activation=None, with_torch_sine: bool = False) -> Callable[[], None]:
    """``W + D`` block by block with the plan a no-grad forward uses (``activation`` replacing the update's, on the
    same kind of kernel; ``with_torch_sine``: the compiled kernel with torch's sine instead of the inline one)."""
    variant = update if activation is None else dataclasses.replace(update, activation=activation)
    plan = variant.plan(autograd=False)
    if plan.kernel.name != update.plan(autograd=False).kernel.name:
        raise RuntimeError(f"{activation.name} would run on the {plan.kernel.name} kernel, not the update's.")

    def run():
        with torch_sine() if with_torch_sine else contextlib.nullcontext():
            for _ in variant.blocks(plan, base=weight, out_dtype=weight.dtype):
                pass

    return run


@contextlib.contextmanager
def torch_sine():
    """The compiled kernels with torch's sine instead of the inline one (peft_loran.trig): no block's arguments are
    bounded within a negative limit."""
    kernels = peft_loran.kernels
    shipped, kernels.MAX_ARGUMENT = kernels.MAX_ARGUMENT, -1.0
    try:
        yield
    finally:
        kernels.MAX_ARGUMENT = shipped


def layer_runs(layer: torch.nn.Module, tokens: int) -> dict[str, Callable[[], object]]:
    out_features, in_features = layer.update_shape
    x = torch.randn(1, tokens, in_features)
    weight = layer.get_base_layer().weight.detach()
    update = layer.low_rank_update("default")
    sin_input = torch.randn(out_features, in_features)
    return {"base layer": lambda: layer.get_base_layer()(x), "adapted layer": lambda: layer(x),
            "fused pass": fused_pass(update, weight),
            "fused, torch.sin": fused_pass(update, weight, with_torch_sine=True),
            "fused, no sin": fused_pass(update, weight, peft_loran.get_activation("sinter-no-sin")),
            "fused, f = x": fused_pass(update, weight, peft_loran.get_activation("f-identity")),
            "torch.sin": lambda: torch.sin(sin_input)}


def whole_model(models: dict[str, torch.nn.Module], tokens: int, rounds: int) -> dict[str, list]:
    """Per forward of each model, taking turns: ``(seconds, system seconds, minor page faults)``; a name ending in
    ``(torch.sin)`` runs its model with the compiled kernels' sine as torch's."""
    ids = torch.randint(0, 4096, (1, tokens))

    def forward(name, model):
        def run():
            before = resource.getrusage(resource.RUSAGE_SELF)
            with torch_sine() if name.endswith("(torch.sin)") else contextlib.nullcontext():
                model(input_ids=ids)
            after = resource.getrusage(resource.RUSAGE_SELF)
            usage[name].append((after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt))
        return run

    usage = {name: [] for name in models}
    times = interleave({name: forward(name, model) for name, model in models.items()}, rounds)
    return {name: [(t, *u) for t, u in zip(times[name], usage[name][1:])] for name in models}


def report_whole_model(label: str, runs: dict[str, list], fused_total: float) -> None:
    base_s = statistics.median(t for t, _, _ in runs["base"])
    print(f"\nwhole model, no-grad forward, {label}: base {base_s * 1e3:.1f} ms; the floor predicts "
          f"{1 + fused_total / base_s:.3f}x (fused passes {fused_total * 1e3:.1f} ms per forward)")
    for name, run in runs.items():
        usage = (statistics.median(s for _, s, _ in run) * 1e3, statistics.median(f for _, _, f in run))
        line = f"  {name}: per forward (medians), system time {usage[0]:.1f} ms, minor page faults {usage[1]:.0f}"
        if name != "base":
            ratios = sorted(b[0] / a[0] for a, b in zip(runs["base"], run))
            line += (f"; {name} / base {statistics.median(ratios):.3f}x (paired per round, range "
                     f"{ratios[0]:.2f}-{ratios[-1]:.2f})")
        print(line)
    if "loran (torch.sin)" in runs:
        ratios = sorted(b[0] / a[0] for a, b in zip(runs["loran (torch.sin)"], runs["loran"]))
        print(f"  loran / loran (torch.sin), paired per round: {statistics.median(ratios):.3f}x (range "
              f"{ratios[0]:.2f}-{ratios[-1]:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    register_variants()
    models = adapted_models("all")
    base, loran = models["base"].eval(), models["loran"].eval()
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; {args.tokens} tokens, {args.rounds} rounds (medians)\n")
    print("| layer (out x in) | layers | base GEMM (ns/elem) | fused pass | fused, torch.sin | fused, no sin | "
          "fused, f = x | torch.sin | adapted layer | (base + fused) / base | adapted / base |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    fused_total = 0.0
    with torch.no_grad():
        for (rows, cols), (count, layer) in sorted(adapted_layers(loran).items()):
            med = {k: statistics.median(v) for k, v in interleave(layer_runs(layer, args.tokens), args.rounds).items()}
            per = {k: v / (rows * cols) * 1e9 for k, v in med.items()}
            fused_total += count * med["fused pass"]
            print(f"| {rows} x {cols} | {count} | {per['base layer']:.2f} | {per['fused pass']:.2f} | "
                  f"{per['fused, torch.sin']:.2f} | {per['fused, no sin']:.2f} | {per['fused, f = x']:.2f} | "
                  f"{per['torch.sin']:.2f} | "
                  f"{per['adapted layer']:.2f} | "
                  f"{(med['base layer'] + med['fused pass']) / med['base layer']:.2f}x | "
                  f"{med['adapted layer'] / med['base layer']:.2f}x |")
        failures = peft_loran.kernels.compile_failures()  # the compiled kernel then computed its blocks eagerly
        if failures:
            print(f"\nnote: compiling failed, so the fused passes above ran eagerly: {failures}")
        three = {"base": base, "loran": loran, "loran (torch.sin)": loran}
        report_whole_model("alone", whole_model(three, args.tokens, args.rounds), fused_total)
        cached = copy.deepcopy(loran)
        peft_loran.set_eval_cache(cached, True)
        cached(input_ids=torch.randint(0, 4096, (1, args.tokens)))  # builds the copy's cache
        report_whole_model("beside an eval-cached copy", whole_model(three, args.tokens, args.rounds), fused_total)
        del cached
        gc.collect()
        report_whole_model("alone again, the copy freed", whole_model(three, args.tokens, args.rounds), fused_total)


if __name__ == "__main__":
    main()
