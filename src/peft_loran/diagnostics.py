"""What an adapter's update is made of, per adapted module: the share of its energy that the non-linearity makes
and its effective rank. Written into metrics.json after every command-line run and shown by ``inspect``, so users
see whether their setting does anything beyond LoRA (at the paper's Sinter setting the share is about 2.5e-9).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional


#: Singular values below this share of the largest count as rounding (above float32 rounding of an update, below
#: Sinter's effect at the paper's setting).
NUMERICAL_RANK_TOLERANCE = 1e-6


def spectrum_statistics(sv: torch.Tensor, r: Optional[int]) -> dict:
    """What the singular values ``sv`` (descending) of an update whose factors have rank ``r`` say: the effective
    rank, the share of the energy beyond the first ``r`` directions (what no rank-r LoRA can hold), the numerical
    rank and the largest singular value."""
    sv = sv.double()
    energy = float((sv**2).sum())
    top = float(sv[0]) if len(sv) else 0.0
    return {
        "effective_rank": functional.effective_rank(sv),
        "energy_beyond_r": float((sv[r:] ** 2).sum() / energy) if (r and energy > 0) else 0.0,
        "numerical_rank": int((sv > top * NUMERICAL_RANK_TOLERANCE).sum()) if top > 0 else 0,
        "top_singular_value": top,
    }


def module_statistics(update: torch.Tensor, r: Optional[int], share: Optional[dict]) -> dict:
    """Statistics of one dense update ``update`` (out x in) whose factors have rank ``r``; ``share`` is
    :meth:`peft_loran.functional.LowRankUpdate.nonlinear_share`'s answer (None where undefined)."""
    stats = spectrum_statistics(torch.linalg.svdvals(update.detach().double()), r)
    return {
        "shape": list(update.shape), "r": r, "nonlinear_share": share["share"] if share else None,
        "nonlinear_beyond_scale": share["beyond_scale"] if share else None,
        "effective_rank": stats["effective_rank"], "energy_beyond_r": stats["energy_beyond_r"],
    }


@torch.no_grad()
def update_statistics(model: nn.Module, adapter: str = "default") -> list[dict]:
    """One entry per adapted module of a PEFT model (LoRAN, or PEFT's LoRA family: LoRA, rsLoRA, DoRA, HiRA...):
    ``module``, ``shape``, ``r``, ``nonlinear_share`` and ``nonlinear_beyond_scale`` (0 for LoRA; None where
    undefined: chains, DoRA, HiRA), ``effective_rank`` and ``energy_beyond_r`` of the dense update. One dense update is
    alive at a time."""
    from .layer import LoranLayer

    rows = []
    for name, module in model.named_modules():
        if isinstance(module, LoranLayer):
            if adapter not in module.loran_A:
                continue
            update = module.low_rank_update(adapter)
            dense, share = update.dense_and_share()  # one pass over the blocks, in float64
            rows.append({"module": name, **module_statistics(dense, update.A.shape[0], share)})
        elif hasattr(module, "get_delta_weight") and adapter in getattr(module, "lora_A", {}):
            r = module.r.get(adapter) if isinstance(getattr(module, "r", None), dict) else None
            update = module.get_delta_weight(adapter)
            share = {"share": 0.0, "beyond_scale": 0.0} if _is_plain_lora(module) else None
            rows.append({"module": name, **module_statistics(update.float(), r, share)})
        elif hasattr(module, "get_delta_weight") and adapter in getattr(module, "hira_A", {}):
            # HiRA's update is the Hadamard product W0 * (B A): high rank from rank-r factors, linear in B A
            update = module.get_base_layer().weight.float() * module.get_delta_weight(adapter).float()
            rows.append({"module": name, **module_statistics(update, module.hira_A[adapter].shape[0], None)})
    return rows


def _is_plain_lora(module: nn.Module) -> bool:
    """PEFT LoRA / rsLoRA (update ``s B A``: no non-linear part); DoRA and HiRA rescale or mix it with ``W``."""
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer) and not any(getattr(module, "use_dora", {}).values())


def summarize(rows: list[dict]) -> dict:
    """The largest and the mean non-linear share over modules, the largest share beyond a change of scale, and
    the mean effective rank (what the sweep shows)."""
    shares = [row["nonlinear_share"] for row in rows if row["nonlinear_share"] is not None]
    beyond = [row["nonlinear_beyond_scale"] for row in rows if row["nonlinear_beyond_scale"] is not None]
    return {
        "nonlinear_share": max(shares) if shares else None,
        "nonlinear_beyond_scale": max(beyond) if beyond else None,
        "nonlinear_share_mean": sum(shares) / len(shares) if shares else None,
        "effective_rank_mean": sum(row["effective_rank"] for row in rows) / len(rows) if rows else None,
    }
