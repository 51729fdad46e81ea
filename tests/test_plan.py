"""One plan per call: the same inputs give the same plan and the same bits whatever ran before; the accelerator plan
(forced on this CPU) computes a layer in as few blocks as its budget allows, gives the reference's numbers, and
dispatches a number of operators that does not grow with the layer's width; mixed batches equal each adapter alone."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model, inject_adapter_in_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from peft_loran import LoranConfig, get_activation, kernels
from peft_loran import plan as plans
from peft_loran import update as LF

from .conftest import tiny_gpt2, read_environment_again
from .reference import activation, layer_factors, naive_linear_output
from .test_fused import One


def update_of(rows: int, cols: int, rank: int = 4, name: str = "sinter", seed: int = 0) -> LF.LowRankUpdate:
    torch.manual_seed(seed)
    return LF.LowRankUpdate.of(torch.randn(rank, cols) * 0.1, torch.randn(rows, rank) * 0.1, [(None, None)],
                            get_activation(name, 0.5, 3.0), 1.5)


def test_the_same_inputs_get_the_same_plan_and_bits_whatever_ran_before(monkeypatch):
    monkeypatch.setattr(kernels, "AUTO_COMPILE_MIN_ELEMENTS", 64 * 96)  # so `auto` compiles this small update
    update = update_of(96, 64)
    plan = update.plan(autograd=False)
    with torch.no_grad():
        before = update.dense(plan=plan).clone()
    # other work in the same process: other shapes, other activations compiled, autograd, another target
    for rows, cols, name in ((32, 48, "tanh"), (200, 64, "sinter"), (96, 64, "gaussian")):
        other = update_of(rows, cols, name=name, seed=1)
        with torch.no_grad():
            other.dense()
        other.plan(target="accelerator")
    with torch.enable_grad():
        update_of(96, 64).with_tensors([t.requires_grad_() for t in update_of(96, 64).tensors()[:2]]).dense()
    again = update.plan(autograd=False)
    assert again == plan and again.compiled == kernels.can_compile("cpu")
    with torch.no_grad():
        assert torch.equal(update.dense(plan=again), before)


def test_the_accelerator_plan_uses_the_fewest_equal_blocks_its_budget_allows(monkeypatch):
    monkeypatch.setenv("PEFT_LORAN_PLAN", "accelerator")
    read_environment_again()
    cases = {(4096, 4096): 4096, (11008, 4096): 2752, (4096, 11008): 1024, (14336, 4096): 3584}
    for (rows, cols), height in cases.items():
        update = LF.LowRankUpdate.of(torch.zeros(2, cols), torch.zeros(rows, 2), [(None, None)],
                                  get_activation("sinter"), 1.0)
        plan = update.plan(autograd=False)
        assert plan.target == "accelerator" and plan.block_rows == height, (rows, cols, plan)
        ranges = plan.ranges(rows)
        assert len({i1 - i0 for i0, i1 in ranges}) == 1  # one block shape per layer
        assert height * cols <= plans.ACCELERATOR_BLOCK_ELEMENTS or len(ranges) == 1
    small = LF.LowRankUpdate.of(torch.zeros(2, 4096), torch.zeros(4096, 2), [(None, None)], get_activation("sinter"), 1.0)
    assert small.plan(budget=2**20).block_rows == 256  # a stated budget: 16 blocks
    monkeypatch.setenv("PEFT_LORAN_PLAN", "sometimes")
    read_environment_again()
    with pytest.raises(ValueError, match="PEFT_LORAN_PLAN='sometimes'"):
        small.plan()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("conv", [False, True])
def test_a_training_step_on_the_accelerator_plan_equals_the_reference(monkeypatch, dropout, conv):
    monkeypatch.setenv("PEFT_LORAN_PLAN", "accelerator")
    read_environment_again()
    torch.manual_seed(0)
    config = LoranConfig(target_modules=["layer"], r=6, loran_alpha=9, init_weights=False, sinter_amplitude=0.5,
                         sinter_frequency=3.0, loran_dropout=dropout)
    layer = inject_adapter_in_model(config, One(40, 56, conv=conv)).layer.train()
    plan = layer.low_rank_update("default").plan(autograd=False)
    assert plan.ranges(56) == [(0, 56)] and plan.compiled == kernels.can_compile("cpu")
    x = torch.randn(3, 5, 40, requires_grad=True)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    xd = nn.functional.dropout(x, dropout, training=True) if dropout else x
    A, B, Ps, bs, s = layer_factors(layer)
    base = layer.get_base_layer()
    weight = base.weight.T if conv else base.weight
    ref = naive_linear_output(xd, torch.zeros_like(weight), None, A, B, Ps, bs, activation("sinter", 0.5, 3.0), s)
    ref = ref + x.double() @ weight.double().T + base.bias.double()
    grad = torch.randn_like(y)
    params = [x, A, B]
    got = torch.autograd.grad(y, params, grad)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    for g, w in zip(got, torch.autograd.grad(ref, params, grad.double())):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-5, rtol=1e-4)
    assert not kernels.compile_failures()


class CountOps(TorchDispatchMode):
    """Every operator dispatched while active (a proxy for kernel launches on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(width: int, method: str, rank: int = 8, tokens: int = 64) -> int:
    """Operators of one forward + backward of one adapted ``width x width`` linear layer (eager kernels: under a
    dispatch mode the compiled kernel would run eagerly anyway, so this counts its operations one by one)."""
    torch.manual_seed(0)
    base = nn.Linear(width, width)
    base.requires_grad_(False)
    x = torch.randn(tokens, width)
    if method == "naive":
        A = torch.randn(rank, width, requires_grad=True)
        B = torch.zeros(width, rank, requires_grad=True)
        f = get_activation("sinter")
        with CountOps() as counter:
            y = base(x) + x @ (2.0 * f(B @ A)).T
            (y * y).mean().backward()
        return counter.count
    layer = inject_adapter_in_model(LoranConfig(target_modules=["layer"], r=rank), One(width, width, conv=False)).layer
    layer.train()
    with CountOps() as counter:
        y = layer(x)
        (y * y).mean().backward()
    return counter.count


def test_the_accelerator_plan_s_operator_count_does_not_grow_with_the_width(monkeypatch):
    monkeypatch.setenv("PEFT_LORAN_COMPILE", "0")
    read_environment_again()
    naive = ops_per_step(1024, "naive")
    cpu = {w: ops_per_step(w, "loran") for w in (256, 4096)}
    monkeypatch.setenv("PEFT_LORAN_PLAN", "accelerator")
    read_environment_again()
    accelerator = {w: ops_per_step(w, "loran") for w in (256, 4096)}
    assert cpu[4096] > cpu[256]  # the CPU plan: 8 MiB blocks, more of them on wider layers
    assert accelerator[4096] == accelerator[256] <= 2 * naive, (accelerator, naive)


# ------------------------------------------------------------------------------------------------ mixed batches
def two_adapters(model, targets):
    first = LoranConfig(target_modules=targets, r=4, loran_alpha=8, init_weights=False, sinter_amplitude=0.5,
                        sinter_frequency=3.0)
    second = LoranConfig(target_modules=targets, r=7, loran_alpha=3, init_weights=False, activation="tanh",
                         loran_dropout=0.1)
    peft_model = get_peft_model(model, first, adapter_name="one")
    peft_model.add_adapter("two", second)
    return peft_model.eval()


@pytest.mark.parametrize("targets", [["c_attn", "c_proj"], ["wte"], ["c_fc", "wte"]])  # Conv1D, Embedding, both
def test_a_mixed_batch_gives_each_adapter_s_rows_what_it_gives_alone(targets):
    """Two levels. Each adapted layer, given the same input rows, computes in a mixed batch exactly what the adapter
    alone computes (rtol = atol = 0: the same inputs through the same plan, every operation the code's own). The whole
    model's logits agree to float32's default tolerance of ``assert_close`` (rtol 1.3e-6, atol 1e-5): its other layers
    (attention, layer norms, the head) see the rows in batches of another size, and the BLAS may pick other kernels for
    them (on an AVX2 EPYC the base rows differed by up to 6e-8), which no code of ours controls."""
    from peft_loran.layer import LoranLayer

    model = two_adapters(tiny_gpt2(), targets)
    ids = torch.randint(0, 101, (5, 9), generator=torch.Generator().manual_seed(0))
    names = ["one", "two", "__base__", "two", "one"]
    seen = []
    hooks = [m.register_forward_hook(lambda m, args, kwargs, out: seen.append((m, args[0], out)), with_kwargs=True)
             for m in model.modules() if isinstance(m, LoranLayer)]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for hook in hooks:
            hook.remove()
        assert len(seen) == len(hooks) > 0
        for name in ("one", "two", "__base__"):
            rows = [i for i, n in enumerate(names) if n == name]
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=ids[rows]).logits
                    layer_outputs = [(layer(x[rows]), out[rows]) for layer, x, out in seen]
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[rows]).logits
                layer_outputs = [(layer(x[rows]), out[rows]) for layer, x, out in seen]
            for own, in_mixed in layer_outputs:
                torch.testing.assert_close(in_mixed, own, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
            torch.testing.assert_close(mixed[rows], alone, msg=lambda m: f"{name}: {m}")


def test_a_mixed_batch_on_linear_layers_with_different_ranks_and_activations():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(12, 20), nn.Linear(20, 6)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    torch.manual_seed(0)
    model = two_adapters(MLP(), ["up", "down"])
    x = torch.randn(6, 12)
    names = ["two", "one", "one", "__base__", "two", "two"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        for name in ("one", "two"):
            rows = [i for i, n in enumerate(names) if n == name]
            model.set_adapter(name)
            torch.testing.assert_close(mixed[rows], model(x[rows]), rtol=0, atol=0)
