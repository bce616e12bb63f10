"""The prompt grammar: ``<name>`` uses a concept, ``<name:8>`` sets its rank inline.

Names follow the registry's one pattern (``names.py``). Ranks are checked in one place,
:func:`resolve_ranks`, against each concept's own maximum.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import BadInput
from ..method.mapper_config import check_rank  # the one rank rule (re-exported: prompts resolve ranks)
from ..names import NAME_PATTERN

CONCEPT_REF = re.compile(rf"<({NAME_PATTERN})(?::(\d+))?>")


@dataclass
class ParsedPrompt:
    """A prompt with ``<name>`` / ``<name:rank>`` references resolved to ``<name>`` tokens."""

    text: str
    ranks: dict[str, int | None]  # concept name -> inline rank (None: use the default)


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Find the concepts of ``prompt``; ``<name:8>`` sets that concept's rank inline.

    Every ``<`` followed by a letter, a digit or ``>`` opens a concept reference; anything that
    opens one and is not ``<name>`` or ``<name:rank>`` is an error that says what is wrong, so a
    mistyped reference never renders silently without its concept.
    """
    from .loras import strip_lora_tags

    prompt, _ = strip_lora_tags(prompt)  # <lora:name:0.8> tags are the render's LoRAs (loras.py), not text
    for span in _reference_spans(prompt):
        if not CONCEPT_REF.fullmatch(span):
            raise BadInput(_what_is_wrong(span))
    ranks: dict[str, int | None] = {}

    def replace(match: re.Match) -> str:
        name, rank = match.group(1), match.group(2)
        if rank is not None and len(rank.lstrip("0")) > 18:  # int() refuses 4300+ digits; no rank is this large
            raise BadInput(f"<{name}:{rank[:12]}…> gives a rank of {len(rank)} digits; a rank is 1 up to the "
                           "concept's maximum (128 for concepts trained by stc)")
        value = int(rank) if rank is not None else None
        if name in ranks and value is not None and ranks[name] not in (None, value):
            raise BadInput(f"<{name}> is given two different ranks ({ranks[name]} and {value}) in one prompt")
        if value is not None or name not in ranks:
            ranks[name] = value
        return f"<{name}>"

    return ParsedPrompt(text=CONCEPT_REF.sub(replace, prompt), ranks=ranks)


def _opens_reference(prompt: str, index: int) -> bool:
    following = prompt[index + 1 : index + 2]
    return (following.isascii() and following.isalnum()) or following == ">"


def _reference_spans(prompt: str) -> list[str]:
    """Every ``<…>`` that opens a concept reference; a '<' that opens one and does not close before
    the next such '<' is refused (its concept would be silently lost)."""
    spans, opened = [], None
    for index, char in enumerate(prompt):
        if char == "<" and _opens_reference(prompt, index):
            if opened is not None:
                break  # a second '<' before the first one closed
            opened = index
        elif char == ">" and opened is not None:
            spans.append(prompt[opened : index + 1])
            opened = None
    if opened is not None:
        raise BadInput(
            f"unbalanced '<' in the prompt at {prompt[opened : opened + 24]!r}: write <name> (closed with '>') "
            "to use a concept, or drop the '<'"
        )
    return spans


def _what_is_wrong(span: str) -> str:
    """Why ``span`` (``<…>``) is not a concept reference, as an error message."""
    shown = span if len(span) <= 40 else span[:39] + "…"
    inner = span[1:-1]
    if not inner:
        return "<> names no concept: write <name> (or <name:8> for a rank) to use one, or drop the brackets"
    name, colon, rank = inner.partition(":")
    if name.lower() != name and re.fullmatch(NAME_PATTERN, name.lower()):
        return f"concept names are lower-case: write <{name.lower()}{colon}{rank}>, not {shown}"
    if colon and name.lower() == "lora":
        return f"{shown} is not a LoRA tag stc reads: write <lora:NAME> or <lora:NAME:0.8>"
    if colon and name.lower() in ("lyco", "hypernet"):
        return f"{shown} is an A1111 extension tag, which stc does not apply; remove it from the prompt"
    if not re.fullmatch(NAME_PATTERN, name):
        return (f"{shown} is not a concept reference: a concept name is 1-64 lower-case ASCII letters, digits, "
                "'-' or '_', without spaces; write <name> or <name:8>")
    return (f"{shown}: the rank after ':' must be a whole number without spaces, as in <{name}:8> (or write "
            f"<{name}> for the full concept)")


def resolve_ranks(parsed: ParsedPrompt, rank_max: Mapping[str, int | None], default: int | None = None,
                  default_flag: str = "--rank") -> dict[str, int | None]:
    """Each concept's rank: its inline rank, else ``default``, else its full rank.

    ``rank_max`` gives each concept's highest rank (its mapper's hidden size, None for a concept
    without ranks, which renders in full and ignores ``default``); a rank outside 1..max is a
    one-line error naming the concept and its range.
    """
    resolved = {}
    for name, inline in parsed.ranks.items():
        limit = rank_max[name]
        if inline is not None:
            resolved[name] = check_rank(name, inline, limit, f"<{name}:{inline}>")
        elif limit is None:
            resolved[name] = None
        elif default is not None:
            resolved[name] = check_rank(name, default, limit, f"{default_flag} {default}")
        else:
            resolved[name] = limit
    return resolved


# --------------------------------------------------------------------------- prompt weighting

# The A1111 webui's emphasis grammar: "(text)" x1.1, "[text]" / 1.1, "(text:1.3)" x1.3, nested
# brackets multiply, "\(" "\)" "\[" "\]" "\\" are the literal characters. An unclosed bracket
# weights the rest of the prompt; a stray closing one is text. Tokens of the grammar, in order:
_EMPHASIS = re.compile(r"""
    \\[()\[\]\\]           # an escaped bracket or backslash: the literal character
  | \\                     # a lone backslash: text
  | [(\[]                  # an opening bracket
  | :([+-]?[.\d]+)\)       # ":1.3)": closes a round bracket with that weight
  | [)\]]                  # a closing bracket
  | [^\\()\[\]:]+          # plain text
  | :                      # a colon that is not a weight: text
""", re.X)
ROUND_WEIGHT = 1.1  # "(text)"; "[text]" divides by it


def weighted_segments(text: str) -> list[tuple[str, float]]:
    """``text`` (the prompt after concept references are resolved) as (text, weight) segments, as the
    A1111 webui reads its emphasis syntax; neighbouring segments of one weight are merged. A
    prompt without brackets or backslashes is one segment of weight 1.0, itself."""
    segments: list[list] = []
    opened: dict[str, list[int]] = {"(": [], "[": []}

    def scale(start: int, factor: float) -> None:
        for segment in segments[start:]:
            segment[1] *= factor

    for match in _EMPHASIS.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            segments.append([token[1], 1.0])
        elif token in "([":
            opened[token].append(len(segments))
        elif weight is not None and opened["("]:
            try:
                factor = float(weight)
            except ValueError:
                raise BadInput(f"({weight}) is not a weight: write (word:1.3)") from None
            scale(opened["("].pop(), factor)
        elif token == ")" and opened["("]:
            scale(opened["("].pop(), ROUND_WEIGHT)
        elif token == "]" and opened["["]:
            scale(opened["["].pop(), 1 / ROUND_WEIGHT)
        else:
            segments.append([token, 1.0])
    for start in opened["("]:
        scale(start, ROUND_WEIGHT)
    for start in opened["["]:
        scale(start, 1 / ROUND_WEIGHT)
    merged: list[list] = []
    for segment in segments:
        if merged and merged[-1][1] == segment[1]:
            merged[-1][0] += segment[0]
        else:
            merged.append(segment)
    return [(segment_text, weight) for segment_text, weight in merged] or [("", 1.0)]


def uses_weighting(text: str) -> bool:
    """Whether ``text`` holds any of the emphasis syntax (a bracket or a backslash)."""
    return any(char in text for char in "()[]\\")
