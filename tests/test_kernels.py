"""The block kernels (peft_loran.kernels): the compiled kernel against the plain float64 reference, the fused layer
with it, when it is chosen, and the fall-back to the eager kernel when compiling fails. Each test that expects the
compiled kernel checks that it ran and that no compile failure was recorded (a silent fall-back would pass the
numbers but not these checks)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import inject_adapter_in_model

from peft_loran import LoranConfig, get_activation, kernels, register_activation, set_kernel_compilation
from peft_loran import update as LF
from peft_loran import unregister_activation

from .conftest import read_environment_again
from .reference import activation, layer_factors, naive_linear_output
from .test_fused import One, check_fused_layer_against_reference

# (name, a, w): Sinter at the paper's setting and a strong one, plus activations with an offset (sigmoid: zero-centred)
# and the original's own swish / cos (its fixed 1e4 frequency: small factors, as at the paper's Sinter setting)
SETTINGS = [("sinter", 0.5, 3.0), ("sinter", 5e-5, 1e4), ("tanh", 0, 0), ("sigmoid", 0, 0), ("gaussian", 0, 0),
            ("cosinter", 0.5, 3.0), ("swish", 0, 0), ("cos", 0, 1e4)]

pytestmark = pytest.mark.usefixtures("on_device")  # conftest: --device / PEFT_LORAN_TEST_DEVICE


@pytest.fixture
def compile_always():
    """Mode 1 for this test (every block size, so these small tensors use the compiled kernel), then the
    environment's mode again: nothing leaks into later tests."""
    set_kernel_compilation("1")
    yield
    set_kernel_compilation(None)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The names of the compiled kernels that ran (value, value_and_grads, grads_only)."""
    calls = []
    original = kernels.CompiledKernel._run

    def counting(self, name, *args):
        calls.append(name)
        return original(self, name, *args)

    monkeypatch.setattr(kernels.CompiledKernel, "_run", counting)
    return calls


def reference_value_and_derivative(name, a, w, B, A, centered):
    f = activation(name, a, w)
    z = (B.double() @ A.double()).requires_grad_(True)
    y = f(z) - (f(torch.zeros((), dtype=torch.float64)) if centered else 0)
    (d,) = torch.autograd.grad(y.sum(), z)
    return y.detach(), d


@pytest.mark.parametrize("rank", [1, 8, 12])  # the product formed inside the kernel (r <= 8) and as a GEMM
def test_compiled_kernel_equals_the_float64_reference(rank, compile_always, kernel_calls):
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
        update = LF.LowRankUpdate.of(A, B, [(None, None)], act, scaling)
        plan = update.plan(autograd=False)
        assert isinstance(plan.kernel, kernels.CompiledKernel), f"{name}: the plan did not choose the compiled kernel"
        f_ref, d_ref = reference_value_and_derivative(name, a, w, B, A, centered)
        dz = grad_h.double() * d_ref * scaling
        factors = (B, A, update.stages, act, scaling)
        with torch.no_grad():
            value = plan.kernel.value(*factors, base, torch.float32)
            half = plan.kernel.value(*factors, None, torch.bfloat16)
            update_rows, (dB, dA, _, _) = plan.kernel.value_and_grads(*factors, None, torch.float32, grad_h.clone(),
                                                                      True)
            none, (dB2, dA2, _, _) = plan.kernel.value_and_grads(*factors, base, torch.float32, grad_h.clone(), False)
        assert none is None and half.dtype == torch.bfloat16
        assert not kernels.compile_failures(), kernels.compile_failures()
        torch.testing.assert_close(value.double(), base.double() + scaling * f_ref, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(update_rows.double(), scaling * f_ref, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(half.double(), scaling * f_ref, atol=1e-2, rtol=1e-2)
        # f' is more sensitive to the float32 rounding of B A than f: cuBLAS sums the rank-12 product in another
        # order than the CPU's BLAS, and on an H200 one element of 960 was off by 2.3e-6 (where f' is near zero)
        for grad_B, grad_A in ((dB, dA), (dB2, dA2)):
            torch.testing.assert_close(grad_B.double(), dz @ A.double().T, atol=5e-5, rtol=1e-4,
                                       msg=lambda m: f"{name}: {m}")
            torch.testing.assert_close(grad_A.double(), B.double().T @ dz, atol=5e-5, rtol=1e-4,
                                       msg=lambda m: f"{name}: {m}")
    assert {"value", "value_and_grads", "grads_only"} <= set(kernel_calls)


def test_the_eager_kernel_where_autograd_must_see_the_operations_or_layers_are_small(kernel_calls):
    act = get_activation("tanh")
    B, A = torch.randn(4, 2, requires_grad=True), torch.randn(2, 5)
    update = LF.LowRankUpdate.of(A, B, [(None, None)], act, 1.0)
    set_kernel_compilation("1")
    try:
        assert update.plan().kernel is kernels.EAGER  # grad enabled and B requires it: autograd differentiates eager ops
        assert update.plan(autograd=False).compiled
        set_kernel_compilation("auto")
        layer = inject_adapter_in_model(LoranConfig(target_modules=["layer"], init_weights=False),
                                        One(256, 192, conv=False)).layer  # below AUTO_COMPILE_MIN_ELEMENTS
        layer.train()
        layer(torch.randn(3, 256)).sum().backward()
        with torch.no_grad():
            layer.eval()(torch.randn(3, 256))
    finally:
        set_kernel_compilation(None)
    assert kernel_calls == []


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    in_f=st.integers(2, 24), out_f=st.integers(2, 24), r=st.integers(2, 12), act=st.sampled_from(["sinter", "tanh"]),
    block=st.one_of(st.none(), st.integers(2, 9)), conv=st.booleans(), dropout=st.sampled_from([0.0, 0.3]),
    tokens=st.integers(1, 7), seed=st.integers(0, 10_000),
)
def test_fused_layer_with_compiled_kernels_equals_reference(in_f, out_f, r, act, block, conv, dropout, tokens, seed):
    set_kernel_compilation("1")
    try:
        check_fused_layer_against_reference(in_f, out_f, r, act, "plain", block, conv, dropout, tokens, seed)
    finally:
        set_kernel_compilation(None)
    assert not kernels.compile_failures()


def test_large_layer_uses_the_compiled_kernel_in_auto_mode_and_matches_the_reference(monkeypatch, device,
                                                                                      kernel_calls):
    """A layer above the size threshold (lowered for this test) in the default mode: the training step equals the
    float64 reference, through the compiled kernel (the CPU plan above the threshold; the accelerator plan always)."""
    monkeypatch.delenv("PEFT_LORAN_COMPILE", raising=False)
    read_environment_again()
    monkeypatch.setattr(kernels, "AUTO_COMPILE_MIN_ELEMENTS", 256 * 192)
    torch.manual_seed(0)
    config = LoranConfig(target_modules=["layer"], r=8, loran_alpha=12, init_weights=False, sinter_amplitude=0.5,
                         sinter_frequency=3.0)  # scaling 1.5
    layer = inject_adapter_in_model(config, One(256, 192, conv=False)).layer  # 49,152 elements: at the threshold
    with torch.no_grad():
        layer.loran_B["default"].mul_(0.3)
    layer.train()
    x = torch.randn(2, 5, 256, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    A, B, Ps, bs, s = layer_factors(layer)
    params = [x, A, B]
    got = torch.autograd.grad(y, params, grad)
    if kernels.can_compile(device.type):
        assert {"value", "value_and_grads"} <= set(kernel_calls) and not kernels.compile_failures()
    base = layer.get_base_layer()
    ref = naive_linear_output(x, base.weight, base.bias, A, B, Ps, bs, activation("sinter", 0.5, 3.0), s)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    for g, w in zip(got, torch.autograd.grad(ref, params, grad.double())):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-5, rtol=1e-4)


def test_a_failing_compiler_falls_back_to_the_eager_kernel_for_that_function_only(monkeypatch, compile_always):
    from torch._inductor.exc import CppCompileError

    real_build = kernels._build

    def build(act):
        if act.name == "tanh":
            raise CppCompileError(["g++", "kernel.cpp"], "g++: fatal error: no input files\nsecond line of the reason")
        return real_build(act)

    monkeypatch.setattr(kernels, "_build", build)
    monkeypatch.setattr(kernels, "_compiled", {})
    torch.manual_seed(0)
    layer = inject_adapter_in_model(LoranConfig(target_modules=["layer"], r=4, init_weights=False,
                                                activation="tanh", block_rows=4), One(12, 10, conv=False)).layer
    x = torch.randn(3, 12)
    with pytest.warns(RuntimeWarning, match="(?s)'tanh' failed.*no input files.*second line of the reason"):
        y = layer(x)
    assert kernels.kernel_compilation() == "1" and set(kernels.compile_failures()) == {"tanh"}
    assert layer.low_rank_update("default").plan(autograd=False).kernel is kernels.EAGER  # the rest of the process
    A, B, Ps, bs, s = layer_factors(layer)
    base = layer.get_base_layer()
    ref = naive_linear_output(x, base.weight, base.bias, A, B, Ps, bs, activation("tanh"), s)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    # other activations keep their compiled kernels
    sigmoid = LF.LowRankUpdate.of(torch.randn(2, 5), torch.randn(4, 2), [(None, None)], get_activation("sigmoid"), 1.0)
    assert sigmoid.plan(autograd=False).compiled


def test_errors_that_are_not_compile_failures_are_raised(monkeypatch, compile_always):
    def build(act):
        raise RuntimeError("a genuine bug, or out of memory")

    monkeypatch.setattr(kernels, "_build", build)
    monkeypatch.setattr(kernels, "_compiled", {})
    update = LF.LowRankUpdate.of(torch.randn(2, 5), torch.randn(4, 2), [(None, None)], get_activation("tanh"), 1.0)
    with torch.no_grad(), pytest.raises(RuntimeError, match="genuine bug"):
        update.dense()
    assert not kernels.compile_failures()


def test_mode_is_read_when_used_and_set_per_process(monkeypatch):
    monkeypatch.setenv("PEFT_LORAN_COMPILE", "0")
    read_environment_again()
    assert kernels.kernel_compilation() == "0"
    monkeypatch.setenv("PEFT_LORAN_COMPILE", "1")
    read_environment_again()
    assert kernels.kernel_compilation() == "1"
    monkeypatch.setenv("PEFT_LORAN_COMPILE", "sometimes")
    read_environment_again()
    with pytest.raises(ValueError, match="PEFT_LORAN_COMPILE='sometimes'"):
        kernels.kernel_compilation()
    set_kernel_compilation("auto")
    try:
        assert kernels.kernel_compilation() == "auto"
    finally:
        set_kernel_compilation(None)


def test_a_kernel_compiled_for_one_setting_never_serves_another_and_dynamo_config_is_restored(compile_always):
    import torch._dynamo.config as dynamo_config

    before = dict(dynamo_config.get_config_copy())
    torch.manual_seed(0)
    g = torch.randn(16, 40)
    for a, w in [(0.5, 3.0), (5e-5, 1e4), (0.3, 7.0)]:  # the settings that once shared a mis-cached kernel
        scale = 0.03 if w == 1e4 else 0.5  # |BA| ~ 1e-3 at w = 1e4, as in training (float32 resolves sin(w x))
        B, A = torch.randn(16, 4) * scale, torch.randn(4, 40) * scale
        update = LF.LowRankUpdate.of(A, B, [(None, None)], get_activation("sinter", a, w), 1.0)
        with torch.no_grad():
            _, (grad_B, _, _, _) = update.plan(autograd=False).kernel.value_and_grads(
                B, A, update.stages, update.activation, 1.0, None, torch.float32, g.clone(), False)
        _, want = reference_value_and_derivative("sinter", a, w, B, A, False)
        torch.testing.assert_close(grad_B.double(), (g.double() * want) @ A.double().T, atol=2e-5, rtol=1e-5)
    assert dict(dynamo_config.get_config_copy()) == before and not kernels.compile_failures()


def test_bad_mode_names_the_parameter():
    with pytest.raises(ValueError, match="`mode`"):
        set_kernel_compilation("sometimes")


def test_the_kernel_is_chosen_by_shape_device_target_and_mode_only(monkeypatch):
    """auto: the CPU plan compiles updates of at least AUTO_COMPILE_MIN_ELEMENTS on a CPU with a compiler, the
    accelerator plan whatever the size; chains and autograd stay eager. No clock, no history of the process."""
    act = get_activation("sinter")
    cpu = torch.device("cpu")
    monkeypatch.delenv("PEFT_LORAN_COMPILE", raising=False)
    read_environment_again()
    big = kernels.AUTO_COMPILE_MIN_ELEMENTS
    has_compiler = kernels.can_compile("cpu")

    def chosen(rows, cols, device=cpu, target="cpu", plain=True, autograd=False, activation=act):
        return kernels.choose_kernel(activation, plain, rows * cols, device, target, autograd) is not kernels.EAGER

    assert chosen(big // 1024, 1024) == has_compiler and not chosen(big // 1024 - 1, 1024)
    assert chosen(8, 8, target="accelerator") == has_compiler  # the accelerator plan: one pass whatever the size
    assert not chosen(4096, 4096, device=torch.device("meta"))  # no backend
    assert not chosen(4096, 4096, plain=False) and not chosen(4096, 4096, autograd=True)
    monkeypatch.setenv("PEFT_LORAN_COMPILE", "0")
    read_environment_again()
    assert not chosen(4096, 4096)
    monkeypatch.setenv("PEFT_LORAN_COMPILE", "1")
    read_environment_again()
    assert chosen(2, 2)
    monkeypatch.setenv("PEFT_LORAN_COMPILE", "auto")
    read_environment_again()
    register_activation("user_sq", lambda x: x * x, lambda x: 2 * x, overwrite=True)
    try:  # registered activations compile like the built-ins
        assert chosen(4096, 4096, activation=get_activation("user_sq")) == has_compiler
    finally:
        unregister_activation("user_sq")
