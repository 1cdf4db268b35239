"""Decide the output vocabulary and how embedding/head rows are re-indexed (no file access).

When every merged model has the tokenizer of the output (same tokens, or byte-identical
tokenizer files) and the same number of embedding rows, nothing is re-indexed. Otherwise
rows are matched by token string, which needs each model's fast `tokenizer.json`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mergecli.errors import Problem
from mergecli.io.checkpoint import ModelInfo
from mergecli.model.tying import word_embedding
from mergecli.recipe.schema import ModelRef, ModelTokenSource, Recipe, ZeroTokenSource
from mergecli.vocab.tokens import NewToken, VocabPlan, Vocabulary, padded, row_map, union

NO_JSON_HINT = (
    "rows are matched by token string, which needs each model's fast tokenizer file; write it "
    "with `AutoTokenizer.from_pretrained(PATH).save_pretrained(PATH)`, or merge models that "
    "share one tokenizer"
)


@dataclass(frozen=True)
class TokenizerFacts:
    """What a model's tokenizer files say: its vocabulary (from `tokenizer.json`), else a
    digest of its other tokenizer files (SentencePiece, tiktoken, vocab.json), else nothing."""

    vocab: Vocabulary | None
    digest: str | None
    files: tuple[str, ...]


def _same(a: TokenizerFacts, b: TokenizerFacts) -> bool:
    if a.vocab is not None and b.vocab is not None:
        return a.vocab.tokens == b.vocab.tokens
    if a.vocab is None and b.vocab is None:
        return a.digest == b.digest
    return False


def _unknown(facts: TokenizerFacts) -> bool:
    """No tokenizer files at all: taken to share the output's vocabulary when its embedding
    has as many rows (rows are then matched by position)."""
    return facts.vocab is None and not facts.files


def source_model(recipe: Recipe, refs: Sequence[ModelRef], template: int) -> int:
    """The model whose tokenizer is the output's (the template for `base` and `union`)."""
    source = recipe.tokenizer.source if recipe.tokenizer else recipe.tokenizer_source
    return refs.index(source) if isinstance(source, ModelRef) else template


def plan_vocabulary(
    recipe: Recipe,
    refs: Sequence[ModelRef],
    models: Sequence[ModelInfo],
    template: int,
    used: Sequence[int],
    facts: Mapping[int, TokenizerFacts],
    where: Mapping[int, str],
) -> tuple[VocabPlan | None, list[Problem]]:
    """The re-indexing plan, None when no row needs to move, and the problems found."""
    block = recipe.tokenizer
    mode = block.source if block else (recipe.tokenizer_source or "base")
    src = source_model(recipe, refs, template)
    embeddings = {i: word_embedding(models[i]) for i in {*used, src}}
    if any(name is None for name in embeddings.values()):
        return None, []
    rows_of = {i: models[i].tensors[name].shape[0] for i, name in embeddings.items() if name}
    same_rows = {i for i in used if rows_of[i] == rows_of[src]}
    unknown = {i for i in same_rows if i != src and _unknown(facts[i])}
    differs = [
        i for i in used if i not in same_rows or not (_same(facts[i], facts[src]) or i in unknown)
    ]
    if block is None and not differs:
        return None, []
    needed = [i for i in dict.fromkeys([src, *used]) if i not in unknown]
    problems = _need_json(needed, models, facts, where)
    if problems:
        return None, problems
    source_vocab = facts[src].vocab
    assert source_vocab is not None
    new: tuple[NewToken, ...] = ()
    tokens: Mapping[str, int] = source_vocab.tokens
    if mode == "union":
        others = [(i, facts[i].vocab) for i in used if i != src]
        tokens, added = union(source_vocab, [(i, v) for i, v in others if v is not None])
        new = tuple(added)
    size = max(tokens.values(), default=-1) + 1
    unpadded = max(size, rows_of[src])
    rows = padded(unpadded, block.pad_to_multiple_of if block else None)
    padding = (unpadded, size) if rows > unpadded else None
    maps = {i: row_map(tokens, rows, facts[i].vocab, rows_of[i]) for i in rows_of}
    overrides, forced, problems = _overrides(recipe, refs, models, tokens, facts)
    fill = src if mode == "base" else None
    plan = VocabPlan(
        rows=rows,
        tokens=tokens,
        maps=maps,
        fill=fill,
        overrides=overrides,
        forced=forced,
        new_tokens=new,
        padding=padding,
    )
    return plan, problems


def _need_json(
    indices: Sequence[int],
    models: Sequence[ModelInfo],
    facts: Mapping[int, TokenizerFacts],
    where: Mapping[int, str],
) -> list[Problem]:
    problems = []
    kinds = {facts[i].vocab.kind for i in indices if facts[i].vocab is not None}  # type: ignore[union-attr]
    for i in indices:
        vocab = facts[i].vocab
        if vocab is None:
            found = ", ".join(facts[i].files) or "no tokenizer files"
            what = (
                "its tokenizer.json has no vocabulary mergecli reads (BPE, WordPiece, "
                "WordLevel or Unigram)"
                if "tokenizer.json" in facts[i].files
                else f"has no tokenizer.json (found: {found})"
            )
            problems.append(
                Problem(
                    where.get(i, "tokenizer_source"),
                    f"the vocabularies differ and {models[i].label} {what}",
                    NO_JSON_HINT,
                    code=4,
                )
            )
    if len(kinds) > 1:
        problems.append(
            Problem(
                "tokenizer_source",
                f"the models' tokenizers are of different kinds ({', '.join(sorted(kinds))}); "
                "their token strings do not match one to one",
                "merge models whose tokenizers share a kind (e.g. all byte-level BPE)",
                code=4,
            )
        )
    return problems


def _overrides(
    recipe: Recipe,
    refs: Sequence[ModelRef],
    models: Sequence[ModelInfo],
    tokens: Mapping[str, int],
    facts: Mapping[int, TokenizerFacts],
) -> tuple[dict[int, tuple[int | None, int]], frozenset[int], list[Problem]]:
    """Rows set by the `tokenizer.tokens` block, checked against the vocabularies."""
    block = recipe.tokenizer
    out: dict[int, tuple[int | None, int]] = {}
    forced: set[int] = set()
    problems: list[Problem] = []
    for token, entry in (block.tokens or {}).items() if block else []:
        where = f"tokenizer.tokens[{token!r}]"
        row = tokens.get(token)
        if row is None:
            problems.append(
                Problem(where, f"token {token!r} is not in the output vocabulary", _VOCAB_HINT)
            )
            continue
        source = entry.source
        if source is None:
            if entry.force:
                problems.append(Problem(where, "`force: true` needs a `source`", _SOURCE_HINT))
            continue
        picked = _token_row(source, token, refs, models, facts, where)
        if isinstance(picked, Problem):
            problems.append(picked)
            continue
        out[row] = picked
        if entry.force:
            forced.add(row)
    return out, frozenset(forced), problems


_VOCAB_HINT = "list tokens of the output tokenizer (`tokenizer.source`)"
_SOURCE_HINT = "give `source: MODEL`, `source: {kind: zero}` or `source: {kind: model_token, model: MODEL, token: TOKEN}`"


def _token_row(
    source: object,
    token: str,
    refs: Sequence[ModelRef],
    models: Sequence[ModelInfo],
    facts: Mapping[int, TokenizerFacts],
    where: str,
) -> tuple[int | None, int] | Problem:
    if isinstance(source, ZeroTokenSource):
        return (None, 0)
    if isinstance(source, ModelTokenSource):
        model, wanted = (
            refs.index(source.model),
            source.token if source.token is not None else token,
        )
        explicit = source.token_id
    else:
        assert isinstance(source, ModelRef)
        model, wanted, explicit = refs.index(source), token, None
    name = word_embedding(models[model])
    rows = models[model].tensors[name].shape[0] if name else 0
    vocab = facts[model].vocab
    row = explicit if explicit is not None else (vocab.tokens.get(wanted) if vocab else None)
    if row is None or not 0 <= row < rows:
        what = f"token id {explicit}" if explicit is not None else f"token {wanted!r}"
        return Problem(
            where, f"{models[model].label} has no embedding row for {what}", _SOURCE_HINT, code=4
        )
    return (model, row)
