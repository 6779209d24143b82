"""User text as Hydra override syntax: a prompt is taken literally, as typed.

Hydra parses every value of its command line (commas sweep, quotes group, `${...}` interpolates).
A prompt is not config syntax, so the CLI hands Hydra a quoted, escaped value that parses back to
exactly the text typed (`literal`), and in a multirun splits prompts at the commas outside quotes
itself (`split_prompts`).
"""
from __future__ import annotations

import re

from text23d.config import escape_interpolations
from text23d.errors import ConfigError


def hydra_quote(text: str) -> str:
    """A Hydra override value that parses back to exactly `text`: single-quoted, with quotes
    escaped and the backslashes that precede a quote (or the closing quote) doubled; Hydra keeps
    every other backslash as it is."""
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
    return f"'{text}'"


def literal(text: str) -> str:
    """Hydra override syntax for the literal string `text` (no interpolation, no parsing)."""
    return hydra_quote(escape_interpolations(text))


def split_prompts(value: str) -> list[str]:
    """A multirun prompt list: pieces separated by commas outside quotes. A piece wrapped in
    quotes is unquoted with Hydra's own rules (so it keeps its commas); other pieces are taken
    as typed, without the spaces around them."""
    pieces, start, quote, i = [], 0, None, 0
    while i < len(value):
        c = value[i]
        if quote:
            if c == "\\":
                i += 1  # an escaped character cannot close the quote
            elif c == quote:
                quote = None
        elif c in "'\"" and not value[start:i].strip():
            quote = c  # a quote opens only at the start of a piece
        elif c == ",":
            pieces.append(value[start:i])
            start = i + 1
        i += 1
    if quote:
        raise ConfigError(f"prompt={value!r}: a quote ({quote}) is not closed. Fix: close it, or drop "
                          "the quotes (in -m, quotes only keep a prompt's commas together)")
    pieces.append(value[start:])
    return [unquote(p.strip()) for p in pieces]


def unquote(piece: str) -> str:
    """A piece wrapped in quotes, read as Hydra reads a quoted value; any other piece as it is."""
    if len(piece) >= 2 and piece[0] == piece[-1] and piece[0] in "'\"":
        from hydra.core.override_parser.overrides_parser import OverridesParser

        return str(OverridesParser.create().parse_override(f"x={piece}").value())
    return piece
