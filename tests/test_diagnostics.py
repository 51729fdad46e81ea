"""Spectrum statistics (inspect, metrics.json) against updates whose singular values are known by construction."""

from __future__ import annotations

import torch

from peft_loran.diagnostics import spectrum_statistics


def known_update(singular_values: list[float], rows: int = 12, cols: int = 9) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(rows, rows, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator, dtype=torch.float64))
    k = len(singular_values)
    return U[:, :k] @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ V[:, :k].T


def test_energy_beyond_r_effective_and_numerical_rank_of_a_known_spectrum():
    values = [3.0, 2.0, 1.0, 0.5, 1e-9]
    sv = torch.linalg.svdvals(known_update(values))
    stats = spectrum_statistics(sv, r=2)
    energy = sum(v * v for v in values)
    assert abs(stats["energy_beyond_r"] - (1.0 + 0.25 + 1e-18) / energy) < 1e-12
    assert stats["numerical_rank"] == 4  # 1e-9 of the largest is rounding
    p = torch.tensor(values, dtype=torch.float64) / sum(values)
    assert abs(stats["effective_rank"] - float(torch.exp(-(p * p.log()).sum()))) < 1e-9
    assert abs(stats["top_singular_value"] - 3.0) < 1e-12
    assert spectrum_statistics(torch.linalg.svdvals(known_update([1.0, 1.0, 1.0])), r=3)["energy_beyond_r"] < 1e-24
