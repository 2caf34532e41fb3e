"""YAML from users (job configs, sweep files, `--set` values), read within limits.

`yaml.safe_load` builds no objects but trusts the size of what it reads: a multi-megabyte
string, or a "billion laughs" document whose nested aliases (`&a [*b, *b, ...]`) stand for
10^9 values once anything walks the result (flattening a config, logging it to MLflow). Here
a file over `MAX_BYTES` is refused before it is read, and a document that expands, aliases
followed, to more than `MAX_NODES` values is refused after parsing and before any Python object
is built; both in milliseconds, naming the file. Anchors and merge keys within the limits work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20  # 1 MiB: the shipped configs and sweeps are a few KB
MAX_NODES = 100_000  # values of a document with every alias expanded
# libyaml's parser when PyYAML has it (the wheels do): ~50x faster than the pure-Python one.
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_file(path: Path, what: str = "YAML file") -> Any:
    """The YAML document of `path`, within the limits.

    Args:
        path: the file.
        what: how messages name it, e.g. "config file".

    Raises:
        ValueError: too large, too many values once aliases are expanded, nested too deep, or
            not valid YAML; naming the file.
    """
    where = f"{what} {str(path)!r}"
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise ValueError(f"{where} is {size:,} bytes, over the limit of {MAX_BYTES:,}")
    return load_text(path.read_text(), where)


def load_text(text: str, where: str) -> Any:
    """The YAML document of `text`, within the limits (`where` names it in messages).

    Raises:
        ValueError: as `load_file`.
    """
    if len(text) > MAX_BYTES:
        raise ValueError(f"{where} is {len(text):,} characters, over the limit of {MAX_BYTES:,}")
    loader = LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = expanded_size(node)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if size > MAX_NODES:
            raise ValueError(
                f"{where} holds {size:,} values with its aliases expanded, over the limit of "
                f"{MAX_NODES:,}"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ValueError(f"{where} is not valid YAML: {err}") from err
    except RecursionError:
        raise ValueError(f"{where} is nested too deep") from None
    finally:
        loader.dispose()


def expanded_size(root: yaml.Node) -> int:
    """The number of values of a composed document with every alias followed.

    An alias is the same node object as its anchor, so sizes are counted once per node and
    reused: linear in the document, however large the expansion.

    Raises:
        ValueError: an alias inside its own anchor (a document that never ends).
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # entered, children not yet counted
    stack: list[yaml.Node] = [root]
    while stack:
        node = stack[-1]
        if id(node) in sizes:
            stack.pop()
            continue
        children = [] if isinstance(node, yaml.ScalarNode) else _children(node)
        if id(node) in open_nodes:  # second visit: its children are counted
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            open_nodes.discard(id(node))
            stack.pop()
            continue
        open_nodes.add(id(node))
        for child in children:
            if id(child) in open_nodes:
                raise ValueError("an alias refers to a value that contains it")
            if id(child) not in sizes:
                stack.append(child)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value)  # a SequenceNode
