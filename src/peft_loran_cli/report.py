"""What the command line shows and writes: the comparison table, the plots, and `inspect`'s spectra."""

from __future__ import annotations

import json
import os
import textwrap
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


def _seeds_vary(results: list[dict]) -> bool:
    return len({r.get("seed") for r in results}) > 1


def run_label(result: dict, results: list[dict]) -> str:
    return group_label(result, _varying(results)) + (f" (seed {result['seed']})" if _seeds_vary(results) else "")


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
    """One row per cell (seeds pooled): mean +- std of the metric (for classification also macro-F1 and the classes
    the model predicted), the paired difference to LoRA with its sign-flip p-value, time, memory, parameters,
    non-linear share and effective rank of the update; then what the reader must know to read it."""
    varying = _varying(results)
    classify = all("majority_rate" in r["metrics"] for r in results)  # classification: F1, n, the constant guess
    extra = [" macro-F1 (mean +- std)", " classes predicted"] if classify else []
    columns = ["method", "seeds", f"{metric} (mean +- std)", *extra, "vs LoRA, paired (p)", "trainable params",
               "train time (s)", "peak memory (MB)", "non-linear share (beyond scale)", "effective rank"]
    if classify:
        columns += ["examples", "majority class"]
    lines = ["| " + " | ".join(c.strip() for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(table_row(runs, results, metric, varying, classify)) + " |"
              for runs in groups(results).values()]
    return "\n".join(lines + table_notes(results, classify, metric))


def table_row(runs: list[dict], results: list[dict], metric: str, varying: list[str], classify: bool) -> list[str]:
    """The cells of one row of :func:`comparison_table`."""
    first = runs[0]
    single = sum(r["metrics"].get("predicted_classes") == 1 for r in runs)
    warning = f" (single class{'' if len(runs) == 1 else f' in {single} of {len(runs)} runs'})" if single else ""
    diffs = paired_to_lora(runs, results, metric) if first["method"] != "lora" else []
    shares = [r.get("nonlinear_share") for r in runs if r.get("nonlinear_share") is not None]
    beyond = [r.get("nonlinear_beyond_scale") for r in runs if r.get("nonlinear_beyond_scale") is not None]
    ranks = [r.get("effective_rank") for r in runs if r.get("effective_rank") is not None]
    cells = [group_label(first, varying), str(len(runs)), _spread([r["metrics"][metric] for r in runs]) + warning]
    if classify:
        f1 = [r["metrics"]["macro_f1"] for r in runs if "macro_f1" in r["metrics"]]
        predicted = sorted({r["metrics"].get("predicted_classes") for r in runs} - {None})
        classes = first["metrics"].get("classes")
        shown = "-".join(str(p) for p in (predicted[0], predicted[-1]) if p is not None) if predicted else ""
        if len(predicted) == 1:
            shown = str(predicted[0])
        cells += [_spread(f1) if f1 else "", f"{shown}" + (f" of {classes}" if classes and shown else "")]
    cells += [paired_text(diffs), f"{first['trainable_params']:,}",
              f"{_mean_std([r['train_seconds'] for r in runs])[0]:.1f}",
              f"{_mean_std([r['peak_memory_mb'] for r in runs])[0]:.0f}",
              (format(max(shares), ".2e") + (f" ({max(beyond):.1e})" if beyond else "")) if shares else "",
              format(_mean_std(ranks)[0], ".1f") if ranks else ""]
    if classify:
        m = first["metrics"]
        cells += [str(m["n"]), f"{m['majority_rate']:.4f} ({m['majority_label']})"]
    return cells


def _spread(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.4f}" + (f" +- {std:.4f}" if len(values) > 1 else "")


def smallest_p(seeds: int) -> float:
    """The smallest two-sided p-value the exact sign-flip test can give with ``seeds`` pairs: all of one sign."""
    return 2.0 / 2**seeds


def table_notes(results: list[dict], classify: bool, metric: str) -> list[str]:
    """The notes under the table: single-class models, ties for the majority class, the test's floor for this
    number of seeds, cells trained by several invocations."""
    notes = []
    if classify and any(r["metrics"].get("predicted_classes") == 1 for r in results):
        notes.append("single class: the model predicted the same class for every example; its accuracy is the share "
                     "of that class, not learned (compare with the majority-class column).")
    if classify and any(r["metrics"].get("majority_tie") for r in results):
        tie = next(r["metrics"]["majority_tie"] for r in results if r["metrics"].get("majority_tie"))
        notes.append(f"majority class: {', '.join(tie)} are equally frequent in the training split; the column shows "
                     "the first of them.")
    if classify:
        notes.append("macro-F1 averages the F1 of every class, so a model that ignores the rare classes scores low "
                     "there even where its accuracy is high; classes predicted: how many classes the model predicted "
                     "at least once (lowest-highest over seeds).")
    paired = [len(paired_to_lora(runs, results, metric)) for runs in groups(results).values()
              if runs[0]["method"] != "lora"]
    if paired and 1 < max(paired) and smallest_p(max(paired)) > 0.05:
        n = max(paired)
        notes.append(f"p: with {n} seeds the exact sign-flip test cannot go below p = {smallest_p(n):.3g} (every "
                     f"seed's difference of one sign), so no difference here can be significant at 0.05; that needs "
                     "at least 6 seeds (p >= 0.031).")
    note = invocations_note(results)
    if note:
        notes.append(note)
    return ["\n" + n for n in notes]


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
    from .light import library_module

    write_text_atomic = library_module("atomic").write_text_atomic

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


def identical_curves(results: list[dict], tol: float = 1e-3) -> list[tuple[dict, dict]]:
    """Pairs of runs whose loss curves coincide (within ``tol``, relative): LoRA and LoRAN at the paper's setting
    draw the same curve, and a plot must say so rather than show one line for two."""
    def close(a, b) -> bool:
        return len(a) == len(b) and all(abs(x[1] - y[1]) <= tol * max(1.0, abs(x[1])) for x, y in zip(a, b))

    curves = [r for r in results if r["loss_curve"]]
    return [(a, b) for i, a in enumerate(curves) for b in curves[i + 1:] if close(a["loss_curve"], b["loss_curve"])]


def same_curve_note(same: list[tuple[dict, dict]], results: list[dict]) -> str:
    """One line per pair of methods whose curves coincide, its seeds listed once ("lora and loran: the same curve
    at seeds 0, 1, 2 (within 1e-3)") rather than a line per seed; ``results``: the whole comparison (which settings
    vary, whether seeds do)."""
    varying, with_seeds = _varying(results), _seeds_vary(results)
    seeds: dict[tuple[str, str], list[str]] = {}
    for a, b in same:
        seed = str(a.get("seed")) if a.get("seed") == b.get("seed") else f"{a.get('seed')}/{b.get('seed')}"
        seeds.setdefault((group_label(a, varying), group_label(b, varying)), []).append(seed)
    return "\n".join(f"{a} and {b}: the same curve" + (f" at seed{'s' if len(s) > 1 else ''} {', '.join(s)}"
                                                        if with_seeds else "") + " (within 1e-3)"
                     for (a, b), s in seeds.items())


def plot_comparison(results: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    note = same_curve_note(identical_curves(results), results) or None  # said in the plot: one curve hides the other
    results = [{**r, "method": run_label(r, results)} for r in results]
    colors = [f"C{i}" for i in range(len(results))]  # the same colour for a method's line and bar
    # LoRA and LoRAN at the paper's setting draw almost the same curve: markers and dashes keep each one visible
    styles = [("o", "-"), ("x", "--"), ("s", ":"), ("^", "-."), ("D", (0, (5, 2, 1, 2)))]
    curves = [r for r in results if r["loss_curve"]]
    for i, (r, color) in enumerate(zip(results, colors)):
        if r["loss_curve"]:
            steps, losses = zip(*r["loss_curve"])
            marker, line = styles[i % len(styles)]
            # markers at alternating steps (offset per curve), so a curve under an identical one still shows
            left.plot(steps, losses, label=r["method"], marker=marker, linestyle=line, color=color, markersize=5,
                      markerfacecolor="none", alpha=0.85, markevery=(i % len(curves), len(curves)),
                      linewidth=1.2 + 0.8 * (len(curves) - 1 - i) / max(len(curves) - 1, 1))
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.set_title("training loss")
    # said in the legend's own box, so the legend can never cover it; many curves: the legend under the panel
    if len(curves) > 4:
        left.legend(title=note, title_fontsize=8, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                    ncol=min(3, len(curves)))
    else:
        left.legend(title=note, title_fontsize=8)
    left.grid(alpha=0.3)
    names = [r["method"] for r in results]
    values = [r["metrics"][metric] for r in results]
    bars = right.bar(names, values, color=colors)
    for bar, value in zip(bars, values):
        right.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.3f}", ha="center", va="bottom")
    first = results[0]["metrics"]
    title = f"{results[0].get('eval_split', 'test')} {metric}"
    if "majority_rate" in first:  # classification: how many examples, and what a constant guess scores
        right.axhline(first["majority_rate"], color="0.4", linestyle="--", linewidth=1,
                      label=f"majority class ({first['majority_label']}): {first['majority_rate']:.3f}")
        right.legend(loc="lower right", fontsize=8, framealpha=0.9)  # a legend: text on the line would cross it
        title += f" (n = {first['n']})"
        singles = [r["method"] for r in results if r["metrics"].get("predicted_classes") == 1]
        if singles:  # wrapped to the panel's width: a long list ran off the figure
            listed = "every run" if len(singles) == len(results) else ", ".join(singles)
            title += "\n" + textwrap.fill(f"single class: {listed}", 48)
    right.set_title(title, fontsize=10)
    if len(results) > 3 or max(len(n) for n in names) > 10:  # keep the run names from running into each other
        right.set_xticks(range(len(names)), names, rotation=30, ha="right")
    right.set_ylim(0, max(values) * 1.15 if max(values) > 0 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": PLOT_SOFTWARE})
    plt.close(fig)
