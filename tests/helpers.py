"""Shared test helpers: the CLI runner and small concepts made without training."""

import torch
from typer.testing import CliRunner

from stc.cli import app
from stc.method.mapper import MapperConfig, NeTIMapper
from stc.store.concept import Concept, MetricsRecord, TrainingRecord
from stc.store.conceptio import weights_bytes
from stc.store.registry import Registry
from stc.train.config import TrainConfig

runner = CliRunner()


def invoke(*args, **kwargs):
    """Run ``stc ARGS`` in-process (arguments may be paths or numbers)."""
    return runner.invoke(app, [str(arg) for arg in args], **kwargs)


def assert_one_line_error(result, *fragments, code=1):
    """Exit ``code``, exactly one 'Error:' line on stderr containing ``fragments``, no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def assert_close_in_scale(actual, expected, rel: float) -> None:
    """``max |actual - expected| <= rel * max |expected|``: for floats computed along two different
    code paths (another kernel, memory layout or batch shape sums in another order), whose
    difference is rounding relative to the values' scale, not an absolute amount. Each caller
    says why its ``rel`` holds on any CPU."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = float(expected.abs().max())
    difference = float((actual - expected).abs().max())
    assert difference <= rel * scale, f"max difference {difference:.3g} exceeds {rel:g} x scale {scale:.3g}"


def assert_same_render(actual, expected) -> None:
    """Two renders of one image along two code paths (another process, an unfrozen pipeline,
    another batch): latents that agree to rounding decode to the same 8-bit pixels except where
    a value sits on a rounding boundary, so at most one level off, and almost nowhere."""
    import numpy as np

    difference = np.abs(np.asarray(actual, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3, (difference.max(), (difference > 0).mean())


def make_mapper(seed: int = 0) -> NeTIMapper:
    """A random mapper for builtin:tiny's text width (32), in eval mode."""
    mapper = NeTIMapper(MapperConfig(text_width=32, norm_scale=0.5), generator=torch.Generator().manual_seed(seed))
    return mapper.eval().requires_grad_(False)


def make_concept(name: str, layer_names=None, steps_done: int = 10, metrics: dict | None = None, **fields) -> Concept:
    """Metadata of a builtin:tiny concept planned for 10 steps (not saved)."""
    values = dict(
        base_model="builtin:tiny", initializer="cat", text_width=32,
        layer_names=list(layer_names) if layer_names is not None else [f"l{i}" for i in range(16)],
        mapper=make_mapper(0).config.to_dict(),
        training=TrainingRecord(settings=TrainConfig(steps=10, initializer="cat").record_settings(),
                                steps_done=steps_done),
        metrics=MetricsRecord.from_dict(metrics or {}),
        weights_sha256="ab" * 32,  # replaced by the real digest when saved
    )
    values.update(fields)
    return Concept(name=name, **values)


def save_concept(name: str, seed: int = 0, registry: Registry | None = None, **concept_fields) -> Concept:
    """A concept with a random mapper (seeded) saved in the registry."""
    return (registry or Registry()).save(make_concept(name, **concept_fields), weights_bytes(make_mapper(seed), name))


def encode_spacetime(text_encoder, input_ids, timesteps, layers, concepts=None, generator=None):
    """Keys and values (N x S x D each) of N prompts at their own (t, l) through one text encoder
    read at its final state (an SD 1.x/2.x encoder): stc's encode_context, for tests that pin it."""
    from stc.method.encoding import TextEncoder, encode_context

    encoding = encode_context([TextEncoder(text_encoder)], [input_ids], timesteps, layers, concepts, generator)
    return encoding.keys, encoding.values


def scan(registry):
    """Every entry of ``registry`` with its concept, or the error that stops it from loading."""
    from stc.errors import StcError

    for name in registry.names():
        try:
            yield name, registry.load(name), None
        except StcError as exc:
            yield name, None, exc
