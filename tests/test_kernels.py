"""The compiled element-wise kernels (peft_loran.kernels) against the plain float64 reference, the fused layer
with the kernels switched on, and the fall-back to the eager kernels."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import inject_adapter_in_model

from peft_loran import LoranConfig, get_activation, kernels, register_activation, set_kernel_compilation, unregister_activation
from peft_loran import functional as LF

from .reference import activation, layer_factors, naive_linear_output
from .test_fused import One, check_fused_layer_against_reference

# (name, a, w): Sinter at the paper's setting and a strong one, plus activations with an offset (sigmoid: zero-centred)
# and the original's own swish / cos (its fixed 1e4 frequency: small factors, as at the paper's Sinter setting)
SETTINGS = [("sinter", 0.5, 3.0), ("sinter", 5e-5, 1e4), ("tanh", 0, 0), ("sigmoid", 0, 0), ("gaussian", 0, 0),
            ("cosinter", 0.5, 3.0), ("swish", 0, 0), ("cos", 0, 1e4)]

pytestmark = pytest.mark.usefixtures("on_device")  # conftest: --device / PEFT_LORAN_TEST_DEVICE


@pytest.fixture(autouse=True)
def compiled_kernels():
    set_kernel_compilation("1")  # every block size, so these small tensors use the compiled kernels
    yield
    set_kernel_compilation("auto")


def reference_value_and_derivative(name, a, w, B, A, centered):
    f = activation(name, a, w)
    z = (B.double() @ A.double()).requires_grad_(True)
    y = f(z) - (f(torch.zeros((), dtype=torch.float64)) if centered else 0)
    (d,) = torch.autograd.grad(y.sum(), z)
    return y.detach(), d


@pytest.mark.parametrize("rank", [1, 8, 12])  # the product formed inside the kernel (r <= 8) and as a GEMM
def test_kernels_equal_the_float64_reference(rank):
    torch.manual_seed(rank)
    rows, cols, scaling = 24, 40, 1.7
    # every setting in turn in one process: a kernel compiled for one setting must never serve another
    for name, a, w in SETTINGS:
        act = get_activation(name, a or 5e-5, w or 1e4)
        centered = act.value_at_zero() != 0
        act = act.centered() if centered else act
        # Sinter at w = 1e4: |BA| ~ 1e-3, as in training; the original's cos: |BA| ~ 1e-4, where float32 resolves it
        scale = 0.003 if name == "cos" else 0.03 if w == 1e4 else 0.5
        B, A = torch.randn(rows, rank) * scale, torch.randn(rank, cols) * scale
        base, grad_h = torch.randn(rows, cols), torch.randn(rows, cols)
        f_ref, d_ref = reference_value_and_derivative(name, a, w, B, A, centered)
        with torch.no_grad():
            value = kernels.value(act, base, B, A, scaling)
            update, grad = kernels.value_and_grad(act, None, B, A, scaling, grad_h, True)
            none, grad_only = kernels.value_and_grad(act, base, B, A, scaling, grad_h, False)
        assert none is None and kernels.kernel_compilation() == "1", f"{name}: compiled kernels were not used"
        torch.testing.assert_close(value.double(), base.double() + scaling * f_ref, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(update.double(), scaling * f_ref, atol=2e-6, rtol=1e-5)
        # f' is more sensitive to the float32 rounding of B A than f: cuBLAS sums the rank-12 product in another
        # order than the CPU's BLAS, and on an H200 one element of 960 was off by 2.3e-6 (where f' is near zero)
        for g in (grad, grad_only):
            torch.testing.assert_close(g.double(), grad_h.double() * d_ref, atol=5e-6, rtol=1e-5,
                                       msg=lambda m: f"{name}: {m}")


def test_kernels_are_not_used_where_autograd_is_wanted_or_layers_are_small(monkeypatch):
    act = get_activation("tanh")
    B, A = torch.randn(4, 2, requires_grad=True), torch.randn(2, 5)
    assert kernels.value(act, None, B, A, 1.0) is None  # grad enabled: the caller differentiates the eager ops
    set_kernel_compilation("auto")
    calls = []
    monkeypatch.setattr(kernels, "_run", lambda *args: calls.append(args[1]))
    layer = inject_adapter_in_model(LoranConfig(target_modules=["layer"], init_weights=False),
                                    One(256, 192, conv=False)).layer  # below AUTO_COMPILE_MIN_ELEMENTS
    layer.train()
    layer(torch.randn(3, 256)).sum().backward()
    with torch.no_grad():
        layer.eval()(torch.randn(3, 256))
    assert calls == []


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    in_f=st.integers(2, 24), out_f=st.integers(2, 24), r=st.integers(2, 12), act=st.sampled_from(["sinter", "tanh"]),
    block=st.one_of(st.none(), st.integers(2, 9)), conv=st.booleans(), dropout=st.sampled_from([0.0, 0.3]),
    tokens=st.integers(1, 7), seed=st.integers(0, 10_000),
)
def test_fused_layer_with_compiled_kernels_equals_reference(in_f, out_f, r, act, block, conv, dropout, tokens, seed):
    check_fused_layer_against_reference(in_f, out_f, r, act, "plain", block, conv, dropout, tokens, seed)


def test_large_layer_uses_the_kernels_in_auto_mode_and_matches_the_reference(monkeypatch, device):
    """A layer above the size threshold (lowered for this test) in the default mode: the training step equals the
    float64 reference. ``auto`` compiles on CPUs only (on a GPU the eager path was faster: docs/benchmarks.md)."""
    set_kernel_compilation("auto")
    monkeypatch.setattr(kernels, "AUTO_COMPILE_MIN_ELEMENTS", 256 * 192)
    torch.manual_seed(0)
    config = LoranConfig(target_modules=["layer"], r=8, loran_alpha=12, init_weights=False, sinter_amplitude=0.5,
                         sinter_frequency=3.0)  # scaling 1.5
    layer = inject_adapter_in_model(config, One(256, 192, conv=False)).layer  # 49,152 elements: at the threshold
    with torch.no_grad():
        layer.loran_B["default"].mul_(0.3)
    layer.train()
    x = torch.randn(2, 5, 256, requires_grad=True)
    calls = []
    original = kernels._run
    kernels._run = lambda *args: calls.append(args[1]) or original(*args)
    try:
        y = layer(x)
        grad = torch.randn_like(y)
        A, B, Ps, bs, s = layer_factors(layer)
        params = [x, A, B]
        got = torch.autograd.grad(y, params, grad)
    finally:
        kernels._run = original
    if device.type == "cpu":
        assert {"value", "value_and_grad"} <= set(calls)
    else:
        assert not calls, "auto mode compiled on a GPU"
    base = layer.get_base_layer()
    ref = naive_linear_output(x, base.weight, base.bias, A, B, Ps, bs, activation("sinter", 0.5, 3.0), s)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    for g, w in zip(got, torch.autograd.grad(ref, params, grad.double())):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-5, rtol=1e-4)


def test_a_failing_compiler_falls_back_to_the_eager_kernels_for_that_function_only(monkeypatch):
    from torch._inductor.exc import CppCompileError

    real_build = kernels._build

    def build(activation):
        if activation.name == "tanh":
            raise CppCompileError(["g++", "kernel.cpp"], "g++: fatal error: no input files\nsecond line of the reason")
        return real_build(activation)

    monkeypatch.setattr(kernels, "_build", build)
    monkeypatch.setattr(kernels, "_kernels", {})
    torch.manual_seed(0)
    layer = inject_adapter_in_model(LoranConfig(target_modules=["layer"], r=4, init_weights=False,
                                                activation="tanh"), One(12, 10, conv=False)).layer
    x = torch.randn(3, 12)
    with pytest.warns(RuntimeWarning, match="(?s)'tanh' failed.*no input files.*second line of the reason"):
        y = layer(x)
    assert kernels.kernel_compilation() == "1" and set(kernels.compile_failures()) == {"tanh"}
    A, B, Ps, bs, s = layer_factors(layer)
    base = layer.get_base_layer()
    ref = naive_linear_output(x, base.weight, base.bias, A, B, Ps, bs, activation("tanh"), s)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    # other activations keep their compiled kernels
    with torch.no_grad():
        assert kernels.value(get_activation("sigmoid"), None, torch.randn(4, 2), torch.randn(2, 5), 1.0) is not None


def test_errors_that_are_not_compile_failures_are_raised(monkeypatch):
    def build(activation):
        raise RuntimeError("a genuine bug, or out of memory")

    monkeypatch.setattr(kernels, "_build", build)
    monkeypatch.setattr(kernels, "_kernels", {})
    with torch.no_grad(), pytest.raises(RuntimeError, match="genuine bug"):
        kernels.value(get_activation("tanh"), None, torch.randn(4, 2), torch.randn(2, 5), 1.0)
    assert not kernels.compile_failures()


def test_mode_is_read_when_used_and_set_per_process(monkeypatch):
    set_kernel_compilation(None)
    monkeypatch.setenv("PEFT_LORAN_COMPILE", "0")
    assert kernels.kernel_compilation() == "0"
    monkeypatch.setenv("PEFT_LORAN_COMPILE", "1")
    assert kernels.kernel_compilation() == "1"
    monkeypatch.setenv("PEFT_LORAN_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="PEFT_LORAN_COMPILE='sometimes'"):
        kernels.kernel_compilation()
    set_kernel_compilation("auto")
    assert kernels.kernel_compilation() == "auto"


def test_one_kernel_serves_every_setting_without_touching_dynamo_config():
    import torch._dynamo.config as dynamo_config

    before = dict(dynamo_config.get_config_copy())
    torch.manual_seed(0)
    g = torch.randn(16, 40)
    for a, w in [(0.5, 3.0), (5e-5, 1e4), (0.3, 7.0)]:  # the settings that once shared a mis-cached kernel
        scale = 0.03 if w == 1e4 else 0.5  # |BA| ~ 1e-3 at w = 1e4, as in training (float32 resolves sin(w x))
        B, A = torch.randn(16, 4) * scale, torch.randn(4, 40) * scale
        act = get_activation("sinter", a, w)
        with torch.no_grad():
            _, grad = kernels.value_and_grad(act, None, B, A, 1.0, g, True)
        _, want = reference_value_and_derivative("sinter", a, w, B, A, False)
        torch.testing.assert_close(grad.double(), g.double() * want, atol=2e-5, rtol=1e-5)
    assert dict(dynamo_config.get_config_copy()) == before


def test_bad_mode_names_the_parameter():
    with pytest.raises(ValueError, match="`mode`"):
        set_kernel_compilation("sometimes")


def test_auto_mode_decides_by_shape_device_and_mode_only(monkeypatch):
    """auto: the compiled kernels serve layers of at least AUTO_COMPILE_MIN_ELEMENTS on a CPU with a compiler;
    no clock, no history of the process."""
    act = get_activation("sinter")
    cpu = torch.device("cpu")
    set_kernel_compilation("auto")
    big = kernels.AUTO_COMPILE_MIN_ELEMENTS
    has_compiler = kernels._auto_device(cpu)
    assert kernels.compiles(act, big // 1024, 1024, cpu) == has_compiler
    assert not kernels.compiles(act, big // 1024 - 1, 1024, cpu)
    assert not kernels.compiles(act, 4096, 4096, torch.device("meta"))  # accelerators: only on request
    assert not LF.uses_compiled_kernels(act, [(torch.zeros(3, 3), None)], 4096, 4096, cpu)  # chains stay eager
    set_kernel_compilation("0")
    assert not kernels.compiles(act, 4096, 4096, cpu)
    set_kernel_compilation("1")
    assert kernels.compiles(act, 2, 2, cpu)
    set_kernel_compilation("auto")
    register_activation("user_sq", lambda x: x * x, lambda x: 2 * x, overwrite=True)
    try:  # registered activations compile like the built-ins
        assert kernels.compiles(get_activation("user_sq"), 4096, 4096, cpu) == has_compiler
    finally:
        unregister_activation("user_sq")
