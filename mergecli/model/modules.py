"""Which module of a model a tensor belongs to, for mergekit's multi-module recipes
(`modules:`), found from tensor names with the module names mergekit uses.

A model with a vision tower has `text_decoder`, `vision_tower` (or `vision_model`) and
`multi_modal_projector`; an encoder-decoder model has `encoder`, `decoder` and, when it has tensors outside
both (T5's `shared.weight`, `lm_head.weight`), `shared`;
any other model is the single module `default`."""

from __future__ import annotations

import re
from collections.abc import Iterable

DEFAULT = "default"
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "multi_modal_projector",
        re.compile(r"(?:^|\.)(?:multi_modal_projector|mm_projector)\.|(?:^|\.)visual\.merger\."),
    ),
    ("vision_tower", re.compile(r"(?:^|\.)(?:vision_tower|visual)\.")),
    ("vision_model", re.compile(r"(?:^|\.)vision_model\.")),
    ("encoder", re.compile(r"(?:^|\.)encoder\.")),
    ("decoder", re.compile(r"(?:^|\.)decoder\.")),
)
_VISION = {"multi_modal_projector", "vision_tower", "vision_model"}


def _matched(name: str) -> str | None:
    return next((module for module, rule in _RULES if rule.search(name)), None)


def module_names(names: Iterable[str]) -> tuple[str, ...]:
    """The modules of a model with these tensor names, in mergekit's names."""
    matched = [_matched(n) for n in names]
    found = set(matched) - {None}
    if found & _VISION:
        return ("text_decoder", *sorted(m for m in found if m in _VISION))
    if {"encoder", "decoder"} <= found:
        rest = ("shared",) if None in matched else ()
        return ("encoder", "decoder", *rest)
    return (DEFAULT,)


def module_of(name: str, modules: tuple[str, ...]) -> str:
    """The module of tensor `name` in a model whose modules are `modules`."""
    if modules == (DEFAULT,):
        return DEFAULT
    matched = _matched(name)
    if matched in modules:
        return matched
    return "shared" if "shared" in modules else "text_decoder"
