"""Reading YAML that nobody vetted: spec and sweep files, and `a.b=c` override values.

Every way a document can go wrong ends in one `SpecError` line, before anything is built:

- the file is missing, a directory, unreadable, over `MAX_BYTES`, or not UTF-8;
- the YAML is malformed, or uses a tag the safe loader does not construct (`!!python/...`);
- a mapping repeats a key (`yaml.safe_load` silently keeps the last one);
- it nests deeper than `MAX_DEPTH`, or its aliases expand to more than `MAX_NODES` nodes
  (a "billion laughs" document is a few hundred bytes that expand to 10⁹ nodes), or an
  alias refers to its own anchor.

The limits are far above any real spec (one is ~50 nodes, 4 levels deep, a few KB) and keep
the pure-Python parser's worst case well under a second. The loader is pure Python on
purpose: its composer is where nesting and aliases can be counted as they are read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_BYTES = 64 * 1024    # a spec or sweep file; the examples are under 2 KB
MAX_OVERRIDE = 4096      # one override's value, in characters
MAX_DEPTH = 20           # nesting levels, aliases expanded; a spec has 4, a sweep with inline bases 6
MAX_NODES = 10_000       # scalars, lists and mappings, aliases expanded
CLIP = 80                # characters of an input value echoed in a message

_MERGE = "tag:yaml.org,2002:merge"


class SpecError(ValueError):
    """A spec is invalid; the message is one line naming the field and what is allowed."""


def clip(value: Any, limit: int = CLIP) -> str:
    """`repr(value)`, cut to `limit` characters: messages never echo a huge input whole.
    The repr of a huge container is never built: only its first few items are."""
    if isinstance(value, (list, tuple, set, frozenset)) and len(value) > limit:
        value = [*list(value)[:limit], ...]
    elif isinstance(value, dict) and len(value) > limit:
        value = dict(list(value.items())[:limit])
    elif isinstance(value, (str, bytes)) and len(value) > limit:
        value = value[:limit]
    if isinstance(value, int) and value.bit_length() > 256:  # repr of a 5000-digit int raises
        return f"<a {value.bit_length()}-bit integer>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def dotted(loc: tuple | list) -> str:
    """A location as a dotted field path; a part that is not a short printable name is clipped."""
    parts = [str(p) for p in loc]
    return ".".join(p if 0 < len(p) <= 64 and p.isprintable() and p.strip() == p else clip(p) for p in parts)


def _where(node: Node) -> str:
    return f"line {node.start_mark.line + 1}"


class _LimitError(yaml.YAMLError):
    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts nesting while composing, refuses duplicate keys, and sizes the
    document with its aliases expanded before constructing anything."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _LimitError(f"nested deeper than {MAX_DEPTH} levels "
                                  f"(line {self.peek_event().start_mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: Node) -> Any:
        _size(node, 1, {}, set())
        return super().construct_document(node)

    def construct_mapping(self, node: Node, deep: bool = False) -> Any:
        first: dict[Any, int] = {}
        if isinstance(node, MappingNode):
            for key_node, _ in node.value:
                if key_node.tag == _MERGE or not isinstance(key_node, ScalarNode):
                    continue  # `<<:` merges may be overridden; a non-scalar key is refused by the base
                key = self.construct_object(key_node)
                if key in first:
                    raise _LimitError(f"duplicate key {clip(key)} at {_where(key_node)} "
                                      f"(first at line {first[key] + 1})")
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _size(node: Node, depth: int, done: dict[int, tuple[int, int]], path: set[int]) -> tuple[int, int]:
    """(nodes, height) of `node` with aliases expanded; shared nodes are measured once."""
    if id(node) in done:
        count, height = done[id(node)]
    else:
        if id(node) in path:
            raise _LimitError(f"an alias refers to its own anchor ({_where(node)})")
        if depth > MAX_DEPTH:
            raise _LimitError(f"nested deeper than {MAX_DEPTH} levels once aliases are expanded ({_where(node)})")
        path.add(id(node))
        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        count, height = 1, 1
        for child in children:
            c, h = _size(child, depth + 1, done, path)
            count, height = count + c, max(height, h + 1)
            if count > MAX_NODES:
                raise _LimitError(f"more than {MAX_NODES:,} nodes once aliases are expanded "
                                  f"(an alias bomb?) ({_where(node)})")
        path.discard(id(node))
        done[id(node)] = count, height
    if depth - 1 + height > MAX_DEPTH:
        raise _LimitError(f"nested deeper than {MAX_DEPTH} levels once aliases are expanded ({_where(node)})")
    return count, height


def _problem(err: Exception) -> str:
    if isinstance(err, _LimitError):
        return err.problem
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        what = err.problem or err.context or type(err).__name__
        return f"not valid YAML: {what}" + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark else "")
    return f"not valid YAML: {' '.join(str(err).split())[:200]}"


def parse(text: str, where: str) -> Any:
    """One YAML document from `text`; `where` starts the error line (a path or a field)."""
    try:
        return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise SpecError(f"{where}: {_problem(err)}") from None
    except (ValueError, OverflowError) as err:  # an int literal past Python's 4300-digit limit
        what = "an integer literal of more than 4300 digits" if "digits" in str(err) else str(err).split(";")[0]
        raise SpecError(f"{where}: not valid YAML: {what}") from None


def read(path: str | Path, what: str = "spec") -> Any:
    """The YAML document in the file at `path`, within the limits above."""
    path = Path(path)
    try:
        if path.is_dir():
            raise SpecError(f"{path}: is a directory, not a {what} file")
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)  # never more, whatever the file (a FIFO, /dev/zero) claims
    except FileNotFoundError:
        raise SpecError(f"{path}: no such {what} file") from None
    except OSError as err:
        raise SpecError(f"{path}: cannot read the {what} file ({err.strerror or type(err).__name__})") from None
    if len(data) > MAX_BYTES:
        raise SpecError(f"{path}: a {what} file is at most {MAX_BYTES // 1024} KiB; this one is larger")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise SpecError(f"{path}: not UTF-8 (byte 0x{data[err.start]:02x} at line {line}); "
                        f"save the file as UTF-8") from None
    return parse(text, str(path))


def parse_value(text: str, field: str) -> Any:
    """An override's value, parsed as YAML like the file it overrides."""
    if len(text) > MAX_OVERRIDE:
        raise SpecError(f"{field}: an override value is at most {MAX_OVERRIDE} characters, got {len(text):,}")
    return parse(text, field)


def plain(value: Any, depth: int = 0) -> Any:
    """A deep copy of YAML data that shares nothing: an alias becomes its own copy, so an
    override of `train.lr` never also changes a `retrain: *train` that aliased it."""
    if depth > 2 * MAX_DEPTH:
        raise SpecError(f"spec: nested deeper than {2 * MAX_DEPTH} levels")
    if isinstance(value, dict):
        return {k: plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    return value
