"""What an adapter's update is made of, per adapted module: the share of its energy that the non-linearity makes
and its effective rank. Written into metrics.json after every command-line run and shown by ``inspect``, so users
see whether their setting does anything beyond LoRA (at the paper's Sinter setting the share is about 2.5e-9).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional as LF


def module_statistics(update: torch.Tensor, r: Optional[int], share: Optional[dict]) -> dict:
    """Statistics of one dense update ``update`` (out x in) whose factors have rank ``r``; ``share`` is
    :func:`peft_loran.functional.nonlinear_share`'s answer (None where undefined)."""
    sv = torch.linalg.svdvals(update.detach().double())
    energy = float((sv**2).sum())
    return {
        "shape": list(update.shape), "r": r, "nonlinear_share": share["share"] if share else None,
        "nonlinear_beyond_scale": share["beyond_scale"] if share else None,
        "effective_rank": LF.effective_rank(sv),
        "energy_beyond_r": float((sv[r:] ** 2).sum() / energy) if (r and energy > 0) else 0.0,
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
            A, B = module.loran_A[adapter], module.loran_B[adapter]
            stages = module.stages(adapter)
            act, s = module.loran_activation[adapter], module.loran_scaling[adapter]
            share = LF.nonlinear_share(A, B, stages, act, s, module.loran_block_rows[adapter])
            update = LF.delta_weight(A.detach(), B.detach(), stages, act, s, module.loran_block_rows[adapter])
            rows.append({"module": name, **module_statistics(update, A.shape[0], share)})
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
