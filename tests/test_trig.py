"""The compiled CPU kernels' inline sine and cosine (peft_loran.trig) against float64 ``sin``/``cos``, eagerly and
compiled, over their whole range; and the kernels' guard: blocks whose arguments may leave that range are computed
with torch's sine (a broken guard would be off by up to 0.5 there, far outside the tolerance)."""

from __future__ import annotations

import math

import pytest
import torch

from peft_loran import get_activation, kernels, trig
from peft_loran import update as LF

from .test_kernels import compile_always  # noqa: F401  (a fixture: compilation mode 1 for the test)

pytestmark = pytest.mark.skipif(not kernels.can_compile("cpu"), reason="needs a C++ compiler for torch.compile")

#: 1.7 ulp of 1: the reduction's and the polynomial's roundings (measured: 1.2e-7)
ABS_TOL = 2e-7


def arguments() -> torch.Tensor:
    """float32 arguments over [-MAX_ARGUMENT, MAX_ARGUMENT]: a dense grid, the ends, every float32 next to the
    multiples of pi / 2 (where the reduction switches quadrant and the result's sign or size turns), small values."""
    limit = trig.MAX_ARGUMENT
    k = torch.arange(-math.floor(limit / (math.pi / 2)), math.floor(limit / (math.pi / 2)) + 1, dtype=torch.float64)
    near = (k * (math.pi / 2)).float()
    up, down = torch.full_like(near, math.inf), torch.full_like(near, -math.inf)
    near = torch.cat([near, torch.nextafter(near, up), torch.nextafter(near, down)])
    small = torch.logspace(-30, 0, 2001)
    grid = torch.linspace(-limit, limit, 3_000_001)
    return torch.cat([grid, near, small, -small, torch.tensor([0.0, limit, -limit])])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_inline_sine_and_cosine_match_float64_over_their_whole_range(compiled):
    t = arguments()
    for name, ours, reference in (("sin", trig.sin, torch.sin), ("cos", trig.cos, torch.cos)):
        fn = torch.compile(ours, dynamic=True) if compiled else ours
        got, want = fn(t).double(), reference(t.double())
        error = (got - want).abs()
        worst = int(error.argmax())
        assert error.max() <= ABS_TOL, (f"{name}({t[worst].item()!r}) = {got[worst].item()!r}, "
                                        f"want {want[worst].item()!r}")
        # where the value is small (near a zero), the error is relative: within 2 ulp of the value
        ulp = torch.finfo(torch.float32).eps * want.abs()
        small = want.abs() < 1e-3
        assert (error[small] <= 2 * ulp[small] + 1e-45).all(), name


def test_the_mode_replaces_sine_and_cosine_of_one_tensor_only_inside_it():
    t = torch.linspace(-100, 100, 1001)
    with trig.VectorTrig():
        inside = (torch.sin(t), t.cos())
        out = torch.empty_like(t)
        torch.sin(t, out=out)  # not a plain call: torch's
        t64 = t.double().sin()  # float64: torch's, to float64's accuracy
    assert torch.equal(inside[0], trig.sin(t)) and torch.equal(inside[1], trig.cos(t))
    assert torch.equal(out, torch.sin(t)) and torch.equal(torch.sin(t), t.sin())
    assert torch.equal(t64, t.double().sin())
    assert not torch.equal(inside[0], torch.sin(t))  # a different algorithm: the mode did act


def spy_on_compiled(monkeypatch, name: str) -> list:
    """Each compiled kernel call's ``vector_trig`` argument for the activation ``name``, in order."""
    seen = []
    f = get_activation(name).definition.function
    if f not in kernels._compiled:
        kernels._compiled[f] = kernels._build(get_activation(name))
    for kernel, compiled in list(kernels._compiled[f].items()):
        def spy(B_rows, A, vector_trig, *rest, _compiled=compiled):
            seen.append(vector_trig)
            return _compiled(B_rows, A, vector_trig, *rest)
        monkeypatch.setitem(kernels._compiled[f], kernel, spy)
    return seen


@pytest.fixture
def compiled_calls(monkeypatch, compile_always):
    """Each compiled Sinter kernel call's ``vector_trig`` argument, in order."""
    return spy_on_compiled(monkeypatch, "sinter")


@pytest.mark.parametrize("w, inline", [(4.0, True), (2.0**20, False), (2.0**28, False)])
def test_the_kernels_use_the_inline_sine_only_where_the_arguments_are_bounded_within_its_range(
        compiled_calls, w, inline):
    """``|w B A|`` up to 4 (inline), about 1e6 and 3e8 (beyond the range; at 3e8 the inline sine is unbounded, so a
    broken guard fails the comparison): value and gradients equal the float64 reference either way. The factors
    are multiples of 1/16 and ``w`` a power of two, so ``w B A`` is exact in float32 in any order of summation (with
    or without FMAs) and the reference's sine is of the very argument the kernel forms."""
    torch.manual_seed(0)
    a, scaling, rank = 0.5, 1.3, 4
    B, A = torch.randint(-8, 9, (32, rank)) / 16, torch.randint(-8, 9, (rank, 48)) / 16
    base, grad_h = torch.randn(32, 48), torch.randn(32, 48)
    update = LF.LowRankUpdate.of(A, B, [(None, None)], get_activation("sinter", a, w), scaling)
    plan = update.plan(autograd=False)
    with torch.no_grad():
        value = plan.kernel.value(B, A, update.stages, update.activation, scaling, base, torch.float32)
        _, (dB, dA, _, _) = plan.kernel.value_and_grads(B, A, update.stages, update.activation, scaling, None,
                                                       torch.float32, grad_h, True)
    assert compiled_calls == [inline, inline]
    assert not kernels.compile_failures(), kernels.compile_failures()
    z = B.double() @ A.double()
    t = z * w
    f, d = z + a * z * torch.sin(t), 1 + a * (torch.sin(t) + t * torch.cos(t))
    dz = grad_h.double() * d * scaling
    torch.testing.assert_close(value.double(), base.double() + scaling * f, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(dB.double(), dz @ A.double().T, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(dA.double(), B.double().T @ dz, atol=5e-5, rtol=1e-4)


def test_inside_the_kernel_the_inline_sine_is_used_and_holds_at_large_arguments(monkeypatch, compile_always):
    """Sine-LoRA (``f = a sin(w x)``, so the sine is the whole update) with ``|w B A|`` up to about 16000, within the
    range: the inline graph's value equals the float64 reference (exact float32 arguments, as above), and on random
    factors it differs from the graph with torch's sine in some element by no more than the two sines' errors (so
    the mode did change what the kernel computes). Dynamo's caches are emptied first: after the rest of the suite the
    kernels' shared recompile budget may be spent, and torch then runs their Python eagerly, with torch's sine."""
    torch._dynamo.reset()
    calls = spy_on_compiled(monkeypatch, "sine")
    a, w, scaling, rank = 0.7, 2.0**14, 1.3, 4
    act = get_activation("sine", a, w)
    torch.manual_seed(1)
    exact = (torch.randint(-8, 9, (32, rank)) / 16, torch.randint(-8, 9, (rank, 48)) / 16)
    random = (torch.randn(32, rank) * 0.3, torch.randn(rank, 48) * 0.3)
    values = []
    for B, A in (exact, random):
        update = LF.LowRankUpdate.of(A, B, [(None, None)], act, scaling)
        with torch.no_grad():
            inline = update.plan(autograd=False).kernel.value(B, A, update.stages, act, scaling, None, torch.float32)
            with_torch_sine = kernels._compiled[act.definition.function]["value"](B, A, False, None, scaling, 0.0,
                                                                                 torch.float32, *act.values)
        assert (B.double() @ A.double() * w).abs().max() > 5000
        values.append((inline, with_torch_sine))
    assert calls == [True, False, True, False] and not kernels.compile_failures()
    z = exact[0].double() @ exact[1].double()
    for value in values[0]:
        torch.testing.assert_close(value.double(), scaling * a * torch.sin(z * w), atol=1e-6, rtol=1e-5)
    inline, with_torch_sine = values[1]
    assert not torch.equal(inline, with_torch_sine)
    torch.testing.assert_close(inline, with_torch_sine, atol=scaling * a * 2e-7, rtol=0)
