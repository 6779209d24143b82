"""How a part's settings are described and checked: one dataclass per part, one field per option.

    @dataclass
    class GridConfig(GeometryConfig):
        resolution: int = option(64, "cells per axis", ge=2)

A field's type is enforced by OmegaConf when Hydra composes (the dataclass is the schema of its
YAML file: conf/geometry/grid.yaml starts with `- /schema/geometry/grid@_here_`). Its rule (`ge`,
`gt`, `le`, `lt`, `choices`, or a `rule` function for values OmegaConf cannot type, such as a
number-or-ramp) and a part's cross-field `check(node, where)` run in `check_node`, on the composed
config before anything loads, and again on what a stage merges. Every refusal is one line: the key,
the value, what is allowed, the fix. Constructors trust what they get.
"""
from __future__ import annotations

import copy
import difflib
import math
import typing
from dataclasses import MISSING, field, fields, is_dataclass
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

from text23d.errors import ConfigError


KINDS: dict[str, dict[str, type]] = {}  # group -> option -> schema (filled by text23d.schema)
OTHER_PARTS: list[type] = []  # parts outside those groups that are built from `_target_` (a camera …)


def option(default, help: str, *, choices: tuple | None = None, ge=None, gt=None, le=None, lt=None,
           rule: Callable | None = None, fix: str | None = None, allowed: str | None = None, part: bool = False):
    """A dataclass field with its help and its rule. `rule(value, key)` raises ConfigError for what
    the bounds cannot say; `allowed` says in words what a rule accepts (the config reference shows
    it); `fix` is the example a refusal suggests, "{key}=…" (default: the default); `part`: the value is another
    part's settings (a DMTet's colour field), checked by its own schema."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "rule": rule, "fix": fix,
            "allowed": allowed, "part": part}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    if is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def nested(cls, help: str):
    """A field that holds another part's settings (the export block of a run, ...)."""
    return field(default_factory=cls, metadata={"help": help})


def base_type(annotation) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of a field annotation such as `Optional[int]`."""
    hint = annotation  # the schema modules do not use `from __future__ import annotations`: real types
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Any), True
    return hint, False


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bounds(meta: dict) -> str:
    ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
    if ge is not None and le is not None:
        return f" in [{ge}, {le}]"
    if gt is not None and le is not None:
        return f" in ({gt}, {le}]"
    if ge is not None and lt is not None:
        return f" in [{ge}, {lt})"
    if gt is not None and lt is not None:
        return f" in ({gt}, {lt})"
    return "".join(f" {s} {v}" for s, v in (("≥", ge), (">", gt), ("≤", le), ("<", lt)) if v is not None)


def requirement(f) -> str:
    """What a field accepts, in words: 'an integer ≥ 1, or null', "one of ['sds', 'uniform']" …"""
    meta, (kind, optional) = f.metadata, base_type(f.type)
    if meta.get("allowed"):
        text = meta["allowed"]
    elif meta.get("choices"):
        text = f"one of {list(meta['choices'])}"
    elif kind is bool:
        text = "true or false"
    elif kind is int:
        text = "an integer" + _bounds(meta)
    elif kind is float:
        text = "a finite number" + _bounds(meta)
    elif kind is str:
        text = "text"
    else:
        text = "any value"
    return text + (", or null" if optional and not text.endswith("null") else "")


def example(f, key: str) -> str:
    """The fix a refusal suggests for a field: its `fix`, else `key=<default>`."""
    if f.metadata.get("fix"):
        return f.metadata["fix"].format(key=key)
    default = f.default if f.default is not MISSING else f.default_factory() if f.default_factory is not MISSING else None
    shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else \
        "[" + ",".join(str(v) for v in default) + "]" if isinstance(default, list) else default
    return f"{key}={shown}"


def refuse(f, key: str, value) -> ConfigError:
    """The one-line refusal of `value` for field `f` at `key`."""
    return ConfigError(f"{key}={value!r}: must be {requirement(f)}. Fix: e.g. {example(f, key)}")


def check_value(f, key: str, value) -> None:
    """The field's own rule on one value (its type too: a stage's merged settings are untyped)."""
    meta, (kind, optional) = f.metadata, base_type(f.type)
    if value is None:
        if not optional and kind is not Any:
            raise refuse(f, key, value)
        return
    if meta.get("rule"):
        meta["rule"](value, key)
        return
    if meta.get("choices") is not None:
        if value not in meta["choices"]:
            close = difflib.get_close_matches(str(value), [str(c) for c in meta["choices"]], n=1)
            fix = f"{key}={close[0]}" if close else example(f, key)
            raise ConfigError(f"{key}={value!r}: allowed are {list(meta['choices'])}. Fix: e.g. {fix}")
        return
    ok = {bool: lambda v: isinstance(v, bool), int: _is_int, float: _is_number, str: lambda v: isinstance(v, str)}
    if kind in ok and not ok[kind](value):
        raise refuse(f, key, value)
    if kind in (int, float):
        ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
        if (ge is not None and value < ge) or (gt is not None and value <= gt) or \
                (le is not None and value > le) or (lt is not None and value >= lt):
            raise refuse(f, key, value)


def check_node(node, schema, where: str, known_extra: tuple = ()) -> None:
    """Every field of `schema` in `node` (a part's settings, typed or merged), then the part's own
    cross-field `check`; a key the schema does not have is refused with the closest one."""
    if node is None:
        return
    names = {f.name: f for f in fields(schema)}
    unknown = [] if getattr(schema, "extra_keys_ok", False) else [k for k in node if k not in names and k not in known_extra]
    if unknown:
        at = f"{where}." if where else ""
        close = difflib.get_close_matches(str(unknown[0]), list(names), n=1)
        keys = ", ".join(n for n in names if n != "_target_")
        fix = f"did you mean {at}{close[0]}?" if close else "drop it"
        raise ConfigError(f"{at}{unknown[0]}: no such setting ({schema.__name__} has {keys}). Fix: {fix}")
    for name, f in names.items():
        if name not in node or (isinstance(node, DictConfig) and OmegaConf.is_missing(node, name)):
            continue
        key, kind, value = f"{where}.{name}" if where else name, base_type(f.type)[0], node[name]
        if is_dataclass(kind) and value is not None:
            check_node(value, kind, key)  # a nested block (the run's export settings …)
        elif f.metadata.get("part") and value is not None:
            check_part(value, key)
        else:
            check_value(f, key, _plain(value))
    if hasattr(schema, "check"):
        schema.check(node, where)


def by_target() -> dict[str, type]:
    """Every part's schema by the class it builds (its `_target_` default)."""
    parts = [cls for kinds in KINDS.values() for cls in kinds.values()] + OTHER_PARTS
    return {cls.__dataclass_fields__["_target_"].default: cls for cls in parts}


def check_part(node, where: str) -> None:
    """A part's settings (a geometry, renderer, guidance …), by the class it builds."""
    if node is None:
        return
    target = node.get("_target_")
    schema = by_target().get(target)
    if schema is None:
        group = where.rsplit(".", 1)[-1]
        known = sorted(t for t, cls in by_target().items() if cls in KINDS.get(group, {}).values()) or sorted(by_target())
        raise ConfigError(f"{where}._target_={target!r}: no {group} with that class has a schema. Fix: one of {known}, "
                          "or register yours (text23d.schema.add_kind)")
    check_node(node, schema, where)


def _plain(value):
    """A config value as Python data (lists and dicts), for the rules."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def as_list(value) -> list | None:
    return list(value) if isinstance(value, (list, tuple, ListConfig)) else None


def is_ramp(value) -> bool:
    items = as_list(value)
    return items is not None and len(items) == 4 and all(_is_number(v) for v in items)


def number_or_ramp(value, key: str, what: str = "a finite number", low=None,
                   examples: tuple = ("1.0", "[0,10.0,1000.0,5000]")) -> None:
    """A loss weight or a schedule: a number, or a ramp [start_step, start_value, end_value, end_step]
    with 0 ≤ start_step ≤ end_step (systems/losses.py)."""
    if _is_number(value) and (low is None or value >= low):
        return
    items = as_list(value)
    if items is None or not is_ramp(items):
        raise ConfigError(f"{key}={items if items is not None else value!r}: {what} or a ramp [start_step, start_value, "
                          f"end_value, end_step]. Fix: e.g. {key}={examples[0]} or {key}={examples[1]}")
    start, v0, v1, end = items
    if start < 0 or end < start:
        fix = f"[{end},{v1},{v0},{start}]" if end >= 0 else examples[1]
        raise ConfigError(f"{key}={items}: a ramp's steps must be in order, 0 ≤ start_step ≤ end_step (here "
                          f"{start} then {end}). Fix: the earlier step first, e.g. {key}={fix}")


def value_range(low: float, high: float):
    """A rule for a [min, max] pair within [low, high] (camera ranges)."""
    def rule(value, key: str) -> None:
        items = as_list(value)
        if items is None or len(items) != 2 or not all(_is_number(v) for v in items) \
                or not low <= items[0] <= items[1] <= high:
            lo, hi = (sorted(items) if items and len(items) == 2 and all(_is_number(v) for v in items) else (low, high))
            raise ConfigError(f"{key}={items if items is not None else value!r} is not a valid [min, max] range within "
                              f"[{low}, {high}]. Fix: e.g. {key}=[{max(lo, low)},{min(hi, high)}]")
    return rule
