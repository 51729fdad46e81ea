"""The rank of a LoRA export (``8``, or ``auto:TOL``), parsed without torch: the command line checks ``--to-lora``
with it before it imports anything heavy (:mod:`peft_loran_cli.light`)."""

from __future__ import annotations

from typing import Optional, Union


def parse_rank(rank: Union[int, str]) -> tuple[Optional[int], Optional[float]]:
    """``8`` -> (8, None); ``"auto:1e-3"`` -> (None, 1e-3). Raises ValueError naming ``rank`` otherwise."""
    if isinstance(rank, int) and not isinstance(rank, bool):
        if rank <= 0:
            raise ValueError(f"`rank` must be a positive integer or 'auto:TOL', got {rank}.")
        return rank, None
    text = str(rank).strip()
    if text.isdigit():
        return parse_rank(int(text))
    if text.startswith("auto:"):
        try:
            tol = float(text[5:])
        except ValueError:
            tol = float("nan")
        if not (0 < tol < 1):
            raise ValueError(f"`rank` 'auto:TOL' needs 0 < TOL < 1 (a relative Frobenius error), got {rank!r}.")
        return None, tol
    raise ValueError(f"`rank` must be a positive integer or 'auto:TOL' (e.g. auto:1e-3), got {rank!r}.")
