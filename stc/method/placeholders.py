"""A concept's placeholder tokens in a tokenizer: the one place they are named and added.

A concept ``<name>`` is one token; an imported embedding of n vectors is n tokens, named as
diffusers names them: ``<name>``, ``<name>_1``, …, ``<name>_{n-1}``, written in that order
wherever the prompt says ``<name>``. Training, rendering, distillation and the diffusers
export's module all add them through :func:`add_placeholder_tokens`.
"""

from __future__ import annotations

from ..errors import BadInput


def placeholder_tokens(token: str, count: int = 1) -> list[str]:
    """The tokens of a placeholder with ``count`` vectors: ``<name>``, ``<name>_1``, …"""
    return [token] + [f"{token}_{index}" for index in range(1, count)]


def add_placeholder_tokens(tokenizer, tokens: list[str]) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` (once; adding them again is a no-op) and return their ids.

    A token that the tokenizer's own vocabulary already holds (not one added for a concept) is
    refused: the model would read its existing meaning instead of the concept.
    """
    vocabulary, added = tokenizer.get_vocab(), tokenizer.added_tokens_encoder
    known = [token for token in tokens if token in vocabulary and token not in added]
    if known:
        raise BadInput(f"the tokenizer already knows {known[0]!r} as a word of its own; choose another concept name")
    tokenizer.add_tokens([token for token in tokens if token not in added])
    return [tokenizer.convert_tokens_to_ids(token) for token in tokens]


def expand_placeholders(text: str, tokens: list[str]) -> str:
    """``text`` with each ``tokens[0]`` written as all of ``tokens`` (a no-op for one token)."""
    if len(tokens) < 2:
        return text
    return text.replace(tokens[0], " ".join(tokens))
