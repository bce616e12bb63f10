"""Property tests (hypothesis, bounded): names, the prompt grammar, concept.yaml round trips and
the registry's save/load. The number of examples each property ran goes to
build/reliability-counts.json (section "properties")."""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import reliability_counts as counts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stc.errors import BadInput, InvalidName
from stc.names import NAME_PATTERN, is_valid_name, suggest_name, validate_name
from stc.render.prompts import parse_prompt
from stc.safe_yaml import yaml_load
from stc.store.concept import KNOWN_KEYS, Concept, MetricsRecord, TrainingRecord
from stc.store.registry import Registry, _yaml_text, check_weights
from stc.train.config import TrainConfig

EXAMPLES = Counter()
# Fixed examples (derandomized) so every run tries the same; STC_PROPERTY_EXAMPLES=N and
# STC_PROPERTY_RANDOM=1 explore further.
_SCALE = max(1, int(os.environ.get("STC_PROPERTY_EXAMPLES", "300")))
_FIXED = os.environ.get("STC_PROPERTY_RANDOM") != "1"
FAST = settings(max_examples=_SCALE, deadline=None, database=None, derandomize=_FIXED)
SLOW = settings(max_examples=max(1, _SCALE // 8), deadline=None, database=None, derandomize=_FIXED,
                suppress_health_check=[HealthCheck.too_slow])
PATTERN = re.compile(NAME_PATTERN)


@pytest.fixture(autouse=True, scope="module")
def _collector(request):
    counts.attach(request.config)
    yield
    for key, value in EXAMPLES.items():
        counts.record("properties", key, value)
    counts.record("properties", "examples_total", sum(EXAMPLES.values()))
    counts.record("properties", "counterexamples", 0)  # a counterexample fails its test instead
    counts.write()


names = st.from_regex(PATTERN, fullmatch=True)
# Text that stresses names and prompts: the grammar's characters, look-alikes, controls, anything.
tricky_text = st.text(
    alphabet=st.one_of(st.sampled_from(list("<>:_-09az AZ\n\t\x00/.é") + ["а", "ｃ", "𝐚", "İ", "ß", "\u200b"]),
                       st.characters()),
    max_size=80,
)
any_text = st.one_of(tricky_text, st.text(max_size=80), st.binary(max_size=40).map(
    lambda data: data.decode("utf-8", "surrogateescape")))


# --------------------------------------------------------------------------- names


@FAST
@given(any_text)
def test_suggest_name_is_always_valid_and_stable(text):
    EXAMPLES["names_suggest"] += 1
    suggestion = suggest_name(text)
    assert is_valid_name(suggestion), (text, suggestion)
    assert validate_name(suggestion) == suggestion
    assert suggest_name(suggestion) == suggestion  # a suggestion needs no further suggestion


@FAST
@given(st.one_of(any_text, names, names.map(lambda name: name + "\n"), names.map(str.upper),
                 names.map(lambda name: name + "x" * 64)))
def test_validate_name_accepts_exactly_the_pattern(text):
    EXAMPLES["names_validate"] += 1
    expected = re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", text, flags=re.ASCII) is not None
    assert is_valid_name(text) == expected, text
    if expected:
        assert validate_name(text) == text
    else:
        with pytest.raises(InvalidName) as caught:
            validate_name(text)
        message = str(caught.value)
        assert "\n" not in message
        suggested = re.search(r"e\.g\. '([^']*)'", message)
        assert suggested and is_valid_name(suggested[1]), message


# --------------------------------------------------------------------------- prompts


@FAST
@given(st.one_of(tricky_text, st.text(max_size=200)))
def test_parse_prompt_never_crashes(text):
    EXAMPLES["prompt_arbitrary"] += 1
    try:
        parsed = parse_prompt(text)
    except BadInput as exc:
        assert "\n" not in str(exc)
        return
    for name, rank in parsed.ranks.items():
        assert is_valid_name(name) and (rank is None or rank >= 0)
        assert f"<{name}>" in parsed.text
    again = parse_prompt(parsed.text)  # the resolved text parses to the same names, ranks dropped
    assert again.text == parsed.text and again.ranks == dict.fromkeys(parsed.ranks)


@FAST
@given(st.text(max_size=200).filter(lambda text: "<" not in text))
def test_text_without_a_bracket_is_unchanged(text):
    EXAMPLES["prompt_plain"] += 1
    parsed = parse_prompt(text)
    assert parsed.text == text and parsed.ranks == {}


filler = st.text(max_size=12).filter(lambda text: "<" not in text and ">" not in text)


@FAST
@given(st.lists(st.tuples(names, st.one_of(st.none(), st.integers(1, 10**18 - 1))), max_size=6,
                unique_by=lambda pair: pair[0]),
       st.lists(filler, min_size=7, max_size=7))
def test_references_parse_back_to_their_names_and_ranks(references, fillers):
    EXAMPLES["prompt_round_trip"] += 1
    prompt, expected_text = fillers[0], fillers[0]
    for (name, rank), text in zip(references, fillers[1:]):
        prompt += f"<{name}>" if rank is None else f"<{name}:{rank}>"
        expected_text += f"<{name}>"
        prompt += text
        expected_text += text
    parsed = parse_prompt(prompt)
    assert parsed.ranks == dict(references)
    assert parsed.text == expected_text


@FAST
@given(names, st.text(alphabet="0123456789", min_size=19, max_size=10_000).filter(lambda d: len(d.lstrip("0")) > 18))
def test_absurd_ranks_are_refused_in_one_line(name, rank):
    EXAMPLES["prompt_absurd_rank"] += 1
    with pytest.raises(BadInput) as caught:
        parse_prompt(f"a photo of <{name}:{rank}>")
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300


# --------------------------------------------------------------------------- concept.yaml


scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.floats(allow_nan=False),
                    st.text(max_size=20))
yaml_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=12)
config_keys = {field for field in TrainConfig.__dataclass_fields__}


def extra_keys(forbidden):
    return st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda key: key not in forbidden), yaml_values,
                           max_size=4)


def concepts(name_strategy=names):
    return st.builds(
        lambda name, base, init, width, final, seconds, extra, training_extra, metrics_extra, created: Concept(
            name=name, base_model=base, initializer=init, text_width=width, layer_names=[f"l{i}" for i in range(16)],
            mapper={"text_width": width, "hidden_dim": 128, "norm_scale": 0.5},
            training=TrainingRecord(settings=TrainConfig(steps=10, initializer="cat").record_settings(training_extra),
                                    steps_done=4),
            metrics=MetricsRecord(final_loss=final, seconds=seconds, extra=metrics_extra),
            weights_sha256="ab" * 32, created=created, extra=extra,
        ),
        name_strategy, st.text(max_size=30), st.text(max_size=20), st.integers(1, 4096),
        st.one_of(st.none(), st.floats(allow_nan=False)), st.one_of(st.none(), st.floats(0, 1e6)),
        extra_keys(set(KNOWN_KEYS)),
        extra_keys(config_keys | set(TrainingRecord.RUN_KEYS)),
        extra_keys(set(MetricsRecord.KEYS)),
        st.text(max_size=25),
    )


@FAST
@given(concepts())
def test_concept_yaml_round_trips_with_arbitrary_extra_keys(concept):
    EXAMPLES["yaml_round_trip"] += 1
    data = concept.to_yaml_dict()
    loaded = Concept.from_yaml_dict(yaml_load(_yaml_text(concept)), Path("/registry/concepts") / concept.name)
    assert loaded.to_yaml_dict() == data
    assert loaded.extra == concept.extra
    assert loaded.training.settings == concept.training.settings and loaded.metrics.extra == concept.metrics.extra


_WEIGHTS = None


def _weights() -> bytes:
    """A small complete safetensors file (the registry stores bytes; it never builds a mapper)."""
    global _WEIGHTS
    if _WEIGHTS is None:
        import numpy as np
        from safetensors.numpy import save

        _WEIGHTS = save({"w": np.arange(4, dtype=np.float32)}, metadata={"format": "stc-concept"})
    return _WEIGHTS


@SLOW
@given(st.lists(concepts(), min_size=1, max_size=3, unique_by=lambda concept: concept.name))
def test_registry_save_load_round_trips_names_and_metadata(batch):
    EXAMPLES["registry_round_trip"] += 1
    with tempfile.TemporaryDirectory() as root:
        registry = Registry(Path(root))
        written = {}
        for concept in batch:
            stored = registry.save(concept, _weights())
            written[concept.name] = stored.to_yaml_dict()
        assert registry.names() == sorted(written)
        for name, data in written.items():
            loaded = registry.load(name)
            assert loaded.to_yaml_dict() == data
            assert check_weights(loaded).ok and check_weights(loaded).problem is None
        from stc.store.listing import listing

        records = {name: record for name, record, problem in listing(registry) if problem is None}
        assert set(records) == set(written)
