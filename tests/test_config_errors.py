"""Bad configuration gets one clear error naming the parameter and the fix."""

from __future__ import annotations

import pytest

from peft_loran import LoranConfig, MLoraConfig


@pytest.mark.parametrize("r", [0, -3, 2.5, True])
def test_rank_must_be_positive_int(r):
    with pytest.raises(ValueError, match=r"`r` must be a positive integer"):
        LoranConfig(r=r)


def test_mlora_rank_list_too_short():
    with pytest.raises(ValueError, match=r"`r` as a list needs at least two entries"):
        MLoraConfig(r=[8])


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_range(p):
    with pytest.raises(ValueError, match=r"`loran_dropout` must be in \[0, 1\)"):
        LoranConfig(loran_dropout=p)
    with pytest.raises(ValueError, match=r"`loran_dropout` must be in \[0, 1\)"):
        MLoraConfig(mlora_dropout=p)


def test_non_finite_sinter_in_mlora():
    with pytest.raises(ValueError, match="sinter_amplitude"):
        MLoraConfig(mlora_af_sin_A=float("nan"))


def test_chain_dims_validation():
    with pytest.raises(ValueError, match="`chain_dims` must be a non-empty list of positive integers"):
        LoranConfig(chain_dims=[0])
    with pytest.raises(ValueError, match="`use_P=True` needs `chain_dims`"):
        LoranConfig(use_P=True)


def test_bias_and_block_rows():
    with pytest.raises(ValueError, match="`bias` must be"):
        LoranConfig(bias="lora_only")
    with pytest.raises(ValueError, match="`block_rows` must be a positive integer"):
        LoranConfig(block_rows=0)


def test_unknown_activation_in_mlora_names_parameter():
    with pytest.raises(ValueError, match=r"mlora_af"):
        MLoraConfig(mlora_af="Softmax")


def test_dead_activation_warns():
    with pytest.warns(UserWarning, match="f'\\(0\\) = 0"):
        LoranConfig(activation="relu")


def test_mlora_defaults_are_the_originals():
    config = MLoraConfig()
    assert (config.activation, config.loran_alpha, config.sinter_amplitude, config.sinter_frequency) == (
        "sigmoid", 8, 5e-4, 1000.0)
    # the original's table: mlora_use_P=True, mlora_use_b=True, mlora_dropout=0.0, init_mlora_weights=True (for the
    # original's list r; an int r, our extension, is plain LoRAN with P and b off unless asked for)
    chain = MLoraConfig(r=[4, 16])
    assert (chain.use_P, chain.use_b, chain.loran_dropout, chain.init_weights) == (True, True, 0.0, True)
    assert (config.use_P, config.use_b) == (False, False)
    assert config.zero_centered  # new adapters start at exactly zero, unlike the original's Sigmoid default


def test_the_dead_start_warning_is_shown_once_per_process_however_often_the_config_is_built():
    import subprocess
    import sys

    script = """
import peft_loran
from peft_loran import MLoraConfig
from peft import get_peft_model
import torch
from torch import nn

class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 4)

config = MLoraConfig(r=2, mlora_af="Relu", target_modules=["q"])
for _ in range(3):
    get_peft_model(M(), MLoraConfig(r=2, mlora_af="Relu", target_modules=["q"]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.count("f'(0) = 0") == 1, out.stderr


def test_bitsandbytes_hub_kernel_notice_is_dropped_and_nothing_else():
    import logging

    import peft_loran  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)  # the command line's tests raise bitsandbytes' level; this one must not depend
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "No module")
        logger.warning("another notice")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert records == ["another notice"]
