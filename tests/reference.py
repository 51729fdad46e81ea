"""An independent, deliberately plain LoRAN: dense f(BA) with autograd, formulas written out again here.

Nothing in this file imports peft_loran's math; the tests compare the package against it.
"""

from __future__ import annotations

import torch

A_SIN, W_SIN = 5e-5, 1e4


def activation(name: str, a: float = A_SIN, w: float = W_SIN):
    formulas = {
        "sinter": lambda x: x + a * x * torch.sin(w * x),
        "cosinter": lambda x: x + a * x * torch.cos(w * x),
        "sigmoid": lambda x: 1 / (1 + torch.exp(-x)),
        "tanh": lambda x: torch.tanh(x),
        "relu": lambda x: torch.clamp(x, min=0),
        "silu": lambda x: x / (1 + torch.exp(-x)),
        # the original's own classes (fixture README): steepness 25, fixed 1e4 cosine, 0.5 x times the bell curve
        "swish": lambda x: x / (1 + torch.exp(-25 * x)),
        "identity": lambda x: x,
        "cos": lambda x: 1.0 * x * torch.cos(10000.0 * x) + 1.0 * x,
        "gaussian": lambda x: 0.5 * x * torch.exp(-(x**2)),
        # Sine-LoRA (Ji et al.): sin(w x) / g, with a = 1 / g
        "sine": lambda x: a * torch.sin(w * x),
    }
    return formulas[name]


def naive_update(A, B, Ps, bs, f, scaling, centered=True):
    """s * chain(B A) as a dense (rows, cols) matrix; f centred as f(x) - f(0) when asked."""
    f0 = f(torch.zeros((), dtype=torch.float64)).item() if centered else 0.0
    h = B.double() @ A.double()
    n = max(len(Ps), len(bs), 1)
    for k in range(n):
        h = f(h) - f0
        if Ps:
            h = h @ Ps[k].double()
        if bs:
            h = h + bs[k].double()
    return scaling * h


def layer_factors(layer, adapter="default"):
    return (
        layer.loran_A[adapter], layer.loran_B[adapter], list(layer.loran_P[adapter]), list(layer.loran_bias[adapter]),
        layer.loran_scaling[adapter],
    )


def naive_linear_output(x, weight_out_in, bias, A, B, Ps, bs, f, scaling, centered=True):
    D = naive_update(A, B, Ps, bs, f, scaling, centered)
    y = x.double() @ weight_out_in.double().T + x.double() @ D.T
    return y + bias.double() if bias is not None else y


def well_conditioned(layer, act: str, adapter: str = "default") -> None:
    """The original's ``cos`` (x cos(1e4 x) + x) is ill-conditioned in float32 once |x| >> 1e-4: an ulp of B A moves
    f by ~1e4 |x| ulps, so float32 code and a float64 reference agree only to that. For ``cos`` shrink B and the
    biases so every stage's input is ~1e-4 (where cos(1e4 x) still varies by order one)."""
    if act != "cos":
        return
    with torch.no_grad():
        layer.loran_B[adapter].mul_(1e-3)
        for b in layer.loran_bias[adapter]:
            b.mul_(1e-3)
