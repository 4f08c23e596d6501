"""The layer hierarchy: dotted module names (``layer1.0.conv1``) as a tree of stage → block → layer, in forward
order. One builder, ``layer_tree``; the network view's collapsible columns and the explorer's index
(``analysis.explorer.build_tree``) are both read off it."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable


def relative_parts(names: list[str]) -> list[list[str]]:
    """Dotted names without their common prefix (``net.conv1`` → ``conv1`` when every name starts with ``net.``)."""
    parts = [n.split(".") for n in names]
    if not parts:
        return []
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return [p[common:] for p in parts]


class TreeNode:
    """One dotted prefix: its parts, its children by next part, and the monitored layers below it."""

    def __init__(self, path: tuple[str, ...]) -> None:
        self.path = path
        self.children: OrderedDict[str, TreeNode] = OrderedDict()
        self.layers: list[str] = []       # monitored layer names below this node, forward order

    @property
    def id(self) -> str:
        return ".".join(self.path)

    @property
    def is_leaf(self) -> bool:
        return not self.children


def layer_tree(names: list[str], strip_common: bool = True) -> TreeNode:
    """stage → block → layer, from dotted module names, in forward order. Node ids are relative to the names'
    common prefix unless ``strip_common`` is False (then they are the full dotted prefixes)."""
    root = TreeNode(())
    for name, parts in zip(names, relative_parts(names) if strip_common else [n.split(".") for n in names]):
        node = root
        node.layers.append(name)
        for i, part in enumerate(parts):
            node = node.children.setdefault(part, TreeNode(tuple(parts[:i + 1])))
            node.layers.append(name)
    return root


def expandable_groups(names: list[str]) -> list[str]:
    """Ids of every node holding more than one layer (the root ``""`` first): all of them expanded shows every
    layer as its own column."""
    out = []

    def walk(node: TreeNode) -> None:
        out.append(node.id)
        for child in node.children.values():
            if len(child.layers) > 1:
                walk(child)

    walk(layer_tree(names))
    return out


def group_ancestors(group: str) -> set[str]:
    """A node id and the ids of every node above it, the root ``""`` included."""
    parts = group.split(".")
    return {".".join(parts[:i]) for i in range(len(parts) + 1)}


def default_expanded(names: list[str], max_columns: int = 12) -> list[str]:
    """Expand the tree breadth-first while the number of columns stays within ``max_columns``."""
    root = layer_tree(names)
    expanded = {""}
    frontier = [root]
    while frontier:
        nxt = []
        for node in frontier:
            for child in node.children.values():
                if len(child.layers) > 1:
                    nxt.append(child)
        trial = expanded | {n.id for n in nxt}
        if not nxt or len(visible_columns(names, trial)) > max_columns:
            break
        expanded = trial
        frontier = nxt
    return sorted(expanded)


def visible_columns(names: list[str], expanded: Iterable[str]) -> list[dict[str, Any]]:
    """Columns left to right: a leaf layer (``kind`` "layer", one node per filter) or a collapsed group (``kind``
    "group", one node per layer inside)."""
    expanded = set(expanded)
    root = layer_tree(names)
    rel = {n: ".".join(p) for n, p in zip(names, relative_parts(names))}
    columns: list[dict[str, Any]] = []

    def walk(node: TreeNode) -> None:
        for child in node.children.values():
            if len(child.layers) == 1:
                # a leaf, or a chain holding one layer (``downsample.0``): a filter column named in full
                columns.append({"id": rel[child.layers[0]], "kind": "layer", "label": rel[child.layers[0]],
                                "layers": [child.layers[0]]})
            elif child.id in expanded:
                walk(child)
            else:
                columns.append({"id": child.id, "kind": "group", "label": child.id + " ▸", "layers": child.layers})

    if root.is_leaf:
        return columns
    walk(root)
    # forward order of the first layer in each column
    order = {n: i for i, n in enumerate(names)}
    columns.sort(key=lambda c: order[c["layers"][0]])
    return columns
