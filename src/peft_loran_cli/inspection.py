"""``peft-loran inspect``: what an adapter's updates are made of (rank, spectrum, non-linear share), read from the
library's :mod:`peft_loran.diagnostics` on the adapter loaded by the one rule of :mod:`.loading`; the spectra as a
plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from .errors import UserError
from .files import PLOT_SOFTWARE
from .outputs import OutputFolder


def spectrum_plot_path(adapter: str, output: Optional[str]) -> Path:
    """``--output``, else ``<adapter>-spectrum.png`` beside the adapter folder."""
    if output:
        return Path(output)
    folder = Path(adapter).resolve()
    return folder.parent / f"{folder.name}-spectrum.png"


def inspect_adapter(adapter: str, output: Path, model: Optional[str] = None, load_in_4bit: bool = False,
                    quiet: bool = False) -> dict:
    """Load the adapter on its base, compute every module's statistics and spectrum, plot them to ``output`` (and
    add the plot to the manifest of the peft-loran folder it lands in, so ``--overwrite`` may replace it)."""
    from peft_loran.diagnostics import update_statistics
    from peft_loran.layer import LoranLayer

    from .loading import load_adapter_model

    loaded = load_adapter_model(adapter, model, load_in_4bit, quiet)
    rows = update_statistics(loaded.model, adapter="default", spectra=True)
    if not rows:
        raise UserError(f"{adapter}: no adapted layers found (LoRAN, the original's MLORA and PEFT's LoRA family can be "
                        "inspected)")
    peft_type = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("peft_type")
    from peft import get_peft_model_state_dict

    parameters = sum(t.numel() for t in get_peft_model_state_dict(loaded.model).values())
    layer = next((m for m in loaded.model.modules() if isinstance(m, LoranLayer) and "default" in m.loran_A), None)
    draw_spectra(rows, layer, output)
    folder = OutputFolder.enclosing(output.parent)
    if folder is not None:
        folder.claim(files=[output.resolve().relative_to(folder.path.resolve()).as_posix()])
    return {"peft_type": peft_type, "parameters": parameters, "layers": rows, "plot": str(output)}


def print_summary(adapter: str, summary: dict) -> None:
    print(f"adapter {adapter}: {summary['peft_type']}, {summary['parameters']:,} parameters, "
          f"{len(summary['layers'])} adapted modules")
    for row in summary["layers"]:
        share, beyond = row["nonlinear_share"], row["nonlinear_beyond_scale"]
        print(f"  {row['module']}: update {row['shape'][0]}x{row['shape'][1]}, "
              f"numerical rank {row['numerical_rank']} of {min(row['shape'])} (singular values above 1e-6 of the "
              f"largest; the factors have rank r = {row['r']}), effective rank {row['effective_rank']:.1f}, energy "
              f"beyond r {row['energy_beyond_r']:.2e}, non-linear share "
              + ("n/a" if share is None else f"{share:.2e} ({beyond:.2e} beyond a change of scale)"))
    shares = [row["nonlinear_share"] for row in summary["layers"] if row["nonlinear_share"] is not None]
    beyond = [row["nonlinear_beyond_scale"] for row in summary["layers"] if row["nonlinear_share"] is not None]
    if shares:
        print(f"non-linear share of the update's energy, ||s f(BA) - s BA||^2 / ||s f(BA)||^2: at most {max(shares):.2e};"
              f" beyond the best multiple of BA (what a rescaled LoRA could not give): at most {max(beyond):.2e}"
              + (" (below 1e-6: this adapter computes what a LoRA adapter would)" if max(beyond) < 1e-6 else ""))
    print(f"spectrum plot: {summary['plot']}")


def draw_spectra(rows: list[dict], layer, output: Path) -> None:
    """Each module's singular values against the rank-r line a LoRA update cannot pass; for LoRAN also ``f(x) - x``
    over the range of the first module's ``B A``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if layer is not None else 1, figsize=(12 if layer is not None else 7, 4.5))
    spec_ax = axes[0] if layer is not None else axes
    kinds = sorted({row["module"].split(".")[-1] for row in rows})
    count_of = {kind: sum(row["module"].split(".")[-1] == kind for row in rows) for kind in kinds}
    for row in rows:
        sv = torch.tensor(row["singular_values"], dtype=torch.float64)
        kind = row["module"].split(".")[-1]  # one colour and one legend entry per kind of module
        spec_ax.semilogy(range(1, len(sv) + 1), (sv / sv[0]).clamp_min(1e-12), alpha=0.6,
                         color=f"C{kinds.index(kind)}",
                         label=f"{kind} ({count_of[kind]} module{'s' if count_of[kind] > 1 else ''})")
    r = rows[0]["r"]
    if r:
        spec_ax.axvline(r, color="k", linestyle="--", label=f"rank r = {r} (LoRA's limit)")
    spec_ax.set_xlabel("singular value index")
    spec_ax.set_ylabel("singular value / largest")
    spec_ax.set_title(f"spectrum of each adapted module's update ({len(rows)} modules)")
    handles, labels = spec_ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    spec_ax.legend(unique.values(), unique.keys(), fontsize=8)
    if layer is not None:
        _draw_activation(axes[1], layer)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp.png")
    fig.savefig(tmp, dpi=110, metadata={"Software": PLOT_SOFTWARE})
    plt.close(fig)
    os.replace(tmp, output)


def _draw_activation(ax, layer) -> None:
    act = layer.loran_activation["default"]
    with torch.no_grad():
        span = float((layer.loran_B["default"].float() @ layer.loran_A["default"].float()).abs().max()) or 1.0
    x = torch.linspace(-span, span, 2001)
    ax.plot(x, act(x) - x, label="f(x) - x")
    ax.set_title(f"{act.name}: f(x) - x over the range of BA")
    ax.set_xlabel("x")
    ax.grid(alpha=0.3)
    ax.legend()
