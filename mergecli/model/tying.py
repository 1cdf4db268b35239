"""Tied input embeddings and output heads, found from configs and tensor names.

A model's *effective head* is its head tensor (`lm_head.weight`, GPT-NeoX `embed_out.weight`,
BERT `cls.predictions.decoder.weight`, ...), or its word-embedding matrix when the config
ties them (`tie_word_embeddings`, in `text_config` for multimodal models). The rule:

- every merged model tied: the output is tied and no head tensor is written (a head stored
  as a duplicate of the embedding is dropped, so shared tensors are written once);
- any merged model untied: the output is untied (`tie_word_embeddings: false`) and its head
  is the merge of the effective heads (a tied model contributes its embedding matrix).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mergecli.io.checkpoint import ModelInfo
from mergecli.model.layers import is_pre_layer, split_layer

_WORD_EMBEDDING = re.compile(
    r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in|tok_embeddings|shared)\.weight$"
)
TIE_KEY = "tie_word_embeddings"


def word_embedding(model: ModelInfo) -> str | None:
    """Name of the input word-embedding matrix (outside the layers), if there is one."""
    for name, info in model.tensors.items():
        if len(info.shape) == 2 and split_layer(name) is None and _WORD_EMBEDDING.search(name):
            return name
    return None


def tie_flag(config: dict[str, Any]) -> bool | None:
    """`tie_word_embeddings` of the text model (`text_config` first), None when not set."""
    text = config.get("text_config")
    if isinstance(text, dict) and isinstance(text.get(TIE_KEY), bool):
        return bool(text[TIE_KEY])
    value = config.get(TIE_KEY)
    return value if isinstance(value, bool) else None


@dataclass(frozen=True)
class Tying:
    """Head names and, per model (indexed like the plan's models), whether it is tied."""

    heads: tuple[str, ...]
    tied: dict[int, bool]
    embeddings: dict[int, str | None]

    @property
    def out_tied(self) -> bool:
        """True when every merged model is tied (so is the output)."""
        return all(self.tied.values())

    def name_in(self, model: int, name: str) -> str:
        """The tensor that holds `name` in `model`: its embedding for the head of a tied one."""
        embedding = self.embeddings.get(model)
        if name in self.heads and self.tied.get(model) and embedding is not None:
            return embedding
        return name


def find_tying(models: Sequence[ModelInfo], used: Sequence[int]) -> Tying:
    """Detect heads and tying among the models at indices `used`."""
    embeddings = {i: word_embedding(models[i]) for i in used}
    heads: dict[str, None] = {}
    for i in used:
        embedding = embeddings[i]
        if embedding is None:
            continue
        shape = models[i].tensors[embedding].shape
        for j in used:
            for name, info in models[j].tensors.items():
                if (
                    name != embedding
                    and info.shape == shape
                    and split_layer(name) is None
                    and not is_pre_layer(name)
                ):
                    heads[name] = None
    tied = {}
    for i in used:
        flag = tie_flag(models[i].config)
        has_head = any(h in models[i].tensors for h in heads)
        tied[i] = embeddings[i] is not None and (not has_head if flag is None else flag)
    return Tying(tuple(heads), tied, embeddings)


def set_untied(config: dict[str, Any]) -> None:
    """Mark `config` untied wherever it sets the flag (top level and `text_config`)."""
    text = config.get("text_config")
    targets = [c for c in (config, text) if isinstance(c, dict) and TIE_KEY in c]
    if not targets:
        targets = [text if isinstance(text, dict) else config]
    for target in targets:
        target[TIE_KEY] = False
