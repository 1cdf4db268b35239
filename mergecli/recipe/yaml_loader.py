"""The one YAML reader for recipes: `yaml.SafeLoader` (no object is ever constructed from
a tag) bounded against hostile text: aliases may not expand the document past
MAX_NODES values ("billion laughs"), nesting stops at MAX_DEPTH, and a key given twice
in one mapping is an error instead of silently keeping the last value."""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, SequenceNode

MAX_NODES = 100_000
MAX_DEPTH = 64


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts the document's values with aliases expanded, caps the
    nesting depth and refuses duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        """Compose as SafeLoader does, counting expanded values and depth."""
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise ConstructorError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node is not None:
            self._count(node)
        return node

    def _count(self, node: Node) -> None:
        """Record the value's size with aliases expanded (an alias returns a node already
        sized: it counts in its parent's size)."""
        if id(node) in self._sizes:
            return
        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            children = [part for pair in node.value for part in pair]
        size = 1 + sum(self._sizes[id(child)] for child in children)
        self._sizes[id(node)] = size
        if size > MAX_NODES:
            raise ConstructorError(
                None,
                None,
                f"the recipe expands to more than {MAX_NODES} values (YAML aliases?)",
                node.start_mark,
            )

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        """SafeLoader's mapping, refusing a key given twice."""
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # an unhashable key: SafeLoader's own error follows
            if duplicate:
                raise ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"key `{key}` is given twice (YAML would keep only the last value)",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]


def load(text: str) -> Any:
    """The recipe document of `text`, bounded (see the module doc)."""
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
