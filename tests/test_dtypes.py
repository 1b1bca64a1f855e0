"""Tests for loratune.dtypes: dtype names, "auto", and the one table quantization and export share."""

from __future__ import annotations

import pytest
import torch

from loratune.dtypes import bf16_supported, parse_dtype, resolve_dtype
from loratune.errors import ConfigError
from loratune.quant import parse_compute_dtype as compute_dtype


def test_resolve_dtype():
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype(torch.float64, "cpu") == torch.float64
    expected = torch.bfloat16 if bf16_supported("cpu") else torch.float32
    assert resolve_dtype("auto", "cpu") == expected
    with pytest.raises(ConfigError, match="'int8' is not one of"):
        resolve_dtype("int8", "cpu")


def test_one_dtype_table_for_loading_quantization_and_export():
    for name in ("half", "fp16", "torch.float16", "float16"):
        assert parse_dtype(name) == compute_dtype(name) == resolve_dtype(name, "cpu") == torch.float16
    with pytest.raises(ConfigError, match="bnb_4bit_compute_dtype 'int8' is not one of"):
        compute_dtype("int8", "bnb_4bit_compute_dtype")
    with pytest.raises(ConfigError, match="--dtype 'float64' is not one of"):
        parse_dtype("float64", "--dtype")
