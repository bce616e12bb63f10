"""The prompt grammar: ``<name>`` uses a concept, ``<name:8>`` sets its rank inline.

Names follow the registry's one pattern (``names.py``). Ranks are checked in one place,
:func:`resolve_ranks`, against each concept's own maximum.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import BadInput
from .names import NAME_PATTERN

CONCEPT_REF = re.compile(rf"<({NAME_PATTERN})(?::(\d+))?>")
_ANY_CASE_REF = re.compile(r"<([A-Za-z0-9][A-Za-z0-9_-]{0,63})(?::(\d+))?>")


@dataclass
class ParsedPrompt:
    """A prompt with ``<name>`` / ``<name:rank>`` references resolved to ``<name>`` tokens."""

    text: str
    ranks: dict[str, int | None]  # concept name -> inline rank (None: use the default)


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Find the concepts of ``prompt``; ``<name:8>`` sets that concept's rank inline."""
    _check_brackets(prompt)
    for match in _ANY_CASE_REF.finditer(prompt):
        if match.group(1) != match.group(1).lower():
            raise BadInput(
                f"concept names are lower-case: write <{match.group(1).lower()}>, not <{match.group(1)}>"
            )
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


def _check_brackets(prompt: str) -> None:
    """A '<' that opens a name must close before the next '<' (else the concept is silently lost)."""
    opened = None
    for index, char in enumerate(prompt):
        if char == "<" and prompt[index + 1 : index + 2].isalnum():
            if opened is not None:
                break  # a second '<' before the first one closed
            opened = index
        elif char == ">":
            opened = None
    if opened is not None:
        raise BadInput(
            f"unbalanced '<' in the prompt at {prompt[opened : opened + 24]!r}: write <name> (closed with '>') "
            "to use a concept, or drop the '<'"
        )


def resolve_ranks(parsed: ParsedPrompt, rank_max: Mapping[str, int], default: int | None = None) -> dict[str, int]:
    """Each concept's rank: its inline rank, else ``default``, else its full rank.

    ``rank_max`` gives each concept's highest rank (its mapper's hidden size); a rank outside
    1..max is a one-line error naming the concept and its range.
    """
    resolved = {}
    for name, inline in parsed.ranks.items():
        limit = rank_max[name]
        rank = inline if inline is not None else default
        rank = limit if rank is None else rank
        if not 1 <= rank <= limit:
            where = f"<{name}:{inline}>" if inline is not None else f"rank {rank}"
            raise BadInput(f"{name} has ranks 1..{limit}; {where} is outside them")
        resolved[name] = rank
    return resolved
