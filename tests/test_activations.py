"""Activations: formulas against tests/reference.py, analytic derivatives against autograd, the registry."""

from __future__ import annotations

import pytest
import torch

import peft_loran
from peft_loran import update as LF
from peft_loran import get_activation, register_activation, unregister_activation

from .reference import activation as reference_activation

NAMES = ["sinter", "cosinter", "sigmoid", "tanh", "relu", "silu", "swish", "identity", "cos", "gaussian", "sine"]
ORIGINAL_SPELLINGS = {"Sin": "sinter", "Cos": "cos", "Sigmoid": "sigmoid", "Tanh": "tanh", "Relu": "relu",
                      "Silu": "silu", "Identity": "identity", "Swish": "swish", "Gaussian": "gaussian"}


@pytest.mark.parametrize("name", NAMES)
def test_value_matches_reference_formula(name):
    x = torch.linspace(-3, 3, 101, dtype=torch.float64)
    act = get_activation(name, 0.3, 2.0)
    torch.testing.assert_close(act(x), reference_activation(name, 0.3, 2.0)(x))


@pytest.mark.parametrize("name", NAMES)
def test_analytic_derivative_matches_autograd(name):
    x = torch.linspace(-3, 3, 101, dtype=torch.float64).requires_grad_()
    x = x[x.abs() > 1e-6].detach().requires_grad_()  # relu's kink
    act = get_activation(name, 0.3, 2.0)
    (auto,) = torch.autograd.grad(act(x).sum(), x)
    torch.testing.assert_close(act.value_and_derivative(x.detach())[1], auto)


@pytest.mark.parametrize("spelling", list(ORIGINAL_SPELLINGS))
def test_original_spellings(spelling):
    assert get_activation(spelling).name == ORIGINAL_SPELLINGS[spelling]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown activation 'Softplus'.*Valid names: cos, cosinter, gaussian"):
        get_activation("Softplus")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_sinter_parameters_rejected(bad):
    with pytest.raises(ValueError, match="sinter_amplitude"):
        get_activation("sinter", bad, 1.0)
    with pytest.raises(ValueError, match="sinter_frequency"):
        peft_loran.LoranConfig(sinter_frequency=bad)


@pytest.mark.parametrize("name", NAMES)
def test_fused_function_gradcheck_float64(name):
    torch.manual_seed(0)
    act = get_activation(name, 0.3, 2.0).centered()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    P1 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    P2 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 5, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    if name == "relu":  # keep away from the kink where finite differences disagree with any derivative
        with torch.no_grad():
            B.add_(0.05)
    if name == "cos":  # cos(1e4 x) needs stage inputs ~1e-4 for finite differences with eps 1e-6 to resolve it
        with torch.no_grad():
            B.mul_(1e-4)
            b1.mul_(1e-4)

    def fused(x, A, B, P1, b1, P2, bias):
        update = LF.LowRankUpdate.of(A, B, [(P1, b1), (P2, None)], act, 0.7, block_rows=4)
        return update.fused_matmul(x, x.dtype, weight=W, bias=bias)

    eps = 1e-9 if name == "cos" else 1e-6
    assert torch.autograd.gradcheck(fused, (x, A, B, P1, b1, P2, bias), eps=eps, atol=1e-5)

    def unfolded(x, A, B):
        return LF.LowRankUpdate.of(A, B, [(None, None)], act, 0.7, block_rows=5).fused_matmul(x, x.dtype)

    A5 = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    if name == "cos":
        with torch.no_grad():
            A5.mul_(1e-4)
    assert torch.autograd.gradcheck(unfolded, (x, A5, B), eps=eps, atol=1e-5)


def test_registered_activation_works_with_and_without_derivative():
    register_activation("softsign_test", lambda x: x / (1 + x.abs()))
    register_activation("cube_test", lambda x: x + 0.1 * x**3, derivative=lambda x: 1 + 0.3 * x**2)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_activation("cube_test", torch.tanh)
        # the derivatives written out here: softsign' = 1 / (1 + |x|)^2, cube' = 1 + 0.3 x^2
        written = {"softsign_test": lambda x: 1 / (1 + x.abs()) ** 2, "cube_test": lambda x: 1 + 0.3 * x**2}
        for name in ("softsign_test", "cube_test"):
            act = get_activation(name)
            x = torch.randn(7, dtype=torch.float64)
            g = torch.randn(7, dtype=torch.float64)
            torch.testing.assert_close(act.grad(x, g), g * written[name](x))
        config = peft_loran.LoranConfig(activation="Softsign_Test", target_modules=["lin"])
        assert config.activation == "softsign_test"
    finally:
        unregister_activation("softsign_test")
        unregister_activation("cube_test")
    with pytest.raises(ValueError, match="cannot be unregistered"):
        unregister_activation("sinter")


def test_docs_table_is_the_definitions_table():
    """docs/activations.md shows the table made from the definitions themselves, so the two cannot drift apart."""
    from pathlib import Path

    from peft_loran.activations import formula_table

    docs = (Path(__file__).resolve().parents[1] / "docs" / "activations.md").read_text()
    assert formula_table() in docs


def test_a_registered_activation_with_parameters_runs_on_the_compiled_kernels_like_a_builtin():
    """``f(x) = x + c x^3`` with its constant declared as a parameter: set per adapter, compiled, and equal to the
    plain reference in a training step."""
    from peft import inject_adapter_in_model

    from peft_loran import LoranConfig, kernels, set_kernel_compilation

    from .reference import naive_linear_output
    from .test_fused import One

    register_activation("cubic_test", lambda x, c: x + c * x**3, lambda x, c: 1 + 3 * c * x**2, params={"c": 0.1},
                        formula="x + c x^3")
    calls = []
    original = kernels.CompiledKernel._run
    try:
        set_kernel_compilation("1")
        kernels.CompiledKernel._run = lambda self, name, *args: calls.append(name) or original(self, name, *args)
        config = LoranConfig(target_modules=["layer"], activation="cubic_test", activation_params={"c": 0.7},
                             init_weights=False, r=4, loran_alpha=4)
        layer = inject_adapter_in_model(config, One(24, 20, conv=False)).layer.train()
        assert layer.loran_activation["default"].describe() == "x + c x^3, c = 0.7"
        x = torch.randn(3, 24, requires_grad=True)
        y = layer(x)
        A, B = layer.loran_A["default"], layer.loran_B["default"]
        grads = torch.autograd.grad(y.sum(), [x, A, B])
        base = layer.get_base_layer()
        ref = naive_linear_output(x, base.weight, base.bias, A, B, [], [], lambda z: z + 0.7 * z**3, 1.0)
        torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
        for g, r in zip(grads, torch.autograd.grad(ref.sum(), [x, A, B])):
            torch.testing.assert_close(g.double(), r.double(), atol=1e-5, rtol=1e-4)
        assert {"value", "value_and_grads"} <= set(calls) and not kernels.compile_failures()
        with pytest.raises(ValueError, match="activation_params.*does not have.*its parameters: c"):
            LoranConfig(activation="cubic_test", activation_params={"k": 1.0})
    finally:
        kernels.CompiledKernel._run = original
        set_kernel_compilation(None)
        unregister_activation("cubic_test")
