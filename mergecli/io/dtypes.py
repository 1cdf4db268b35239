"""Mapping between safetensors dtype codes, torch dtypes and recipe dtype names."""

from __future__ import annotations

import torch

CODE_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_CODE = {v: k for k, v in CODE_TO_TORCH.items()}
ITEMSIZE = {code: torch.empty((), dtype=dt).element_size() for code, dt in CODE_TO_TORCH.items()}
NAME_TO_CODE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
CODE_TO_NAME = {code: str(dt).removeprefix("torch.") for code, dt in CODE_TO_TORCH.items()}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def math_dtype(out_code: str, input_codes: list[str]) -> torch.dtype:
    """float64 when any input or the output is float64, else float32."""
    return torch.float64 if "F64" in (out_code, *input_codes) else torch.float32
