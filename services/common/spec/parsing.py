"""Spec text to ``ExperimentSpec``: size, encoding and YAML shape checks, then validation
whose errors become ``InvalidArgument`` naming the dotted path of the offending key."""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from services.common.errors import InvalidArgument
from services.common.spec.experiment import ExperimentSpec
from services.common.spec.fields import _SUBKEY, MAX_DEPTH, MAX_SPEC_BYTES

__all__ = ["load_spec", "parse_spec", "spec_from_bytes"]


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "spec"


# pydantic error types that, on a bool input, mean a number was wanted.
_NUMBER_ERRORS = frozenset(
    {
        "int_type",
        "float_type",
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
    }
)


def _bool_as_number(raw: Any, validated: Any, path: tuple[int | str, ...] = ()) -> None:
    """InvalidArgument where the input had ``true``/``false`` and the spec kept a number.

    pydantic's lax mode turns ``true`` into 1 for int and float fields; walking the input beside
    the validated dump finds every such place, in nested settings too, without a strict type on
    each field (strict mode would also refuse the strings that name enums)."""
    stack = [(raw, validated, path)]
    while stack:
        r, v, p = stack.pop()
        if isinstance(r, bool):
            if not isinstance(v, bool):
                raise InvalidArgument(_loc(p), f"expected a number, got {str(r).lower()}")
        elif isinstance(r, dict) and isinstance(v, dict):
            stack.extend((r[k], v[k], (*p, k)) for k in r if isinstance(k, str) and k in v)
        elif isinstance(r, list) and isinstance(v, list | tuple) and len(r) == len(v):
            stack.extend((a, b, (*p, i)) for i, (a, b) in enumerate(zip(r, v, strict=True)))


def parse_spec(data: Any, source: str = "spec") -> ExperimentSpec:
    """Validate a parsed spec; InvalidArgument names the first bad key."""
    if not isinstance(data, dict):
        raise InvalidArgument(source, "the spec must be a mapping")
    try:
        spec = ExperimentSpec.model_validate(data)
    except RecursionError:
        raise InvalidArgument(source, f"nested deeper than {MAX_DEPTH} levels") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = _loc(tuple(p for p in first["loc"] if p not in ("function-after",)))
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown key"
        elif first["type"] in _NUMBER_ERRORS and isinstance(first.get("input"), bool):
            message = f"expected a number, got {str(first['input']).lower()}"
        if ": " in message and loc == "spec":
            loc, message = message.split(": ", 1)
        elif first["type"] == "value_error" and _SUBKEY.match(message):
            # A nested model's own check names its key first ("builtin: ...").
            key, message = message.split(": ", 1)
            loc = f"{loc}.{key}"
        raise InvalidArgument(loc, message) from None
    _bool_as_number(data, spec.model_dump(mode="python"))
    return spec


# libyaml when present: the pure-Python scanner takes seconds over a 256 KiB spec, and its
# composer recurses once per level (RecursionError on deep input); libyaml bounds nesting
# at 1000 levels itself. Either way _check_tree bounds it at MAX_DEPTH.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_tree(root: yaml.Node) -> None:
    """InvalidArgument for nesting deeper than ``MAX_DEPTH`` or a key given twice in one
    mapping (dotted path and both lines; YAML would silently keep the last)."""
    stack: list[tuple[yaml.Node, tuple[int | str, ...]]] = [(root, ())]
    seen_nodes: set[int] = set()  # aliases share nodes: each is walked once
    while stack:
        node, path = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if len(path) > MAX_DEPTH:
            line = node.start_mark.line + 1
            raise InvalidArgument("spec", f"nested deeper than {MAX_DEPTH} levels (line {line})")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, (*path, i)) for i, child in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            lines: dict[str, int] = {}
            for key_node, value_node in node.value:
                key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                if key_node.tag != "tag:yaml.org,2002:merge" and isinstance(
                    key_node, yaml.ScalarNode
                ):
                    line = key_node.start_mark.line + 1
                    if key in lines:
                        raise InvalidArgument(
                            _loc((*path, key)),
                            f"duplicate key (lines {lines[key]} and {line}); YAML would keep "
                            "only the last",
                        )
                    lines[key] = line
                stack.append((value_node, (*path, key)))


_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _decode(data: bytes, source: str) -> str:
    for bom, name in _WIDE_BOMS:
        if data.startswith(bom):
            raise InvalidArgument("spec", f"{source} is {name} text; save it as UTF-8")
    if b"\x00" in data:
        raise InvalidArgument(
            "spec",
            f"{source} has NUL bytes (UTF-16 or UTF-32 text, or not text); save it as UTF-8",
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            "spec",
            f"{source} is not UTF-8 text (byte {exc.start} is {data[exc.start : exc.start + 1]!r});"
            " save it as UTF-8",
        ) from None


def spec_from_bytes(data: bytes, source: str = "spec") -> ExperimentSpec:
    """Decode, parse and validate a YAML (or JSON) spec; every refusal is an InvalidArgument."""
    if len(data) > MAX_SPEC_BYTES:
        raise InvalidArgument(
            "spec",
            f"{source} is {len(data)} bytes, over the {MAX_SPEC_BYTES // 1024} KiB a spec may "
            "have; a spec names its data (trait, benchmark and calibration files) rather than "
            "holding it",
        )
    text = _decode(data, source)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_tree(node)
        tree = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as exc:
        if "maximum nesting depth" in str(exc):  # libyaml's own bound (1000 levels)
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise InvalidArgument("spec", f"nested deeper than {MAX_DEPTH} levels{where}") from None
        raise InvalidArgument("spec", f"{source} is not valid YAML: {exc}") from None
    except RecursionError:
        raise InvalidArgument("spec", f"{source} is nested too deeply") from None
    finally:
        loader.dispose()
    return parse_spec(tree, source)


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and validate a YAML spec file (see :func:`spec_from_bytes`)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            # One byte over the bound is enough to refuse, whatever the file's size.
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise InvalidArgument("spec", f"cannot read {p}: {exc.strerror}") from None
    return spec_from_bytes(data, str(p))
