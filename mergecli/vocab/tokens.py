"""Vocabularies: token maps from `tokenizer.json`, the union vocabulary, row maps by token
string, and the merged `tokenizer.json` of a union. Pure functions; no file access.

A row map gives, for every output embedding row, the row of one model that holds the same
token (or -1 when the model lacks it). Rows past the output tokenizer's size are padding:
they map to the same row of a model whose own padding covers it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SUPPORTED_KINDS = ("BPE", "WordPiece", "WordLevel", "Unigram")


@dataclass(frozen=True)
class Vocabulary:
    """Token strings and ids of one fast tokenizer (model vocabulary plus added tokens)."""

    kind: str
    tokens: Mapping[str, int]
    added: frozenset[str]

    @property
    def size(self) -> int:
        """Number of ids (largest id + 1)."""
        return max(self.tokens.values(), default=-1) + 1


def parse_tokenizer(document: Mapping[str, Any]) -> Vocabulary:
    """The vocabulary of a parsed `tokenizer.json`; ValueError for model kinds without one."""
    model = document.get("model") or {}
    kind = str(model.get("type", ""))
    raw = model.get("vocab")
    if kind == "Unigram" and isinstance(raw, list):
        tokens = {str(entry[0]): i for i, entry in enumerate(raw)}
    elif kind in SUPPORTED_KINDS and isinstance(raw, dict):
        tokens = {str(k): int(v) for k, v in raw.items()}
    else:
        raise ValueError(f"tokenizer model `{kind or 'unknown'}` has no vocabulary mergecli reads")
    added = set()
    for entry in document.get("added_tokens") or []:
        tokens[str(entry["content"])] = int(entry["id"])
        added.add(str(entry["content"]))
    return Vocabulary(kind, tokens, frozenset(added))


@dataclass(frozen=True)
class NewToken:
    """A token the union adds: its string, output id and the model it comes from."""

    token: str
    id: int
    model: int


def union(
    template: Vocabulary, others: Sequence[tuple[int, Vocabulary]]
) -> tuple[dict[str, int], list[NewToken]]:
    """The template's ids unchanged, then each other model's missing tokens in id order."""
    tokens = dict(template.tokens)
    next_id = template.size
    new = []
    for model, vocab in others:
        for token, _ in sorted(vocab.tokens.items(), key=lambda item: item[1]):
            if token not in tokens:
                tokens[token] = next_id
                new.append(NewToken(token, next_id, model))
                next_id += 1
    return tokens, new


def row_map(
    out_tokens: Mapping[str, int], rows: int, vocab: Vocabulary | None, model_rows: int
) -> np.ndarray:
    """For each of `rows` output rows, the row of a model holding the same token, else -1.
    Without a vocabulary the model's rows are taken position for position."""
    out = np.full(rows, -1, dtype=np.int64)
    if vocab is None:
        count = min(rows, model_rows)
        out[:count] = np.arange(count)
        return out
    for token, index in out_tokens.items():
        source = vocab.tokens.get(token)
        if index < rows and source is not None and source < model_rows:
            out[index] = source
    tokenizer_size = max(out_tokens.values(), default=-1) + 1
    pad = np.arange(max(tokenizer_size, vocab.size), min(rows, model_rows))
    out[pad] = pad
    return out


@dataclass(frozen=True)
class VocabPlan:
    """How embedding and head rows are re-indexed for one merge.

    `maps[m]` is the row map of model `m` (plan model index). A model lacking a row is left
    out of that row's merge, unless `fill` names a model whose row stands in (the base, for
    `tokenizer_source: base`). `overrides` give rows from the `tokenizer.tokens` block: out
    row -> (model or None for a zero row, that model's row); `forced` rows take the override
    as the result, the others use it in place of missing rows. `padding` = (first padding
    row, token rows): rows added by `pad_to_multiple_of` take, in each model, the mean of
    that model's token rows, a row it lacks standing in as the plain mean of the models that
    have it (as mergekit does, after Hewitt's vocabulary-expansion advice).
    """

    rows: int
    tokens: Mapping[str, int]
    maps: Mapping[int, np.ndarray] = field(compare=False)
    fill: int | None = None
    overrides: Mapping[int, tuple[int | None, int]] = field(default_factory=dict)
    forced: frozenset[int] = frozenset()
    new_tokens: tuple[NewToken, ...] = ()
    padding: tuple[int, int] | None = None


def padded(rows: int, multiple: int | None) -> int:
    """`rows` rounded up to a multiple of `multiple` (unchanged without one)."""
    return rows if not multiple else -(-rows // multiple) * multiple


def union_document(
    template: Mapping[str, Any], documents: Mapping[int, Mapping[str, Any]], new: Sequence[NewToken]
) -> dict[str, Any]:
    """The template's `tokenizer.json` with the union's new tokens appended. Every new token
    goes into the model vocabulary at its id (so the tokenizers library keeps the id); added
    tokens are also listed in `added_tokens` with their flags; BPE gets the source's merges
    that build new tokens (after the
    template's own merges, so text the template tokenized before keeps its tokens unless a
    new token applies)."""
    out = copy.deepcopy(dict(template))
    model = out["model"]
    merges = model.get("merges")
    known = set(parse_tokenizer(template).tokens)
    for item in new:
        source = documents[item.model]
        entry = next(
            (a for a in source.get("added_tokens") or [] if a["content"] == item.token), None
        )
        known.add(item.token)
        if entry is not None:
            out.setdefault("added_tokens", []).append({**entry, "id": item.id})
        if model["type"] == "Unigram":
            score = next((s for p, s in source["model"]["vocab"] if p == item.token), 0.0)
            model["vocab"].append([item.token, score])
        else:
            model["vocab"][item.token] = item.id
    if isinstance(merges, list):
        have = {_merge_key(m) for m in merges}
        added = {item.token for item in new}
        for model_index in dict.fromkeys(item.model for item in new):
            for merge in documents[model_index]["model"].get("merges") or []:
                left, right = _merge_key(merge)
                if (left, right) not in have and left + right in added and {left, right} <= known:
                    merges.append(_like(merges, left, right))
                    have.add((left, right))
    return out


def _merge_key(merge: Any) -> tuple[str, str]:
    if isinstance(merge, str):
        left, right = merge.split(" ", 1)
        return left, right
    return str(merge[0]), str(merge[1])


def _like(merges: list[Any], left: str, right: str) -> Any:
    """A merge in the format the template uses (`"a b"` or `["a", "b"]`)."""
    if merges and isinstance(merges[0], str):
        return f"{left} {right}"
    return [left, right]
