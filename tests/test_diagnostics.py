"""Spectrum statistics (inspect, metrics.json) against updates whose singular values are known by construction, and
those of a LoRAN layer against its update built plainly."""

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


def test_update_statistics_of_a_loran_layer_match_the_naive_dense_update():
    """``update_statistics`` (the numbers metrics.json and ``inspect`` show) against the update built plainly in
    float64: its effective rank, energy beyond r and non-linear share, for a strong Sinter in three row blocks."""
    from peft import inject_adapter_in_model
    from torch import nn

    from peft_loran import LoranConfig
    from peft_loran.diagnostics import update_statistics

    from .reference import activation, layer_factors, naive_update

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(24, 20)

    torch.manual_seed(0)
    config = LoranConfig(target_modules=["lin"], r=3, loran_alpha=6, init_weights=False, sinter_amplitude=0.5,
                         sinter_frequency=3.0, block_rows=7)
    model = inject_adapter_in_model(config, Toy())
    (row,) = update_statistics(model)
    A, B, Ps, bs, s = layer_factors(model.lin)
    dense = naive_update(A, B, Ps, bs, activation("sinter", 0.5, 3.0), s)
    sv = torch.linalg.svdvals(dense)
    p = sv / sv.sum()
    linear = s * B.double() @ A.double()
    assert row["module"] == "lin" and row["shape"] == [20, 24] and row["r"] == 3
    assert abs(row["effective_rank"] - float(torch.exp(-(p * p.log()).sum()))) < 1e-9
    assert abs(row["energy_beyond_r"] - float((sv[3:] ** 2).sum() / (sv**2).sum())) < 1e-9
    assert abs(row["nonlinear_share"] - float((dense - linear).pow(2).sum() / dense.pow(2).sum())) < 1e-9
    assert row["energy_beyond_r"] > 1e-3 and row["effective_rank"] > 3  # the test sees a real non-linear update
