"""The memory-lean fused path: equals the plain reference everywhere, saves no dense (out x in) tensor, and the
eval cache never serves a stale update."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import get_peft_model, inject_adapter_in_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_loran import LoranConfig, get_activation, kernels, set_eval_cache
from peft_loran import update as LF

from .conftest import tiny_llama, read_environment_again
from .reference import activation, layer_factors, naive_update, well_conditioned

ACTS = ["sinter", "cosinter", "sigmoid", "tanh", "relu", "silu", "swish", "identity", "cos", "gaussian"]


class One(nn.Module):
    def __init__(self, in_f, out_f, conv):
        super().__init__()
        self.layer = Conv1D(out_f, in_f) if conv else nn.Linear(in_f, out_f)
        if conv:
            nn.init.normal_(self.layer.weight, std=0.3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    in_f=st.integers(1, 24), out_f=st.integers(1, 24), r=st.integers(1, 30), act=st.sampled_from(ACTS),
    chain=st.sampled_from(["plain", "P", "Pb2", "b"]), block=st.one_of(st.none(), st.integers(1, 9)),
    conv=st.booleans(), dropout=st.sampled_from([0.0, 0.3]), tokens=st.integers(1, 7), seed=st.integers(0, 10_000),
)
def test_fused_equals_reference(in_f, out_f, r, act, chain, block, conv, dropout, tokens, seed):
    check_fused_layer_against_reference(in_f, out_f, r, act, chain, block, conv, dropout, tokens, seed)


def check_fused_layer_against_reference(in_f, out_f, r, act, chain, block, conv, dropout, tokens, seed):
    """One adapted layer's output and gradients (input, A, B, P, b) against the plain float64 reference."""
    torch.manual_seed(seed)
    chains = {"plain": {}, "P": dict(chain_dims=[5], use_P=True),
              "Pb2": dict(chain_dims=[3, 4], use_P=True, use_b=True), "b": dict(use_b=True)}
    config = LoranConfig(target_modules=["layer"], r=r, loran_alpha=2 * r, activation=act, init_weights=False,
                         sinter_amplitude=0.5, sinter_frequency=3.0, loran_dropout=dropout, block_rows=block,
                         **chains[chain])
    model = inject_adapter_in_model(config, One(in_f, out_f, conv))
    layer = model.layer
    well_conditioned(layer, act)
    layer.train()
    x = torch.randn(2, tokens, in_f, requires_grad=True)
    torch.manual_seed(seed + 1)
    y = layer(x)
    torch.manual_seed(seed + 1)
    xd = nn.functional.dropout(x, dropout, training=True) if dropout else x
    A, B, Ps, bs, s = layer_factors(layer)
    D = naive_update(A, B, Ps, bs, activation(act, 0.5, 3.0), s)
    base = layer.get_base_layer()
    W = base.weight.T if conv else base.weight
    ref = x.double() @ W.double().T + base.bias.double() + xd.double() @ D.T
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(ref)
    params = [x, A, B, *Ps, *bs]
    for g, w in zip(torch.autograd.grad(y.double(), params, grad), torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("chain", [{}, dict(chain_dims=[16], use_P=True, use_b=True)])
def test_no_dense_tensor_is_saved_for_backward(dropout, chain):
    """Everything autograd keeps for the adapted layer is smaller than one (out x in) matrix."""
    in_f, out_f = 96, 80
    config = LoranConfig(target_modules=["layer"], r=4, init_weights=False, loran_dropout=dropout, **chain)
    layer = inject_adapter_in_model(config, One(in_f, out_f, conv=False)).layer
    layer.train()
    x = torch.randn(3, in_f, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    weight_storage = layer.get_base_layer().weight.untyped_storage().data_ptr()
    dense = [tuple(t.shape) for t in saved
             if t.numel() >= out_f * in_f and t.untyped_storage().data_ptr() != weight_storage]
    assert not dense, f"dense tensors saved for backward: {dense}"
    y.sum().backward()
    assert layer.loran_A["default"].grad is not None


def test_weight_sized_transients_are_bounded_by_block_rows(monkeypatch):
    """Every dense tensor the fused forward and backward build is one block: watch the blocks actually built."""
    built = []
    original = kernels.block_update

    def watched(base_rows, B_rows, *args, **kwargs):
        out = original(base_rows, B_rows, *args, **kwargs)
        built.append(tuple(out[0].shape))
        return out

    monkeypatch.setattr(kernels, "block_update", watched)
    torch.manual_seed(0)
    layer = inject_adapter_in_model(LoranConfig(target_modules=["layer"], r=4, loran_alpha=6, init_weights=False,
                                                sinter_amplitude=0.5, sinter_frequency=3.0, block_rows=7),
                                    One(64, 100, conv=False)).layer
    layer.train()
    x = torch.randn(3, 64, requires_grad=True)
    y = layer(x)
    forward_blocks = list(built)
    y.sum().backward()
    assert forward_blocks and all(rows <= 7 and cols == 64 for rows, cols in built)
    assert sum(rows for rows, _ in forward_blocks) == 100  # every output row built once, in blocks of <= 7
    assert len(built) == 2 * len(forward_blocks)  # backward rebuilds each block once
    A, B, Ps, bs, s = layer_factors(layer)
    ref = x.double() @ layer.get_base_layer().weight.double().T + layer.get_base_layer().bias.double() + \
        x.double() @ naive_update(A, B, Ps, bs, activation("sinter", 0.5, 3.0), s).T
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- eval cache
def cached_model():
    """A model with the eval cache switched on (it is off by default)."""
    model = get_peft_model(tiny_llama(0), LoranConfig(init_weights=False, sinter_amplitude=0.5,
                                                      sinter_frequency=3.0, eval_cache=True)).eval()
    return model


IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


def fresh_reference(model):
    """Output recomputed without any cache (the cache switched off), the yardstick for staleness."""
    set_eval_cache(model, False)
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    set_eval_cache(model, True)
    return out


def run(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def q_proj(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


def test_the_cache_is_off_by_default_and_evaluation_holds_no_weight_sized_tensor():
    model = get_peft_model(tiny_llama(0), LoranConfig(init_weights=False)).eval()
    out = run(model)
    assert not any(getattr(m, "_loran_cache", None) for m in model.modules())
    set_eval_cache(model, True)
    torch.testing.assert_close(run(model), out, atol=1e-5, rtol=1e-5)
    assert q_proj(model)._loran_cache


def test_cache_is_used_and_matches_uncached():
    model = cached_model()
    out = run(model)
    assert q_proj(model)._loran_cache, "no-grad forward should have cached the effective weight"
    torch.testing.assert_close(out, fresh_reference(model), atol=1e-5, rtol=1e-5)
    with torch.enable_grad():
        train_path = model(input_ids=IDS).logits.detach()
    torch.testing.assert_close(out, train_path, atol=1e-5, rtol=1e-5)


def test_cache_after_in_place_parameter_change():
    model = cached_model()
    before = run(model)
    with torch.no_grad():
        q_proj(model).loran_B["default"].mul_(3.0)
    after = run(model)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh_reference(model))


def test_cache_after_optimizer_step():
    model = cached_model()
    before = run(model)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=IDS).logits.pow(2).mean().backward()
    opt.step()
    model.eval()
    after = run(model)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh_reference(model))


def test_cache_after_adapter_switch_merge_and_train_toggle():
    model = cached_model()
    model.add_adapter("other", LoranConfig(init_weights=False, activation="tanh"))
    first = run(model)
    model.set_adapter("other")
    second = run(model)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, fresh_reference(model))
    model.set_adapter("default")
    torch.testing.assert_close(run(model), first)
    model.merge_adapter()
    torch.testing.assert_close(run(model), first, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(run(model), first, atol=1e-5, rtol=1e-5)
    model.train()
    model.eval()
    torch.testing.assert_close(run(model), first)


def test_cache_after_loading_new_weights(tmp_path):
    model = cached_model()
    first = run(model)
    other_base = tiny_llama(0)
    torch.manual_seed(123)
    other = get_peft_model(other_base, LoranConfig(init_weights=False, sinter_amplitude=0.5, sinter_frequency=3.0))
    from peft import set_peft_model_state_dict, get_peft_model_state_dict

    set_peft_model_state_dict(model, get_peft_model_state_dict(other))
    second = run(model)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, fresh_reference(model))


def test_cache_after_dtype_change():
    model = cached_model()
    run(model)
    model.to(torch.float64)
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, fresh_reference(model))


SLOTS = {  # which cached tensor serves the no-grad call
    "folded_float32": dict(dtype=torch.float32, dropout=0.0, kind="weight"),
    "bf16_delta": dict(dtype=torch.bfloat16, dropout=0.0, kind="delta"),
    "dropout_float32": dict(dtype=torch.float32, dropout=0.2, kind="weight"),
}


def slot_model(slot):
    cfg = SLOTS[slot]
    model = get_peft_model(tiny_llama(0), LoranConfig(init_weights=False, sinter_amplitude=0.5, sinter_frequency=3.0,
                                                      loran_dropout=cfg["dropout"], eval_cache=True))
    return model.to(cfg["dtype"]).eval() if cfg["dtype"] != torch.float32 else model.eval()


def merged_reference(model):
    """A freshly merged copy: no cache involved at all."""
    import copy

    with torch.no_grad():
        return copy.deepcopy(model).merge_and_unload()(input_ids=IDS).logits


def replace_reusing_the_address(p, new):
    """What loading code can do: ``p.data`` is replaced by a fresh tensor (version 0) whose memory is where the old
    one was. The allocator does that when it hands the freed block back; here it is made certain by building the
    fresh tensor on the same memory. The old cache keyed on (address, version) served the old update."""
    values, storage, version = new.detach().clone(), p.untyped_storage(), p._version
    fresh = torch.empty(0, dtype=p.dtype).set_(storage, 0, p.shape, p.stride())
    while fresh._version < version:  # a fresh counter that happens to read like the old one
        fresh.add_(0)
    fresh.data.copy_(values)  # written without a version bump
    p.data = torch.empty(0, dtype=p.dtype)
    p.data = fresh
    assert p.data_ptr() == storage.data_ptr() and p._version == version


CHANGES = {
    "data_replaced_at_the_same_address": lambda m: replace_reusing_the_address(
        q_proj(m).loran_B["default"], q_proj(m).loran_B["default"].detach() * 3),
    "in_place_through_data": lambda m: q_proj(m).loran_A["default"].data.mul_(-2),
    "load_state_dict": lambda m: m.load_state_dict(
        {k: v * 2 if "loran_B" in k else v for k, v in m.state_dict().items()}),
    "scaling": lambda m: q_proj(m).loran_scaling.__setitem__("default", 3.0),
    "base_weight_in_place": lambda m: q_proj(m).get_base_layer().weight.mul_(1.5),
    "activation": lambda m: q_proj(m).loran_activation.__setitem__(
        "default", LoranConfig(activation="tanh").build_activation()),
}


@pytest.mark.parametrize("slot", list(SLOTS))
@pytest.mark.parametrize("change", list(CHANGES))
def test_cache_is_never_stale(slot, change):
    model = slot_model(slot)
    before = run(model)
    entries = q_proj(model)._loran_cache
    assert [key[0] for key in entries] == [SLOTS[slot]["kind"]], list(entries)
    with torch.no_grad():
        CHANGES[change](model)
    after = run(model)
    assert not torch.allclose(before, after), "the change should change the output"
    tol = dict(atol=2e-2, rtol=2e-2) if SLOTS[slot]["dtype"] == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, merged_reference(model), **tol)


@pytest.mark.parametrize("slot", list(SLOTS))
def test_cache_does_not_survive_to_or_deepcopy(slot):
    import copy

    model = slot_model(slot)
    run(model)
    clone = copy.deepcopy(model)
    assert not q_proj(clone)._loran_cache, "deepcopy copied the cache"
    model.to(torch.float64)
    assert not q_proj(model)._loran_cache, ".to() left the cache behind"
    out = run(model)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, merged_reference(model))


def test_eval_cache_memory_budget():
    from peft_loran.layer import LoranLayer

    model = cached_model()  # q/v of two layers: q weights 32x32 (4 KiB in float32), v weights 16x32 (2 KiB)
    want = fresh_reference(model)
    set_eval_cache(model, True, max_mb=10 / 1024)  # 10 KiB: not all four fit
    layers = [m for m in model.modules() if isinstance(m, LoranLayer)]
    budget = layers[0]._loran_cache.budget
    torch.testing.assert_close(run(model), want, atol=1e-5, rtol=1e-5)  # cached or not, the same outputs
    cached = [m for m in layers if m._loran_cache]
    held = sum(entry.value.numel() * entry.value.element_size() for m in cached for entry in m._loran_cache.values())
    assert 0 < len(cached) < len(layers) and held == budget.used <= 10 * 1024
    torch.testing.assert_close(run(model), want, atol=1e-5, rtol=1e-5)  # the second call: the same split
    model.set_adapter("default")  # clearing the caches gives their bytes back
    assert budget.used == 0
    run(model)
    set_eval_cache(model, False)
    assert not any(m._loran_cache for m in layers) and budget.used == 0


def test_training_after_an_evaluation_frees_the_cache():
    """An evaluation inside a training loop must not leave the dense updates allocated for the rest of training."""
    import gc
    import weakref

    from peft_loran.layer import LoranLayer

    model = cached_model()
    set_eval_cache(model, True, max_mb=1.0)
    layers = [m for m in model.modules() if isinstance(m, LoranLayer)]
    budget = layers[0]._loran_cache.budget
    run(model)  # the evaluation builds every layer's cache
    cached = [weakref.ref(entry.value) for m in layers for entry in m._loran_cache.values()]
    assert len(cached) == len(layers) and budget.used > 0
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = model(input_ids=IDS).logits.pow(2).mean()
    gc.collect()
    assert all(ref() is None for ref in cached), "a training forward left cached updates alive"
    assert budget.used == 0
    loss.backward()
    opt.step()
    model.eval()
    torch.testing.assert_close(run(model), fresh_reference(model), atol=1e-5, rtol=1e-5)


def test_eval_cache_is_per_adapter():
    model = cached_model()
    model.add_adapter("uncached", LoranConfig(init_weights=False, eval_cache=False))
    layer = q_proj(model)
    assert layer.loran_eval_cache == {"default": True, "uncached": False}
    run(model)
    assert layer._loran_cache, "adding an uncached adapter switched the cache off for 'default'"
    model.set_adapter("uncached")
    layer._loran_cache.clear()
    run(model)
    assert not layer._loran_cache


def test_cache_is_built_once_under_concurrent_calls():
    import threading

    model = cached_model()
    outputs, errors = [], []

    def call():
        try:
            outputs.append(run(model))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for out in outputs:
        torch.testing.assert_close(out, fresh_reference(model), atol=1e-5, rtol=1e-5)


def test_cache_can_be_switched_off():
    model = cached_model()
    set_eval_cache(model, False)
    run(model)
    assert not q_proj(model)._loran_cache


# ---------------------------------------------------------------------------------------------- integrations
def test_gradient_checkpointing_gives_same_gradients():
    def grads(checkpointing):
        model = get_peft_model(tiny_llama(0), LoranConfig(init_weights=False, target_modules="all-linear"))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5)


def compile_model():
    return get_peft_model(tiny_llama(0), LoranConfig(init_weights=False, sinter_amplitude=0.5, sinter_frequency=3.0,
                                                     target_modules=["q_proj", "v_proj", "embed_tokens"]))


def test_torch_compile_fullgraph_train_and_eval_give_eager_outputs_and_gradients():
    model = compile_model()
    model.train()
    expected = model(input_ids=IDS).logits
    expected.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: any graph break is an error
    got = compiled(input_ids=IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    got.pow(2).mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=IDS).logits, expected.detach(), atol=1e-5, rtol=1e-5)
        explanation = torch._dynamo.explain(model)(input_ids=IDS)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons


def test_generation_with_static_cache_and_compiled_forward():
    model = compile_model().eval()
    with torch.no_grad():
        eager = model.generate(IDS, max_new_tokens=4, do_sample=False, cache_implementation="static")
        inner = model.base_model.model
        inner.forward = torch.compile(inner.forward, fullgraph=True)  # transformers' fast path: inductor
        compiled = model.generate(IDS, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(compiled, eager)


# ------------------------------------------------------------------------------- page-aligned weights (decoding)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_empty_page_aligned_starts_on_a_page(dtype):
    keep = [torch.empty(1000 + k) for k in range(5)]  # perturb the heap so the allocator hands out odd offsets
    for shape in [(7, 13), (300, 1024), (0, 5)]:
        t = LF.empty_page_aligned(shape, dtype, torch.device("cpu"))
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
        assert t.data_ptr() % LF.PAGE_BYTES == 0
        t.fill_(1)
        assert (t == 1).all()
    copied = LF.page_aligned_copy(torch.arange(12.0).view(3, 4).T, torch.float64)
    assert copied.data_ptr() % LF.PAGE_BYTES == 0 and copied.dtype == torch.float64
    assert torch.equal(copied, torch.arange(12.0, dtype=torch.float64).view(3, 4).T)
    del keep


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("chain", ["plain", "Pb"])
def test_delta_weight_added_in_place_matches_reference(transposed, chain):
    """``W += s f-chain(BA)`` block by block (blocks that do not divide the rows), also on a transposed view."""
    torch.manual_seed(0)
    A, B = torch.randn(3, 12), torch.randn(20, 3)
    Ps, bs = ([torch.randn(12, 12)], [torch.randn(12)]) if chain == "Pb" else ([], [])
    stages = [(Ps[0], bs[0])] if chain == "Pb" else [(None, None)]
    W = torch.randn(12, 20) if transposed else torch.randn(20, 12)
    expected = (W.T if transposed else W).double() + naive_update(A, B, Ps, bs, activation("tanh"), 0.7)
    from peft_loran import get_activation

    target = W.clone()
    LF.LowRankUpdate.of(A, B, stages, get_activation("tanh"), 0.7, block_rows=7).add_to_(
        target.T if transposed else target)
    torch.testing.assert_close((target.T if transposed else target).double(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="`target` has shape"):
        LF.LowRankUpdate.of(A, B, stages, get_activation("tanh"), 0.7).add_to_(torch.zeros(20, 11))


def test_cache_and_merged_weights_are_page_aligned():
    """The decode-speed fix: every weight read on each generated token starts on a page (CPU), or is the model's own
    weight where it was (a float merge adds in place: the merged weight is read from the base's own memory)."""
    model = cached_model()
    run(model)
    cached = [entry.value for m in model.modules() for entry in getattr(m, "_loran_cache", {}).values()]
    assert cached and all(t.data_ptr() % LF.PAGE_BYTES == 0 for t in cached)
    layers = [q_proj(model).get_base_layer(), model.base_model.model.model.layers[1].self_attn.v_proj.get_base_layer()]
    before = [(layer.weight.data_ptr(), layer.weight.detach().clone()) for layer in layers]
    model.merge_adapter()
    for layer, (pointer, old) in zip(layers, before):
        assert layer.weight.data_ptr() == pointer and not torch.equal(layer.weight, old)
    half = cached_model().to(torch.bfloat16)  # not folded: the per-adapter update is cached, in bfloat16
    run(half)
    deltas = [entry.value for m in half.modules() for entry in getattr(m, "_loran_cache", {}).values()]
    assert deltas and all(t.dtype == torch.bfloat16 and t.data_ptr() % LF.PAGE_BYTES == 0 for t in deltas)


def test_merged_model_saves_and_reloads(tmp_path):
    """Merged weights are views into slightly larger storage; save_pretrained/from_pretrained still round-trip."""
    from transformers import LlamaForCausalLM

    model = cached_model()
    adapted = run(model)
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, adapted, atol=1e-5, rtol=1e-5)


def test_layer_with_accelerate_hook_keeps_the_hook():
    """A base layer with an accelerate hook (offloading, device maps) must run its own forward, hook included:
    the fold into one GEMM would bypass it."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class DoubleInput(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            return (args[0] * 2, *args[1:]), kwargs

    torch.manual_seed(0)
    config = LoranConfig(target_modules=["layer"], r=2, init_weights=False, activation="tanh")
    layer = inject_adapter_in_model(config, One(6, 5, conv=False)).layer
    add_hook_to_module(layer.get_base_layer(), DoubleInput())
    x = torch.randn(3, 6)
    A, B, Ps, bs, s = layer_factors(layer)
    base = layer.get_base_layer()
    ref = (2 * x).double() @ base.weight.double().T + base.bias.double() + x.double() @ naive_update(
        A, B, Ps, bs, activation("tanh"), s).T
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(layer(x).double(), ref, atol=1e-5, rtol=1e-5)


def test_the_cpu_plan_s_blocks_hold_one_budget_of_elements(monkeypatch):
    """The CPU plan: ``CPU_BLOCK_ELEMENTS // cols`` rows per block whatever the kernel and whether a backward
    follows (at least one row, at most the layer); ``PEFT_LORAN_BLOCK_ELEMENTS`` replaces the budget; an explicit
    height (``LoranConfig.block_rows``) beats both; the blocks cover every row once."""
    from peft_loran import plan as plans

    monkeypatch.delenv("PEFT_LORAN_BLOCK_ELEMENTS", raising=False)
    read_environment_again()
    for rows, cols in [(64, 64), (1024, 1024), (2816, 1024), (1024, 2816), (4096, 4096), (4096, 11008),
                       (3, 300_000)]:
        for name in ("sinter", "tanh"):
            update = LF.LowRankUpdate.of(torch.zeros(2, cols), torch.zeros(rows, 2), [(None, None)],
                                         get_activation(name), 1.0)
            for autograd in (True, False):
                height = update.plan(target="cpu", autograd=autograd).block_rows
                assert height == min(rows, max(1, plans.CPU_BLOCK_ELEMENTS // cols)), (rows, cols, height)
    assert LF.LowRankUpdate.of(torch.zeros(2, 4096), torch.zeros(4096, 2), [(None, None)], get_activation("sinter"),
                               1.0).plan(target="cpu").block_rows == 512  # a 7B layer: 512 rows
    update = LF.LowRankUpdate.of(torch.zeros(2, 4096), torch.zeros(100, 2), [(None, None)], get_activation("tanh"), 1.0)
    monkeypatch.setenv("PEFT_LORAN_BLOCK_ELEMENTS", "4096")
    read_environment_again()
    assert update.plan(target="cpu").block_rows == 1
    explicit = LF.LowRankUpdate.of(torch.zeros(2, 2816), torch.zeros(100, 2), [(None, None)], get_activation("tanh"),
                                   1.0, block_rows=7)
    assert explicit.plan().block_rows == 7
    spans = [(block.i0, block.i1) for block in explicit.blocks()]
    assert spans[:2] == [(0, 7), (7, 14)] and spans[-1] == (98, 100) and len(spans) == 15
