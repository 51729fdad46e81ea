"""What the command line shows and writes: the comparison table, the plots, and `inspect`'s spectra."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import UserError


FORMULAS = {
    "sinter": "x + a x sin(w x)", "cosinter": "x + a x cos(w x)", "sigmoid": "1 / (1 + exp(-x))", "tanh": "tanh(x)",
    "relu": "max(x, 0)", "silu": "x sigmoid(x)", "swish": "x sigmoid(25 x)", "identity": "x",
    "cos": "x cos(1e4 x) + x", "gaussian": "0.5 x exp(-x^2)",
}


def activation_formula(config) -> str:
    """``f`` of a LoRAN config in words, with its parameters (``- f(0)`` when zero-centred and f(0) != 0)."""
    formula = FORMULAS.get(config.activation, "a registered activation")
    if config.activation in ("sinter", "cosinter"):
        formula += f", a = {config.sinter_amplitude:g}, w = {config.sinter_frequency:g}"
    if config.zero_centered and config.activation == "sigmoid":
        formula += " (minus f(0), so the update starts at zero)"
    return formula


def comparison_table(results: list[dict], metric: str) -> str:
    head = f"| method | {metric} | trainable params | train time (s) | peak memory (MB) |"
    lines = [head, "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['metrics'][metric]:.4f} | {r['trainable_params']:,} | "
                     f"{r['train_seconds']:.1f} | {r['peak_memory_mb']:.0f} |")
    return "\n".join(lines)


def plot_comparison(results: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    colors = [f"C{i}" for i in range(len(results))]  # the same colour for a method's line and bar
    # LoRA and LoRAN at the paper's setting draw almost the same curve: markers and dashes keep each one visible
    styles = [("o", "-"), ("x", "--"), ("s", ":"), ("^", "-."), ("D", (0, (5, 2, 1, 2)))]
    for i, (r, color) in enumerate(zip(results, colors)):
        if r["loss_curve"]:
            steps, losses = zip(*r["loss_curve"])
            marker, line = styles[i % len(styles)]
            left.plot(steps, losses, label=r["method"], marker=marker, linestyle=line, color=color, markersize=4,
                      markerfacecolor="none", alpha=0.85)
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.set_title("training loss")
    left.legend()
    left.grid(alpha=0.3)
    names = [r["method"] for r in results]
    values = [r["metrics"][metric] for r in results]
    bars = right.bar(names, values, color=colors)
    for bar, value in zip(bars, values):
        right.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.3f}", ha="center", va="bottom")
    right.set_title(f"test {metric}")
    right.set_ylim(0, max(values) * 1.15 if max(values) > 0 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ inspect
def load_adapter(path: str):
    """(peft_type as written, config object, tensors) of an adapter directory: ours, PEFT LoRA, or the original's
    MLORA format (its config becomes a LoRAN config, its pickle is read as plain tensors only)."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    import peft_loran  # noqa: F401  (registers LORAN and MLORA with PEFT)
    from peft_loran.compat import convert_original_state_dict, load_tensors_safely

    root = Path(path)
    config_path = root / "adapter_config.json"
    if not config_path.exists():
        raise UserError(f"{path} is not an adapter directory (no adapter_config.json)")
    written_type = json.loads(config_path.read_text()).get("peft_type")
    try:
        config = PeftConfig.from_pretrained(str(root))
        if (root / "adapter_model.safetensors").exists():
            tensors = load_file(root / "adapter_model.safetensors")
        elif (root / "adapter_model.bin").exists():
            tensors = load_tensors_safely(str(root / "adapter_model.bin"))
        else:
            raise UserError(f"{path} has no adapter_model.safetensors or adapter_model.bin")
    except (ValueError, KeyError) as exc:
        raise UserError(f"{path}: {str(exc).splitlines()[0]}") from None
    return written_type, config, convert_original_state_dict(tensors)


def layer_updates(config, tensors: dict[str, torch.Tensor]):
    """Yield (layer name, rank r, dense update s*f(BA) or s*BA) for each adapted layer."""
    from peft_loran import functional as LF
    from peft_loran.config import LoranConfig

    if isinstance(config, LoranConfig):
        act = config.build_activation()
        for key in sorted(k for k in tensors if k.endswith("loran_A")):
            layer = key[: -len(".loran_A")]
            A, B = tensors[key].float(), tensors[layer + ".loran_B"].float()
            stages = [(tensors.get(f"{layer}.loran_P.{k}"), tensors.get(f"{layer}.loran_b.{k}"))
                      for k in range(len(config.chain_dims or [A.shape[1]]))]
            yield layer, config.r, LF.delta_weight(A, B, stages, act, config.scaling)
    elif getattr(config, "peft_type", None) == "LORA":
        scaling = config.lora_alpha / config.r
        for key in sorted(k for k in tensors if k.endswith("lora_A.weight")):
            layer = key[: -len(".lora_A.weight")]
            yield layer, config.r, scaling * tensors[layer + ".lora_B.weight"].float() @ tensors[key].float()
    else:
        raise UserError(f"cannot inspect adapters of type {config.peft_type}; LoRAN, MLORA and LoRA are supported")


def inspect_adapter(path: str, output: Path, quiet: bool = False) -> dict:
    """Print config and sizes; plot each layer's singular values against the rank-r line a LoRA update can't pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    from peft_loran.config import LoranConfig

    written_type, config, tensors = load_adapter(path)
    layers = list(tqdm(layer_updates(config, tensors), desc="spectra", disable=quiet, leave=False))
    if not layers:
        raise UserError(f"{path}: no adapter layers found in the weights")
    summary = {"peft_type": written_type, "parameters": sum(t.numel() for t in tensors.values()), "layers": []}
    has_activation = isinstance(config, LoranConfig)
    fig, axes = plt.subplots(1, 2 if has_activation else 1, figsize=(12 if has_activation else 7, 4.5))
    spec_ax = axes[0] if has_activation else axes
    kinds = sorted({name.split(".")[-1] for name, _, _ in layers})
    color_of = {kind: f"C{i}" for i, kind in enumerate(kinds)}
    count_of = {kind: sum(name.split(".")[-1] == kind for name, _, _ in layers) for kind in kinds}
    for name, r, delta in layers:
        sv = torch.linalg.svdvals(delta.double())
        # 1e-6 of the largest: above float32 rounding of the update, below Sinter's effect at the paper's setting
        numerical_rank = int((sv > sv[0] * 1e-6).sum()) if sv[0] > 0 else 0
        energy = float((sv[r:] ** 2).sum() / (sv**2).sum()) if sv[0] > 0 else 0.0
        summary["layers"].append({"layer": name, "shape": list(delta.shape), "r": r, "numerical_rank": numerical_rank,
                                  "energy_beyond_r": energy, "top_singular_value": float(sv[0])})
        kind = name.split(".")[-1]  # one colour and one legend entry per kind of module
        spec_ax.semilogy(range(1, len(sv) + 1), (sv / sv[0]).clamp_min(1e-12), alpha=0.6, color=color_of[kind],
                         label=f"{kind} ({count_of[kind]} module{'s' if count_of[kind] > 1 else ''})")
    r = layers[0][1]
    spec_ax.axvline(r, color="k", linestyle="--", label=f"rank r = {r} (LoRA's limit)")
    spec_ax.set_xlabel("singular value index")
    spec_ax.set_ylabel("singular value / largest")
    spec_ax.set_title(f"spectrum of each adapted module's update ({len(layers)} modules)")
    handles, labels = spec_ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    spec_ax.legend(unique.values(), unique.keys(), fontsize=8)
    if has_activation:
        act = config.build_activation()
        A_keys = [k for k in tensors if k.endswith("loran_A")]
        B0 = tensors[A_keys[0][: -len("A")] + "B"].float()
        span = float((B0 @ tensors[A_keys[0]].float()).abs().max()) or 1.0
        x = torch.linspace(-span, span, 2001)
        axes[1].plot(x, act(x) - x, label="f(x) - x")
        axes[1].set_title(f"{act.name}: f(x) - x over the range of BA")
        axes[1].set_xlabel("x")
        axes[1].grid(alpha=0.3)
        axes[1].legend()
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, output)
    summary["plot"] = str(output)
    return summary
