"""Concept names: one pattern for the registry's folders and the prompts' ``<name>`` tokens."""

from __future__ import annotations

import re
import unicodedata

NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,63}"  # 1-64 lower-case ASCII letters, digits, '-', '_'
NAME_RE = re.compile(NAME_PATTERN)

# Characters that look like ASCII letters but are not (Cyrillic, Greek), for suggestions.
_LOOKALIKES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ɡ": "g", "ӏ": "l",
    "α": "a", "β": "b", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
    "υ": "u", "χ": "x",
})


def is_valid_name(name: str) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def suggest_name(name: str) -> str:
    """A valid spelling close to ``name`` (look-alikes and accents folded, lower-case,
    separators to '-'); always passes :func:`validate_name`."""
    lowered = unicodedata.normalize("NFKC", str(name)).lower().translate(_LOOKALIKES)
    folded = unicodedata.normalize("NFKD", lowered).encode("ascii", "ignore").decode()
    cleaned = re.sub(r"[^a-z0-9_-]+", "-", folded).strip("-_")
    return cleaned[:64].rstrip("-_") or "my-concept"


def validate_name(name: str) -> str:
    from .errors import InvalidName

    if not is_valid_name(name):
        raise InvalidName(
            f"invalid concept name {name!r}: use 1-64 lower-case ASCII letters, digits, '-' or '_', "
            f"starting with a letter or digit (e.g. {suggest_name(name)!r})"
        )
    return name
