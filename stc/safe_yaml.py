"""YAML read safely: the safe loader (libyaml's when installed), and no document whose aliases
expand without bound. Every YAML file stc reads goes through :func:`yaml_load`: ``concept.yaml``,
the registry's ``config.yaml`` and ``stc train --config`` files."""

from __future__ import annotations

YAML_MAX_NODES = 100_000  # a concept.yaml has a few hundred; aliases count once per use


def yaml_load(text: str):
    """``yaml.safe_load`` through libyaml when it is there (about 10x faster: ``stc ls`` reads
    every concept.yaml); the safe loader either way.

    Hostile files fail with a ``yaml.YAMLError``: alias bombs ("billion laughs", whose aliases
    would expand to more than :data:`YAML_MAX_NODES` nodes once anything walks the data),
    self-referencing aliases, and values the safe constructor cannot build (``2026-13-45``,
    a 5000-digit integer, nesting deeper than Python's recursion limit).
    """
    import yaml

    try:
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise yaml.YAMLError(f"a value cannot be read: {type(exc).__name__}: {exc}") from None
    problem = _expansion_problem(data)
    if problem:
        raise yaml.YAMLError(problem)
    return data


def _expansion_problem(data) -> str | None:
    """Why ``data`` (a loaded YAML document) is unsafe to walk, or None. Counts the nodes a
    full expansion has (each alias as a copy), without expanding: each container once."""
    sizes: dict[int, int] = {}
    pending: set[int] = set()
    stack = [(data, False)]
    while stack:
        value, finished = stack.pop()
        if not isinstance(value, (dict, list, set)):
            continue
        key = id(value)
        children = [*value.keys(), *value.values()] if isinstance(value, dict) else list(value)
        if finished:
            sizes[key] = 1 + sum(sizes.get(id(child), 1) for child in children)
            pending.discard(key)
            if sizes[key] > YAML_MAX_NODES:
                return (f"its aliases expand to more than {YAML_MAX_NODES} values (a YAML bomb?); "
                        "stc does not read it")
            continue
        if key in sizes:
            continue
        if key in pending:
            return "an alias refers to a value that contains it (a self-referencing YAML document)"
        pending.add(key)
        stack.append((value, True))
        stack.extend((child, False) for child in children if isinstance(child, (dict, list, set)))
    return None
