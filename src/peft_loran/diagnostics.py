"""What an adapter's update is made of, per adapted module: the share of its energy that the non-linearity makes
and its effective rank. Written into metrics.json after every command-line run and shown by ``inspect``, so users
see whether their setting does anything beyond LoRA (at the paper's Sinter setting the share is about 2.5e-9).
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn

from .update import LowRankUpdate


#: Singular values below this share of the largest count as rounding (above float32 rounding of an update, below
#: Sinter's effect at the paper's setting).
NUMERICAL_RANK_TOLERANCE = 1e-6


def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank ``exp(entropy(sigma / sum(sigma)))``: between 1 and the number of non-zero
    singular values, equal to k for k equal ones; it counts directions with real weight, not rounding noise."""
    sv = singular_values.double().clamp_min(0)
    if float(sv.sum()) == 0.0:
        return 0.0
    p = sv / sv.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def spectrum_statistics(sv: torch.Tensor, r: Optional[int]) -> dict:
    """What the singular values ``sv`` (descending) of an update whose factors have rank ``r`` say: the effective
    rank, the share of the energy beyond the first ``r`` directions (what no rank-r LoRA can hold), the numerical
    rank and the largest singular value."""
    sv = sv.double()
    energy = float((sv**2).sum())
    top = float(sv[0]) if len(sv) else 0.0
    return {
        "effective_rank": effective_rank(sv),
        "energy_beyond_r": float((sv[r:] ** 2).sum() / energy) if (r and energy > 0) else 0.0,
        "numerical_rank": int((sv > top * NUMERICAL_RANK_TOLERANCE).sum()) if top > 0 else 0,
        "top_singular_value": top,
    }


def nonlinear_share(update: LowRankUpdate, write_dense_to: Optional[torch.Tensor] = None) -> Optional[dict]:
    """How much of ``D = s f(BA)`` the non-linearity makes, in float64:

    * ``share``: ``||D - s BA||^2 / ||D||^2`` (0 for LoRA; for Sinter with amplitude ``a < 1`` at most ``a^2 / (1 -
      a)^2``; it counts a mere change of scale as non-linear: Sine-LoRA's ``sin(w x) / g ~ (w / g) x`` gives about
      ``(1 - g / w)^2`` even where it is linear);
    * ``beyond_scale``: ``min_c ||D - c BA||^2 / ||D||^2 = 1 - <D, BA>^2 / (||D||^2 ||BA||^2)``: what no multiple of
      ``BA`` explains, the part of the update a rescaled LoRA could not give.

    None for chains with ``P``/``b`` (no linear counterpart) and for an all-zero update. ``write_dense_to`` (a float64
    ``(out, in)`` tensor) also receives ``D``, from the same pass over the blocks."""
    if not update.plain:
        return None
    update = update.in_float64()
    A64, B64, scaling = update.A, update.B, update.scaling
    total = inner = distance = 0.0
    for block in update.blocks():
        if write_dense_to is not None:
            write_dense_to[block.i0:block.i1] = block.value
        linear = B64[block.i0:block.i1] @ A64
        total += float(block.value.pow(2).sum())
        inner += float((block.value * linear).sum())
        distance += float((block.value - scaling * linear).pow(2).sum())
    if total == 0.0:
        return None
    linear_sq = float(((B64.T @ B64) * (A64 @ A64.T)).sum())  # ||BA||^2 = trace(B^T B A A^T)
    beyond = 1.0 - inner * inner / (total * linear_sq) if linear_sq > 0 else 1.0
    return {"share": distance / total, "beyond_scale": max(0.0, beyond)}


def dense_and_share(update: LowRankUpdate) -> tuple[torch.Tensor, Optional[dict]]:
    """``D`` in float64 and :func:`nonlinear_share`, from one pass over the blocks (the SVD runs in float64 anyway)."""
    if not update.plain:
        return update.in_float64().dense(), None
    dense = torch.empty(update.shape, dtype=torch.float64, device=update.A.device)
    return dense, nonlinear_share(update, write_dense_to=dense)


def module_statistics(update: torch.Tensor, r: Optional[int], share: Optional[dict], spectra: bool = False) -> dict:
    """Statistics of one dense update ``update`` (out x in) whose factors have rank ``r``; ``share`` is
    :func:`nonlinear_share`'s answer (None where undefined); ``spectra`` adds the singular values."""
    sv = torch.linalg.svdvals(update.detach().double())
    stats = spectrum_statistics(sv, r)
    row = {"shape": list(update.shape), "r": r, "nonlinear_share": share["share"] if share else None,
           "nonlinear_beyond_scale": share["beyond_scale"] if share else None, **stats}
    if spectra:
        row["singular_values"] = sv.tolist()
    return row


def module_updates(model: nn.Module, adapter: str = "default") -> Iterator[tuple[str, Optional[int], torch.Tensor,
                                                                                   Optional[dict]]]:
    """``(module name, r, dense update, non-linear share)`` for every module ``adapter`` adapts, in model order: LoRAN
    layers from their factors, PEFT's LoRA family (LoRA, rsLoRA, DoRA, HiRA) through its ``get_delta_weight``."""
    from .layer import LoranLayer

    for name, module in model.named_modules():
        if isinstance(module, LoranLayer):
            if adapter in module.loran_A:
                update = module.low_rank_update(adapter)
                yield (name, update.A.shape[0], *dense_and_share(update))
        elif hasattr(module, "get_delta_weight") and adapter in getattr(module, "lora_A", {}):
            r = module.r.get(adapter) if isinstance(getattr(module, "r", None), dict) else None
            share = {"share": 0.0, "beyond_scale": 0.0} if _is_plain_lora(module) else None
            yield name, r, module.get_delta_weight(adapter).float(), share
        elif hasattr(module, "get_delta_weight") and adapter in getattr(module, "hira_A", {}):
            # HiRA's update is the Hadamard product W0 * (B A): high rank from rank-r factors, linear in B A
            update = module.get_base_layer().weight.float() * module.get_delta_weight(adapter).float()
            yield name, module.hira_A[adapter].shape[0], update, None


@torch.no_grad()
def update_statistics(model: nn.Module, adapter: str = "default", spectra: bool = False) -> list[dict]:
    """One entry per adapted module of a PEFT model (LoRAN, or PEFT's LoRA family): ``module``, ``shape``, ``r``,
    ``nonlinear_share`` and ``nonlinear_beyond_scale`` (0 for LoRA; None where undefined: chains, DoRA, HiRA), and
    :func:`spectrum_statistics` of the dense update (with ``spectra``, its singular values too). One dense update is
    alive at a time."""
    return [{"module": name, **module_statistics(dense, r, share, spectra)}
            for name, r, dense, share in module_updates(model, adapter)]


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
