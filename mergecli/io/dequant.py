"""Exact dequantization on read of the two quantized formats mergecli merges: FP8 weights
with block scales (`weight_scale_inv`, DeepSeek-V3 style, quant_method `fp8`) and MXFP4
experts (`*_blocks`/`*_scales`, gpt-oss style, quant_method `mxfp4`).

`dequantized_view` turns such a model into the model it stands for: each packed pair is one
tensor of the config's dtype (read as float32: the compute dtype), and the config loses its
`quantization_config`. Every other quantized format is refused by the planner.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from mergecli.errors import IncompatibleModelError
from mergecli.io.checkpoint import ModelInfo, Packed, TensorInfo

Rows = tuple[int, int] | None
ReadPart = Callable[[TensorInfo, Rows], torch.Tensor]

FP4_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)
_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_FP8_CODES = ("F8_E4M3", "F8_E5M2")
_STATIC_SCALES = (".input_scale", ".activation_scale", ".k_scale", ".v_scale")


def quant_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """The `quantization_config` of a config (or of its `text_config`)."""
    for section in (config, config.get("text_config")):
        if isinstance(section, dict) and isinstance(section.get("quantization_config"), dict):
            return section["quantization_config"]  # type: ignore[no-any-return]
    return None


def dequantized_view(model: ModelInfo) -> ModelInfo:
    """`model` as the unquantized model it stands for when it is FP8 block-scaled or MXFP4;
    any other model unchanged. A model that declares one of these formats but does not
    hold it consistently is refused (exit 4)."""
    found = quant_config(model.config)
    method = found.get("quant_method") if found else None
    if method not in ("fp8", "mxfp4"):
        return model
    assert found is not None
    dtype = _logical_dtype(model.config)
    tensors = _fp8_view(model, found, dtype) if method == "fp8" else _mxfp4_view(model, dtype)
    return replace(model, config=_without_quantization(model.config), tensors=tensors)


def _logical_dtype(config: dict[str, Any]) -> str:
    sections = [config, config.get("text_config") or {}]
    for section in sections:
        for key in ("torch_dtype", "dtype"):
            name = section.get(key) if isinstance(section, dict) else None
            if isinstance(name, str) and name.removeprefix("torch.") in _DTYPES:
                return _DTYPES[name.removeprefix("torch.")]
    return "BF16"


def _without_quantization(config: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    text = out.get("text_config")
    if isinstance(text, dict) and "quantization_config" in text:
        out["text_config"] = {k: v for k, v in text.items() if k != "quantization_config"}
    return out


def _refuse(model: ModelInfo, what: str) -> IncompatibleModelError:
    return IncompatibleModelError(
        f"{model.label} is a quantized checkpoint ({what})",
        hint="mergecli dequantizes FP8 with `weight_scale_inv` block scales and MXFP4 "
        "`_blocks`/`_scales` experts; for other layouts, dequantize first (transformers: load "
        "it, `model.dequantize()`, `save_pretrained`)",
    )


def _fp8_view(model: ModelInfo, config: dict[str, Any], dtype: str) -> dict[str, TensorInfo]:
    static = next((n for n in model.tensors if n.endswith(_STATIC_SCALES)), None)
    if static is not None:
        raise _refuse(model, f"FP8 with static activation scales such as `{static}`")
    block = config.get("weight_block_size")
    if block is not None and not (
        isinstance(block, list)
        and len(block) == 2
        and all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise _refuse(model, f"FP8 with weight_block_size {block!r}")
    tensors = dict(model.tensors)
    pairs = 0
    for name, info in model.tensors.items():
        scale = tensors.get(f"{name}_scale_inv")
        if info.dtype not in _FP8_CODES:
            continue
        if scale is None or len(info.shape) < 2:
            raise _refuse(model, f"FP8 tensor `{name}` without a `{name}_scale_inv`")
        blocks = tuple(block) if block else None
        _check_fp8_scale(model, info, scale, blocks)
        packed = Packed("fp8", info, scale, blocks)  # type: ignore[arg-type]
        tensors[name] = TensorInfo(name, info.file, dtype, info.shape, packed)
        del tensors[scale.name]
        pairs += 1
    if pairs == 0:
        raise _refuse(model, "quant_method `fp8` in config.json but no FP8 weights")
    return tensors


def _check_fp8_scale(
    model: ModelInfo, info: TensorInfo, scale: TensorInfo, block: tuple[int, ...] | None
) -> None:
    *lead, rows, cols = info.shape
    if block is None:
        fits = math.prod(scale.shape) == 1
        want = "one scale"
    else:
        needed = (*lead, -(-rows // block[0]), -(-cols // block[1]))
        fits, want = scale.shape == needed, str(list(needed))
    if not fits or scale.dtype not in ("F32", "BF16", "F16"):
        raise _refuse(
            model,
            f"`{scale.name}` is {scale.dtype} {list(scale.shape)}; FP8 `{info.name}` "
            f"{list(info.shape)} with blocks {block} needs float {want}",
        )


def _mxfp4_view(model: ModelInfo, dtype: str) -> dict[str, TensorInfo]:
    tensors = dict(model.tensors)
    pairs = 0
    for name, info in model.tensors.items():
        if not name.endswith("_blocks"):
            continue
        stem = name.removesuffix("_blocks")
        scale = tensors.get(f"{stem}_scales")
        if scale is None or info.dtype != "U8" or scale.dtype != "U8":
            raise _refuse(model, f"MXFP4 `{name}` without uint8 `{stem}_scales`")
        if len(info.shape) != 4 or info.shape[-1] != 16 or scale.shape != info.shape[:-1]:
            raise _refuse(
                model,
                f"MXFP4 `{name}` {list(info.shape)} with scales {list(scale.shape)}; expected "
                "[experts, rows, groups, 16] and [experts, rows, groups]",
            )
        experts, rows, groups, _ = info.shape
        shape = (experts, groups * 32, rows)  # transformers' layout: the packed rows transposed
        tensors[stem] = TensorInfo(stem, info.file, dtype, shape, Packed("mxfp4", info, scale))
        del tensors[name], tensors[scale.name]
        pairs += 1
    if pairs == 0:
        raise _refuse(model, "quant_method `mxfp4` in config.json but no `_blocks` tensors")
    return tensors


def dequantize(info: TensorInfo, read: ReadPart, rows: Rows = None) -> torch.Tensor:
    """Rows [start, stop) of the packed tensor `info` (all when None) in float32, from its
    stored parts read with `read(part, rows)`."""
    packed = info.packed
    assert packed is not None
    if packed.kind == "fp8":
        return _fp8(packed, read, rows)
    return _mxfp4(packed, read, rows)


def _fp8(packed: Packed, read: ReadPart, rows: Rows) -> torch.Tensor:
    data = read(packed.data, rows).to(torch.float32)
    block = packed.block
    if block is None:
        return data.mul_(read(packed.scale, None).to(torch.float32).reshape(()))
    if len(packed.data.shape) > 2:
        scale = read(packed.scale, rows)
    else:
        first = 0 if rows is None else rows[0]
        stop = packed.data.shape[0] if rows is None else rows[1]
        scale = read(packed.scale, (first // block[0], -(-stop // block[0])))
    scale = scale.to(torch.float32)
    n_cols = packed.data.shape[-1]
    offset = 0 if rows is None or len(packed.data.shape) > 2 else rows[0] % block[0]
    expanded = scale.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return data.mul_(expanded[..., offset : offset + data.shape[-2], :n_cols])


def _mxfp4(packed: Packed, read: ReadPart, rows: Rows) -> torch.Tensor:
    blocks = read(packed.data, rows)
    exponents = read(packed.scale, rows).to(torch.int32) - 127
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    experts, n_rows, groups, width = blocks.shape
    values = torch.empty(experts, n_rows, groups, width * 2, dtype=torch.float32)
    values[..., 0::2] = lut[(blocks & 0x0F).long()]
    values[..., 1::2] = lut[(blocks >> 4).long()]
    values = torch.ldexp(values, exponents.unsqueeze(-1).to(torch.float32))
    return values.reshape(experts, n_rows, groups * width * 2).transpose(1, 2).contiguous()
