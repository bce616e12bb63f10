"""Settings that come from the environment and the registry's config file: read here, once.

Foundation of the library (imports nothing heavy): the registry root (``STC_HOME``), the CPU
threads (``STC_THREADS``), seeds' range.
"""

from __future__ import annotations

import os

from .errors import BadInput

MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds


def requested_threads(value: int | str | None = None) -> int | None:
    """``value`` (from ``--threads``) or ``STC_THREADS``; None when neither says."""
    raw = value if value is not None else os.environ.get("STC_THREADS")
    if raw in (None, ""):
        return None
    try:
        threads = int(raw)
    except (TypeError, ValueError):
        raise BadInput(f"--threads / STC_THREADS must be a whole number, not {raw!r}") from None
    if threads < 1:
        raise BadInput(f"--threads / STC_THREADS must be at least 1, got {threads}")
    return threads
