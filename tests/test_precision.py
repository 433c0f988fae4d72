"""train.precision = "auto": bf16 autocast only where the device computes bf16 natively (emulated
bf16 on an AVX2-only CPU is an order of magnitude slower than fp32), explicit choices as given."""

from __future__ import annotations

import warnings

import pytest
import torch

from cdm import stage as stage_mod
from cdm.config import ConfigError, load_stage_config
from cdm.plan import planned_precision


@pytest.fixture
def bf16_native(monkeypatch):
    """``bf16_native(flag)``: pretend this machine's CPU does (or does not) compute bf16 natively."""
    def set_(flag: bool) -> None:
        monkeypatch.setattr(stage_mod, "native_bf16", lambda device_type: flag)
        monkeypatch.setattr(stage_mod, "_warned", set())
    return set_


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_is_bf16_only_where_it_is_native(bf16_native, native, expected):
    bf16_native(native)
    assert stage_mod.resolve_precision("auto", "cpu") == expected
    assert stage_mod.resolve_precision("fp32", "cpu") == "fp32" and stage_mod.resolve_precision("bf16", "cpu") == "bf16"
    with stage_mod.autocast(torch.device("cpu"), "auto"):
        y = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
    assert y.dtype == (torch.bfloat16 if native else torch.float32)


def test_explicit_bf16_without_native_support_warns_once_and_is_honoured(bf16_native):
    bf16_native(False)
    with pytest.warns(UserWarning, match="emulated"):
        with stage_mod.autocast(torch.device("cpu"), "bf16"):
            y = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
    assert y.dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with stage_mod.autocast(torch.device("cpu"), "bf16"):
            pass  # once per process and device type


def test_the_presets_default_to_auto_and_a_wrong_value_is_explained():
    for preset in ("fmnist-base8", "fmnist-sr8to32", "fmnist-single32", "folder-base16", "folder-sr16to64"):
        assert load_stage_config(preset, []).train.precision == "auto"
    with pytest.raises(ConfigError, match="one of auto, bf16, fp32"):
        load_stage_config("fmnist-base8", ["train.precision=fp16"])
    assert planned_precision("auto") == "bf16" and planned_precision("fp32") == "fp32"


def test_the_native_check_matches_the_cpu_flags():
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    if not flags:
        pytest.skip("no /proc/cpuinfo")
    has = "avx512_bf16" in flags or "amx_bf16" in flags
    stage_mod.native_bf16.cache_clear()
    assert stage_mod.native_bf16("cpu") == has
