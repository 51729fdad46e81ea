"""What the command line shows and writes: the comparison table, the plots, and `inspect`'s spectra."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from .errors import UserError
from .files import PLOT_SOFTWARE
from .options import GRID_OPTIONS, SHORT_NAMES


def activation_formula(config) -> str:
    """``f`` of a LoRAN config in words, with its parameters (from the activation's one definition)."""
    return config.describe_activation()


#: The settings that tell cells apart in a report (besides the method; seeds are averaged over).
CELL_KEYS = tuple(k for k in GRID_OPTIONS if k != "seed")
_SHORT = SHORT_NAMES


def _varying(results: list[dict]) -> list[str]:
    return [k for k in CELL_KEYS if len({r.get(k) for r in results if k in r}) > 1]


def group_label(result: dict, varying: list[str]) -> str:
    """The method plus the settings that vary in this comparison (``loran r4``, ``sine w100``)."""
    parts = [result["method"]] + [f"{_SHORT[k]}{result[k]:g}" for k in varying if k in result]
    return " ".join(parts)


def run_label(result: dict, results: list[dict]) -> str:
    seeds = len({r.get("seed") for r in results}) > 1
    return group_label(result, _varying(results)) + (f" (seed {result['seed']})" if seeds else "")


def groups(results: list[dict]) -> dict[tuple, list[dict]]:
    """Runs that differ only in their seed, in first-seen order."""
    out: dict[tuple, list[dict]] = {}
    for r in results:
        out.setdefault((r["method"],) + tuple(r.get(k) for k in CELL_KEYS), []).append(r)
    return out


def sign_flip_p(differences: list[float]) -> Optional[float]:
    """Two-sided p-value of a paired mean difference by exact sign flipping (all 2^n sign patterns): no normality
    assumption, exact for the few seeds a sweep has. None with fewer than 2 pairs."""
    from itertools import product

    n = len(differences)
    if n < 2 or n > 16:
        return None
    observed = abs(sum(differences))
    extreme = sum(abs(sum(s * d for s, d in zip(signs, differences))) >= observed - 1e-12
                  for signs in product((1, -1), repeat=n))
    return extreme / 2**n


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std


def paired_to_lora(runs: list[dict], results: list[dict], metric: str) -> list[float]:
    """Per seed, this cell's metric minus LoRA's at the same rank and learning rate (same seed: same initial A,
    data order and dropout masks)."""
    lora = {(r["rank"], r["lr"], r["seed"]): r["metrics"][metric] for r in results if r["method"] == "lora"}
    return [r["metrics"][metric] - lora[(r["rank"], r["lr"], r["seed"])] for r in runs
            if (r["rank"], r["lr"], r["seed"]) in lora]


def comparison_table(results: list[dict], metric: str) -> str:
    """One row per cell (seeds pooled): mean +- std of the metric, the paired difference to LoRA with its sign-flip
    p-value, time, memory, parameters, non-linear share and effective rank of the update."""
    varying = _varying(results)
    baseline = all("majority_rate" in r["metrics"] for r in results)  # classification: n and the constant guess
    head = (f"| method | seeds | {metric} (mean +- std) | vs LoRA, paired (p) | trainable params | train time (s) | "
            "peak memory (MB) | non-linear share (beyond scale) | effective rank |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    if baseline:
        lines = [head + " examples | majority class |", lines[1] + "---|---|"]
    for runs in groups(results).values():
        first = runs[0]
        mean, std = _mean_std([r["metrics"][metric] for r in runs])
        single = sum(r["metrics"].get("predicted_classes") == 1 for r in runs)
        diffs = paired_to_lora(runs, results, metric) if first["method"] != "lora" else []
        paired = paired_text(diffs)
        shares = [r.get("nonlinear_share") for r in runs if r.get("nonlinear_share") is not None]
        beyond = [r.get("nonlinear_beyond_scale") for r in runs if r.get("nonlinear_beyond_scale") is not None]
        ranks = [r.get("effective_rank") for r in runs if r.get("effective_rank") is not None]
        share_text = (format(max(shares), ".2e") + (f" ({max(beyond):.1e})" if beyond else "")) if shares else ""
        warning = (f" (single class{'' if len(runs) == 1 else f' in {single} of {len(runs)} runs'})"
                   if single else "")
        row = (f"| {group_label(first, varying)} | {len(runs)} | {mean:.4f}" + (f" +- {std:.4f}" if len(runs) > 1 else "")
               + f"{warning} | {paired} | {first['trainable_params']:,} | "
               f"{_mean_std([r['train_seconds'] for r in runs])[0]:.1f} | "
               f"{_mean_std([r['peak_memory_mb'] for r in runs])[0]:.0f} | "
               f"{share_text} | {format(_mean_std(ranks)[0], '.1f') if ranks else ''} |")
        if baseline:
            m = first["metrics"]
            row += f" {m['n']} | {m['majority_rate']:.4f} ({m['majority_label']}) |"
        lines.append(row)
    if baseline and any(r["metrics"].get("predicted_classes") == 1 for r in results):
        lines.append("\nsingle class: the model predicted the same class for every example; its accuracy is the share "
                     "of that class, not learned (compare with the majority-class column).")
    if baseline and any(r["metrics"].get("majority_tie") for r in results):
        tie = next(r["metrics"]["majority_tie"] for r in results if r["metrics"].get("majority_tie"))
        lines.append(f"\nmajority class: {', '.join(tie)} are equally frequent in the training split; the column "
                     "shows the first of them.")
    note = invocations_note(results)
    if note:
        lines.append("\n" + note)
    return "\n".join(lines)


def paired_text(diffs: list[float]) -> str:
    """The paired difference to LoRA: mean +- std and the sign-flip p-value over seeds; with one seed the difference
    alone, saying that it has no spread and no test (one pair cannot show either)."""
    if not diffs:
        return ""
    if len(diffs) == 1:
        return f"{diffs[0]:+.4f} (1 seed: no spread, no test)"
    d_mean, d_std = _mean_std(diffs)
    p = sign_flip_p(diffs)
    return f"{d_mean:+.4f} +- {d_std:.4f}" + (f" (p={p:.2f})" if p is not None else "")


def invocations_note(results: list[dict]) -> str:
    """When a resumed sweep's cells were trained by different invocations of the command (at other times, under
    another machine load), their train times are not comparable: say so, and which cells came from which."""
    runs: dict[str, list[str]] = {}
    for r in results:
        runs.setdefault(r.get("invocation") or "an earlier version (not recorded)", []).append(r.get("cell", r["method"]))
    if len(runs) < 2:
        return ""
    parts = "; ".join(f"{when}: {len(cells)} cell(s)" for when, cells in runs.items())
    return (f"train times: the cells were trained by {len(runs)} invocations of the command (the sweep was resumed): "
            f"{parts}. Times from different invocations ran under different machine load; compare them with care.")


def write_sweep_reports(out: Path, results: list[dict], metric: str, header: dict) -> list[str]:
    """metrics.json (every run), table.md, comparison.png (up to 8 runs: loss curves and bars) and sweep.png (when a
    grid setting varies, or when there are too many runs for comparison.png: the metric and the train time over the
    setting that varies, else per method); each written whole under a temporary name, then renamed. Returns the
    names of the files written."""
    from peft_loran._atomic import write_text_atomic

    write_text_atomic(out / "metrics.json", json.dumps({**header, "results": results}, indent=2, default=str) + "\n")
    write_text_atomic(out / "table.md", comparison_table(results, metric) + "\n")
    written = ["metrics.json", "table.md"]
    if len(results) <= 8:
        _save_plot(lambda path: plot_comparison(results, metric, path), out / "comparison.png")
        written.append("comparison.png")
    if sweep_axis(results) is not None or len(results) > 8:  # a setting varies, or too many runs for comparison.png
        _save_plot(lambda path: plot_sweep(results, metric, path), out / "sweep.png")
        written.append("sweep.png")
    return written


def read_table(out: Path) -> str:
    return (out / "table.md").read_text().rstrip("\n")


def _save_plot(draw, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    draw(tmp)
    os.replace(tmp, path)


#: Axis titles of the settings a sweep can run over.
_AXIS_NAMES = {"rank": "rank r", "lr": "learning rate", "sinter_amplitude": "Sinter amplitude a",
               "sinter_frequency": "Sinter frequency w", "sine_frequency": "Sine-LoRA frequency w"}


def sweep_axis(results: list[dict]) -> Optional[str]:
    """The setting a sweep plot runs along: the rank if it varies, else the first other grid setting that does, else
    None (the methods side by side, seeds pooled)."""
    varying = _varying(results)
    return "rank" if "rank" in varying else (varying[0] if varying else None)


def plot_sweep(results: list[dict], metric: str, path: Path) -> None:
    """The metric (mean and standard deviation over seeds) and the training time per method, against the setting
    that varies (:func:`sweep_axis`); with none varying, one point per method. Says when the train times come from
    more than one invocation of the command (a resumed sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = sweep_axis(results)
    varying = [k for k in _varying(results) if k != axis]
    lines: dict[str, dict[float, list[dict]]] = {}
    for r in results:
        x = r[axis] if axis else 0
        lines.setdefault(group_label(r, varying), {}).setdefault(x, []).append(r)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    markers = "oxs^Dv<>P*"
    for i, (label, by_x) in enumerate(lines.items()):
        xs = sorted(by_x)
        stats = [_mean_std([r["metrics"][metric] for r in by_x[k]]) for k in xs]
        times = [_mean_std([r["train_seconds"] for r in by_x[k]])[0] for k in xs]
        positions = xs if axis else [i]
        style = dict(marker=markers[i % len(markers)], linestyle=["-", "--", ":", "-."][i % 4], color=f"C{i}",
                     markerfacecolor="none", capsize=3)
        left.errorbar(positions, [m for m, _ in stats], yerr=[s for _, s in stats], label=label, **style)
        right.plot(positions, times, label=label, **{k: v for k, v in style.items() if k != "capsize"})
    seeds = sorted({r["seed"] for r in results})
    values = sorted({r[axis] for r in results}) if axis else []
    for ax in (left, right):
        if axis:
            if all(v > 0 for v in values):
                ax.set_xscale("log", base=2 if axis == "rank" else 10)
            ax.set_xticks(values)
            ax.set_xticklabels([f"{v:g}" for v in values])
            ax.set_xlabel(_AXIS_NAMES[axis])
        else:
            ax.set_xticks(range(len(lines)))
            ax.set_xticklabels(list(lines), rotation=20, ha="right")
            ax.set_xlabel("method")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    against = f"against {_AXIS_NAMES[axis]}" if axis else "per method"
    left.set_ylabel(f"{metric} (mean +- std over {len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
    left.set_title(f"{metric} {against}")
    right.set_ylabel("training time (s)")
    right.set_ylim(bottom=0)  # a ratio of times reads right only from zero
    invocations = len({r.get("invocation") for r in results})
    right.set_title(f"training time {against}" + (f"\n(from {invocations} invocations of a resumed sweep: machine "
                                                  "load may differ between them)" if invocations > 1 else ""),
                    fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": PLOT_SOFTWARE})
    plt.close(fig)


def identical_curves(results: list[dict], tol: float = 1e-3) -> list[tuple[str, str]]:
    """Pairs of runs whose loss curves coincide (within ``tol``, relative): LoRA and LoRAN at the paper's setting
    draw the same curve, and a plot must say so rather than show one line for two."""
    def close(a, b) -> bool:
        return len(a) == len(b) and all(abs(x[1] - y[1]) <= tol * max(1.0, abs(x[1])) for x, y in zip(a, b))

    curves = [(r["method"], r["loss_curve"]) for r in results if r["loss_curve"]]
    return [(a, b) for i, (a, ca) in enumerate(curves) for b, cb in curves[i + 1:] if close(ca, cb)]


def plot_comparison(results: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    results = [{**r, "method": run_label(r, results)} for r in results]
    colors = [f"C{i}" for i in range(len(results))]  # the same colour for a method's line and bar
    # LoRA and LoRAN at the paper's setting draw almost the same curve: markers and dashes keep each one visible
    styles = [("o", "-"), ("x", "--"), ("s", ":"), ("^", "-."), ("D", (0, (5, 2, 1, 2)))]
    same = identical_curves(results)  # said in the plot, since one curve hides the other
    curves = [r for r in results if r["loss_curve"]]
    for i, (r, color) in enumerate(zip(results, colors)):
        if r["loss_curve"]:
            steps, losses = zip(*r["loss_curve"])
            marker, line = styles[i % len(styles)]
            # markers at alternating steps (offset per curve), so a curve under an identical one still shows
            left.plot(steps, losses, label=r["method"], marker=marker, linestyle=line, color=color, markersize=5,
                      markerfacecolor="none", alpha=0.85, markevery=(i % len(curves), len(curves)),
                      linewidth=1.2 + 0.8 * (len(curves) - 1 - i) / max(len(curves) - 1, 1))
    if same:
        left.text(0.02, 0.02, "\n".join(f"{a} and {b}: the same curve (within 1e-3)" for a, b in same),
                  transform=left.transAxes, fontsize=8, va="bottom")
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
    first = results[0]["metrics"]
    title = f"{results[0].get('eval_split', 'test')} {metric}"
    if "majority_rate" in first:  # classification: how many examples, and what a constant guess scores
        right.axhline(first["majority_rate"], color="0.4", linestyle="--", linewidth=1)
        right.text(len(values) - 0.5, first["majority_rate"], f"majority class ({first['majority_label']})",
                   ha="right", va="bottom", fontsize=8, color="0.3")
        title += f" (n = {first['n']})"
        singles = [r["method"] for r in results if r["metrics"].get("predicted_classes") == 1]
        if singles:
            title += "\nsingle class: " + ", ".join(singles)
    right.set_title(title, fontsize=10)
    if len(results) > 3 or max(len(n) for n in names) > 10:  # keep the run names from running into each other
        right.set_xticks(range(len(names)), names, rotation=30, ha="right")
    right.set_ylim(0, max(values) * 1.15 if max(values) > 0 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": PLOT_SOFTWARE})
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


def adapted_layers(config, tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the adapted layers in an adapter's tensors (LoRAN / original MLORA, or PEFT LoRA)."""
    from peft_loran.config import LoranConfig

    if isinstance(config, LoranConfig):
        suffix = ".loran_A"
    elif getattr(config, "peft_type", None) == "LORA":
        suffix = ".lora_A.weight"
    else:
        raise UserError(f"cannot inspect adapters of type {config.peft_type}; LoRAN, MLORA and LoRA are supported")
    return in_model_order(config, [k[: -len(suffix)] for k in tensors if k.endswith(suffix)])


def in_model_order(config, names: list[str]) -> list[str]:
    """``names`` (PEFT state-dict module names) in the order the base model runs them: read from the base model's
    config (the model built on the meta device, no weights) when the adapter's base is a local folder; else numbers
    compared as numbers (``layers.2`` before ``layers.10``)."""
    import re

    def natural(name: str) -> list:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

    order: dict[str, int] = {}
    base = getattr(config, "base_model_name_or_path", None)
    if base and (Path(base) / "config.json").exists():
        from transformers import AutoConfig

        from .targets import meta_model

        try:
            task = str(getattr(config.task_type, "value", config.task_type) or "")
            model = meta_model(AutoConfig.from_pretrained(base), "classify" if task == "SEQ_CLS" else "generate")
            order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        except (OSError, ValueError, KeyError):
            order = {}

    def position(name: str):
        plain = name.removeprefix("base_model.model.")
        return (order.get(plain, len(order)), natural(name))

    return sorted(names, key=position)


def layer_updates(config, tensors: dict[str, torch.Tensor], layers: list[str]):
    """Yield (layer name, rank r, dense update s*f(BA) or s*BA, non-linear share) for each of ``layers``."""
    from peft_loran import functional as LF
    from peft_loran.config import LoranConfig

    if isinstance(config, LoranConfig):
        for layer in layers:
            A, B = tensors[layer + ".loran_A"].float(), tensors[layer + ".loran_B"].float()
            act = config.build_activation(in_features=A.shape[1])
            stages = [(tensors.get(f"{layer}.loran_P.{k}"), tensors.get(f"{layer}.loran_bias.{k}"))
                      for k in range(len(config.chain_dims or [A.shape[1]]))]
            dense, share = LF.LowRankUpdate(A, B, stages, act, config.scaling).dense_and_share()
            yield layer, config.r, dense, share
    else:
        scaling = config.lora_alpha / (config.r ** 0.5 if getattr(config, "use_rslora", False) else config.r)
        for layer in layers:
            yield (layer, config.r,
                   scaling * tensors[layer + ".lora_B.weight"].float() @ tensors[layer + ".lora_A.weight"].float(),
                   {"share": 0.0, "beyond_scale": 0.0})


def inspect_adapter(path: str, output: Path, quiet: bool = False) -> dict:
    """Print config and sizes; plot each layer's singular values against the rank-r line a LoRA update can't pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    from peft_loran.config import LoranConfig
    from peft_loran.diagnostics import spectrum_statistics

    written_type, config, tensors = load_adapter(path)
    names = adapted_layers(config, tensors)
    # the bar keeps its line (leave=True): a cleared bar leaves the cursor on it, and the first printed line lands there
    layers = list(tqdm(layer_updates(config, tensors, names), desc="spectra", total=len(names), unit="module",
                       disable=quiet, leave=True))
    if not layers:
        raise UserError(f"{path}: no adapter layers found in the weights")
    summary = {"peft_type": written_type, "parameters": sum(t.numel() for t in tensors.values()), "layers": []}
    has_activation = isinstance(config, LoranConfig)
    fig, axes = plt.subplots(1, 2 if has_activation else 1, figsize=(12 if has_activation else 7, 4.5))
    spec_ax = axes[0] if has_activation else axes
    kinds = sorted({layer[0].split(".")[-1] for layer in layers})
    color_of = {kind: f"C{i}" for i, kind in enumerate(kinds)}
    count_of = {kind: sum(layer[0].split(".")[-1] == kind for layer in layers) for kind in kinds}
    for name, r, delta, share in layers:
        sv = torch.linalg.svdvals(delta.double())
        stats = spectrum_statistics(sv, r)
        summary["layers"].append({"layer": name, "shape": list(delta.shape), "r": r,
                                  "numerical_rank": stats["numerical_rank"], "effective_rank": stats["effective_rank"],
                                  "energy_beyond_r": stats["energy_beyond_r"],
                                  "nonlinear_share": share["share"] if share else None,
                                  "nonlinear_beyond_scale": share["beyond_scale"] if share else None,
                                  "top_singular_value": stats["top_singular_value"]})
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
        A_keys = [k for k in tensors if k.endswith("loran_A")]
        act = config.build_activation(in_features=tensors[A_keys[0]].shape[1])
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
    fig.savefig(tmp, dpi=110, metadata={"Software": PLOT_SOFTWARE})
    plt.close(fig)
    os.replace(tmp, output)
    summary["plot"] = str(output)
    return summary
