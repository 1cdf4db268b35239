"""The recipe: frozen Pydantic models for mergekit's YAML format plus mergecli's extras.

Every model forbids unknown keys; `mergecli.recipe.load` turns Pydantic's errors into
messages with recipe paths and 'did you mean' hints. Semantic checks that need the method
registry (parameter names, ranges, required values) live in `mergecli.recipe.check`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from mergecli.recipe.settings import Parameters


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelRef(_Frozen):
    """A model: a Hub id (`org/name`, optional `@revision`) or a local folder; optional LoRA."""

    path: str = Field(min_length=1)
    revision: str | None = None
    adapter: str | None = None

    def __str__(self) -> str:
        text = self.path
        if self.revision:
            text += f"@{self.revision}"
        if self.adapter:
            text += f"+{self.adapter}"
        return text


def parse_model_ref(raw: Any) -> Any:
    """The fields of a model reference written as a string (`org/name@rev+adapter`)."""
    if isinstance(raw, str):
        text = raw.strip()
        if not text:
            raise PydanticCustomError("bad_model", "a model reference cannot be empty")
        model, _, adapter = text.partition("+")
        path, revision = model, None
        if "@" in model and not model.startswith(("/", ".", "~")):
            path, _, revision = model.rpartition("@")
        return {"path": path, "revision": revision or None, "adapter": adapter or None}
    if isinstance(raw, dict):
        return raw
    raise PydanticCustomError(
        "bad_model",
        "expected a model reference (`org/name`, `org/name@revision`, `./folder`, or "
        "{path, revision, adapter}); found {kind}",
        {"kind": "nothing (null)" if raw is None else type(raw).__name__},
    )


ModelSpec = Annotated[ModelRef, BeforeValidator(parse_model_ref)]

_DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
    "fp64": "float64",
    "double": "float64",
}
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")


def _parse_dtype(raw: Any) -> Any:
    if isinstance(raw, str):
        key = raw.strip().lower().removeprefix("torch.")
        if key in _DTYPE_ALIASES:
            return _DTYPE_ALIASES[key]
    raise PydanticCustomError(
        "bad_dtype",
        "unknown dtype {raw}; allowed: float32, float16, bfloat16, float64 "
        "(aliases fp32, fp16, bf16 and torch.* also work)",
        {"raw": repr(raw)},
    )


DType = Annotated[
    Literal["float32", "float16", "bfloat16", "float64"], BeforeValidator(_parse_dtype)
]


def _parse_layer_range(raw: Any) -> Any:
    if (
        isinstance(raw, (list, tuple))
        and len(raw) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in raw)
    ):
        return tuple(raw)
    raise PydanticCustomError(
        "bad_range", "layer_range must be two integers [start, end) (end exclusive), e.g. [0, 16]"
    )


LayerRange = Annotated[tuple[int, int], BeforeValidator(_parse_layer_range)]


class InputModel(_Frozen):
    """One entry of `models:`."""

    model: ModelSpec
    parameters: Parameters | None = None


class InputSlice(_Frozen):
    """One source of an output slice: a model and a half-open layer range."""

    model: ModelSpec
    layer_range: LayerRange
    parameters: Parameters | None = None


class OutputSlice(_Frozen):
    """One entry of `slices:`: sources merged into consecutive output layers."""

    sources: list[InputSlice] = Field(min_length=1)
    base_model: ModelSpec | None = None
    residual_weight: float | None = None
    parameters: Parameters | None = None


class OutputModule(_Frozen):
    """mergekit's multi-module form (one entry of `modules:`)."""

    slices: list[OutputSlice] | None = None
    models: list[InputModel] | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _one_input_form(self) -> OutputModule:
        forms = [k for k in ("models", "slices") if getattr(self, k)]
        if len(forms) != 1:
            found = " and ".join(f"`{f}`" for f in forms) if forms else "none"
            raise PydanticCustomError(
                "input_form",
                "give exactly one of `models` or `slices` in a module (found {found})",
                {"found": found},
            )
        return self


class ModelTokenSource(_Frozen):
    """Take a token's embedding from a model (by token string or id)."""

    kind: Literal["model_token"] = "model_token"
    model: ModelSpec
    token_id: int | None = None
    token: str | None = None


class ZeroTokenSource(_Frozen):
    """A zero embedding row."""

    kind: Literal["zero"] = "zero"


class TokenEmbedding(_Frozen):
    """Where one token's embedding row comes from."""

    source: ZeroTokenSource | ModelTokenSource | ModelSpec | None = None
    force: bool = False


class TokenizerBlock(_Frozen):
    """mergekit's `tokenizer:` block."""

    source: Literal["union", "base"] | ModelSpec = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


class LinesStep(_Frozen):
    """LiNeS post-step: scale the merged delta of layer l by alpha + beta * l / (L - 1)."""

    alpha: float
    beta: float


class PostSteps(_Frozen):
    """Post-steps applied to a task-vector method's merged delta."""

    lines: LinesStep | None = None


_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/+-]*$")


class OutputSpec(_Frozen):
    """What `run` writes (mergecli extension): a model (the default), or a PEFT LoRA adapter
    of the recipe's base: with `combination`, the adapters merged as PEFT's
    `add_weighted_adapter` does; without, the merged model's change from the base
    factored to `rank`."""

    kind: Literal["model", "adapter"] = "model"
    combination: (
        Literal[
            "linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties",
            "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd",
        ]
        | None
    ) = None  # fmt: skip
    svd_rank: int | None = Field(default=None, ge=1)
    rank: int | None = Field(default=None, ge=1)
    density: float | None = Field(default=None, ge=0, le=1)
    majority_sign_method: Literal["total", "frequency"] = "total"


class Recipe(_Frozen):
    """A whole merge recipe."""

    merge_method: str
    base_model: ModelSpec | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, OutputModule] | None = None
    parameters: Parameters | None = None
    dtype: DType | None = None
    out_dtype: DType | None = None
    tokenizer_source: Literal["union", "base"] | ModelSpec | None = None
    tokenizer: TokenizerBlock | None = None
    chat_template: str | None = None
    post: PostSteps | None = None
    name: str | None = None
    description: str | None = None
    license: str | None = None
    tags: list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    tensor_names: Literal["all", "intersection", "union"] | None = None
    output: OutputSpec | None = None

    @model_validator(mode="after")
    def _one_input_form(self) -> Recipe:
        forms = [k for k in ("models", "slices", "modules") if getattr(self, k)]
        if len(forms) != 1:
            found = " and ".join(f"`{f}`" for f in forms) if forms else "none"
            raise PydanticCustomError(
                "input_form",
                "give exactly one of `models`, `slices` or `modules` (found {found})",
                {"found": found},
            )
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise PydanticCustomError(
                "tokenizer_form",
                "give either `tokenizer_source` or a `tokenizer:` block, not both",
            )
        if self.tensor_names not in (None, "all") and not self.models:
            raise PydanticCustomError(
                "tensor_names_form",
                "`tensor_names: {mode}` applies to the `models:` form (merged name for name)",
                {"mode": self.tensor_names},
            )
        for tag in self.tags or []:
            if not _TAG.match(tag):
                raise PydanticCustomError(
                    "bad_tag", "tag {tag} has characters the Hub does not allow", {"tag": repr(tag)}
                )
        return self
