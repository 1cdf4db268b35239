"""Find layer stacks and indices from tensor names, with no per-architecture table.

A layer tensor has a component `<stack>.<N>.` where `<stack>` is one of the names used by
transformers models (`layers`, `h`, `blocks`, `block`, `layer`); the first such component in
the name is the layer index (so `encoder.block.3.layer.1.x` is layer 3 of `encoder.block`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LAYER = re.compile(r"(?:^|\.)(layers|layer|h|blocks|block)\.(\d+)\.")
_EMBED = re.compile(
    r"embed|(?:^|\.)wte\.|(?:^|\.)wpe\.|word_embeddings|position_embeddings|token_type"
)
_VISION = re.compile(r"vision|visual")
_HEAD = re.compile(r"(?:^|\.)(?:lm_head|embed_out)\.")


@dataclass(frozen=True)
class LayerName:
    """A layer tensor name split into stack prefix, index and the rest."""

    stack: str
    index: int
    rest: str

    def with_index(self, index: int, stack: str | None = None) -> str:
        """The same tensor in another layer (optionally of another stack prefix)."""
        return f"{stack or self.stack}.{index}.{self.rest}"


def split_layer(name: str) -> LayerName | None:
    """`model.layers.3.mlp.up_proj.weight` -> (`model.layers`, 3, `mlp.up_proj.weight`)."""
    match = _LAYER.search(name)
    if match is None:
        return None
    return LayerName(name[: match.end(1)], int(match.group(2)), name[match.end() :])


def is_pre_layer(name: str) -> bool:
    """Non-layer tensors that come before the layers (embeddings); the rest (final norms,
    heads such as `lm_head` or GPT-NeoX's `embed_out`, projectors) come after."""
    return bool(_EMBED.search(name)) and not _HEAD.search(name)


def main_stack(names: list[str], config_depth: int | None = None) -> str | None:
    """The stack slices reshape: the text model's layers. Vision stacks (`vision`, `visual`)
    count only when there is nothing else; among the rest, stacks as deep as the config's
    layer count come first, then the deepest, then a `decoder` stack (T5)."""
    counts = layer_counts(names)
    text = {s: n for s, n in counts.items() if not _VISION.search(s)} or counts
    if not text:
        return None
    return max(text, key=lambda s: (text[s] == config_depth, text[s], "decoder" in s))


def layer_counts(names: list[str]) -> dict[str, int]:
    """Number of layers (max index + 1) of each stack found in `names`."""
    counts: dict[str, int] = {}
    for name in names:
        split = split_layer(name)
        if split is not None:
            counts[split.stack] = max(counts.get(split.stack, 0), split.index + 1)
    return counts


def layer_rests(names: list[str], stack: str | None) -> dict[int, tuple[str, ...]]:
    """The names within each layer of `stack` (`self_attn.q_proj.weight`, ...), by layer
    index, in the order of `names` (one pass)."""
    found: dict[int, list[str]] = {}
    for name in names:
        split = split_layer(name)
        if split is not None and split.stack == stack:
            found.setdefault(split.index, []).append(split.rest)
    return {index: tuple(rests) for index, rests in found.items()}
