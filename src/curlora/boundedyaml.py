"""YAML read with bounds: a config file or a run directory's ``config.yaml`` may come from someone else.

PyYAML's safe loader composes nested nodes by recursion (a file nested 5,000 deep ends in a
RecursionError) and expands aliases without limit (a "billion laughs" file of a few lines becomes
billions of list items once the config is copied or saved). Here nesting is bounded while composing,
and the document as its aliases expand it is bounded in depth and size (and may not contain itself)
before any Python object is built. Aliases within the bounds stay: the benchmark configs share rate
grids with them.
"""

from __future__ import annotations

from typing import Any

import yaml

#: Deeper than any setting needs (the deepest, ``method_lrs``, is 4 with the document): a bound, not a style.
MAX_DEPTH = 16
#: Nodes of a document with its aliases expanded: configs hold hundreds.
MAX_NODES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """A SafeLoader that refuses nesting deeper than :data:`MAX_DEPTH` while it composes."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"found nesting deeper than {MAX_DEPTH} levels",
                                              self.peek_event().start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _expanded(node: yaml.Node, level: int, seen: dict[int, tuple[int, int]], path: set[int]) -> tuple[int, int]:
    """The number of nodes under ``node`` and their depth once aliases are expanded (a node shared by
    aliases counts at each use, measured once); refuses a depth past MAX_DEPTH from the document's top
    (``node`` is at ``level``) and a node that contains itself."""
    if id(node) in path:
        raise yaml.composer.ComposerError(None, None, "found an alias that contains itself", node.start_mark)
    if id(node) not in seen and level <= MAX_DEPTH:
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else [])
        path.add(id(node))
        measured = [_expanded(child, level + 1, seen, path) for child in children]
        path.discard(id(node))
        seen[id(node)] = (1 + sum(size for size, _ in measured), 1 + max((depth for _, depth in measured), default=0))
    if id(node) not in seen or level + seen[id(node)][1] - 1 > MAX_DEPTH:
        raise yaml.composer.ComposerError(None, None, f"found aliases that nest deeper than {MAX_DEPTH} levels",
                                          node.start_mark)
    return seen[id(node)]


def compose(text: str) -> tuple[Any, yaml.Node | None]:
    """The document in ``text`` and its node (None for an empty document: its line numbers); a
    yaml.YAMLError for bad syntax, or nesting or aliases past the bounds."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        size, _ = _expanded(node, 1, {}, set())
        if size > MAX_NODES:
            raise yaml.composer.ComposerError(None, None, f"found {size:,} values once aliases are expanded, "
                                              f"more than {MAX_NODES:,}", node.start_mark)
        return loader.construct_document(node), node
    finally:
        loader.dispose()


def describe(error: yaml.YAMLError, path: object) -> str:
    """A YAML error as one line naming ``path`` and, where known, the line and column (from 1): PyYAML's
    own message names only "<unicode string>"."""
    mark, context = getattr(error, "problem_mark", None), getattr(error, "context_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
    what = getattr(error, "problem", None) or str(error).replace("\n", " ")
    if context is not None and getattr(error, "context", None):
        what += f", {error.context} started at line {context.line + 1}, column {context.column + 1}"
    return f"{where}: not valid YAML ({what})"
