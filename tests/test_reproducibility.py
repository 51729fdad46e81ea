"""The same seed gives the same bits: an update's block plan (kernel and block sizes) is decided by the
configuration, the shapes and the device, never by a clock or by how long the process has run, or by what ran
before in it."""

from __future__ import annotations

import itertools
import json
import time

import torch
from peft import get_peft_model

from peft_loran import LoranConfig, kernels

from .conftest import tiny_llama, read_environment_again
from .test_cli import run


def seeded_training(steps: int = 4) -> dict[str, torch.Tensor]:
    """A short seeded training (dropout on, so the random stream matters too); the trained factors and losses."""
    model = tiny_llama(seed=0, hidden=256, layers=1, intermediate=512)  # q: 65,536 elements per update
    config = LoranConfig(r=4, loran_alpha=8, loran_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"],
                         sinter_amplitude=0.5, sinter_frequency=20.0)
    model = get_peft_model(model, config).train()
    torch.manual_seed(1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 101, (2, 12))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach().reshape(1))
    state = {k: v.detach().clone() for k, v in model.named_parameters() if "loran_" in k}
    return {**state, "losses": torch.cat(losses)}


def test_seeded_training_is_bit_identical_whatever_the_clock(monkeypatch):
    # this small model's layers count as wide, so `auto` has the compiled kernels to choose from
    monkeypatch.setattr(kernels, "AUTO_COMPILE_MIN_ELEMENTS", 2**15)
    monkeypatch.delenv("PEFT_LORAN_COMPILE", raising=False)
    read_environment_again()
    runs = [seeded_training()]
    # a slow, loaded machine: every clock reading is 1000 s after the last, so a policy that looked at time would
    # switch kernels (and block sizes) after the first block
    ticks = itertools.count(start=time.perf_counter(), step=1000.0)
    with monkeypatch.context() as clock:
        for name in ("perf_counter", "monotonic", "time"):
            clock.setattr(time, name, lambda: next(ticks))
        runs.append(seeded_training())
    runs.append(seeded_training())
    first = runs[0]
    assert first["losses"][-1] != first["losses"][0]  # it trained
    for other in runs[1:]:
        assert first.keys() == other.keys()
        for key in first:
            assert torch.equal(first[key], other[key]), f"{key} differs between two runs of the same seed"


def test_two_runs_of_the_same_compare_cell_give_the_same_numbers(tiny_encoder, cls_file, tmp_path):
    results = []
    for name in ("one", "two"):
        out = tmp_path / name
        assert run(["compare", "--model", tiny_encoder, "--train-file", cls_file, "--steps", "3", "--batch-size", "4",
                    "--methods", "loran:tanh", "--seed", "3", "--output-dir", str(out), "--quiet"]) == 0
        results.append(json.loads((out / "metrics.json").read_text())["results"])
    for a, b in zip(*results):
        assert a["method"] == b["method"]
        assert a["loss_curve"] == b["loss_curve"] and a["metrics"] == b["metrics"]
        assert a["nonlinear_share"] == b["nonlinear_share"] and a["effective_rank"] == b["effective_rank"]
