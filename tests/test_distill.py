"""Distilling a concept into plain textual-inversion vectors (stc.exchange.distill) on builtin:tiny."""

import copy

import pytest
import torch
from helpers import assert_close_in_scale, make_concept, make_mapper

from stc.errors import BadInput
from stc.exchange import distill as distill_module
from stc.exchange.distill import MIN_HELDOUT, Distilled, _attend, distil, heldout_count
from stc.method.encoding import ConceptSlot, encode_layers
from stc.method.mapper import MapperConfig, NeTIMapper
from stc.method.placeholders import placeholder_tokens
from stc.method.spacetime import SpaceTimeConditioning, cross_attention_layer_names, install_processors

FAST = dict(samples=32, steps=20, queries=32)  # a few seconds each on a CPU


class LayerMapper(NeTIMapper):
    """A hand-made concept: token ``outer`` at ``layers``, ``inner`` elsewhere, at every t;
    a constant ``bypass`` (or none)."""

    def __init__(self, outer, inner, bypass=None, layers=(0, 15)):
        config = MapperConfig(text_width=outer.shape[0], norm_scale=float(outer.norm()), bypass=bypass is not None)
        super().__init__(config, generator=torch.Generator().manual_seed(0))
        self.register_buffer("outer", outer.clone())
        self.register_buffer("inner", inner.clone())
        self.register_buffer("constant_bypass", bypass.clone() if bypass is not None else torch.zeros(0))
        self.outer_layers = layers

    def forward(self, timesteps, layers, rank=None, dropout_groups=None, generator=None):
        outer = torch.zeros_like(layers, dtype=torch.bool)
        for layer in self.outer_layers:
            outer |= layers == layer
        token = torch.where(outer.unsqueeze(-1), self.outer, self.inner)  # N, D
        if not self.config.bypass:
            return token
        return torch.cat([token, self.constant_bypass.expand_as(token)], dim=-1)


def word_embedding(base, word):
    ids = base.pipeline.tokenizer.encode(word, add_special_tokens=False)
    return base.pipeline.text_encoder.get_input_embeddings().weight[ids[0]].detach().clone()


@pytest.fixture(scope="module")
def tiny_model():
    from stc.models.base import load_base_model

    return load_base_model("builtin:tiny", device="cpu")


@pytest.fixture(scope="module")
def concept(tiny_model):
    return make_concept("dog", cross_attention_layer_names(tiny_model.pipeline.unet))


def plain_latents(pipeline, prompt="a photo of a cat on the beach"):
    return pipeline(
        prompt, num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
        generator=torch.Generator().manual_seed(5), output_type="latent",
    ).images


@pytest.fixture(scope="module")
def random_run(tiny_model, concept):
    """One distillation of a random mapper, with what it touched recorded before and after."""
    pipe, mapper = tiny_model.pipeline, make_mapper(0)
    before = dict(
        vocab=dict(pipe.tokenizer.get_vocab()), tokens=len(pipe.tokenizer), latents=plain_latents(pipe),
        embedding=pipe.text_encoder.get_input_embeddings().weight.clone(), processors=dict(pipe.unet.attn_processors),
        mapper={k: v.clone() for k, v in mapper.state_dict().items()},
    )
    calls = []
    result = distil(tiny_model, concept, mapper, seed=0, progress=lambda *call: calls.append(call), **FAST)
    return result, mapper, before, calls


# --------------------------------------------------------------------------- results


def test_distilled_vector_beats_both_baselines(random_run, tiny_model):
    result, _, _, _ = random_run
    assert isinstance(result, Distilled)
    assert result.vectors.shape == (1, tiny_model.text_width)
    assert result.vectors.dtype == torch.float32 and result.vectors.device.type == "cpu"
    assert torch.isfinite(result.vectors).all()
    assert result.rank == 128  # rank None: the full concept
    fidelity = result.fidelity
    assert fidelity.distilled < 0.97 * fidelity.average
    assert fidelity.distilled < 0.7 * fidelity.initializer
    assert result.objective < 0.9 * result.objective_start


def test_fidelity_is_what_plain_textual_inversion_gives(random_run, tiny_model, concept):
    """Recompute the three errors independently: stock diffusers text encoder and UNet with the
    token's input embedding set (plain textual inversion), vs the concept's space-time UNet call."""
    result, mapper, _, _ = random_run
    heldout = result.heldout
    ti = copy.deepcopy(tiny_model.pipeline)  # stock attention processors
    ti.tokenizer.add_tokens(["<ti>"])
    ti.text_encoder.resize_token_embeddings(len(ti.tokenizer))
    grid = torch.arange(1000.0).repeat_interleave(16), torch.arange(16.0).repeat(1000)  # every (t, l)
    average = mapper.split(mapper(*grid))[0].mean(0)

    spacetime = copy.deepcopy(tiny_model.pipeline)
    install_processors(spacetime.unet)
    spacetime.tokenizer.add_tokens([concept.token])
    concept_id = spacetime.tokenizer.convert_tokens_to_ids(concept.token)

    def ids(tokenizer, texts):
        return tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    with torch.no_grad():
        encoding = encode_layers(
            spacetime.text_encoder, ids(spacetime.tokenizer, heldout.captions), heldout.timesteps, 16,
            {concept_id: ConceptSlot(concept_id, mapper)},
        )
        conditioning = SpaceTimeConditioning(encoding.keys.transpose(0, 1), encoding.values.transpose(0, 1))
        reference = spacetime.unet(
            heldout.latents, heldout.timesteps, encoder_hidden_states=conditioning.keys[0],
            cross_attention_kwargs={"spacetime": conditioning},
        ).sample.flatten(1)

        def error(word, vector=None):
            if vector is not None:
                ti.text_encoder.get_input_embeddings().weight[-1] = vector
            captions = [caption.replace(concept.token, word) for caption in heldout.captions]
            hidden = ti.text_encoder(ids(ti.tokenizer, captions))[0]
            prediction = ti.unet(heldout.latents, heldout.timesteps, encoder_hidden_states=hidden).sample.flatten(1)
            return float(((prediction - reference).norm(dim=1) / reference.norm(dim=1)).mean())

        assert error("<ti>", result.fitted[0]) == pytest.approx(result.fidelity.distilled, rel=1e-3)
        assert error("<ti>", average) == pytest.approx(result.fidelity.average, rel=1e-3)
        assert error(concept.initializer) == pytest.approx(result.fidelity.initializer, rel=1e-3)


def test_distillation_weighs_layers_by_their_effect(tiny_model, concept):
    """A concept that says "dog" at the outermost layers and "car" at the other 14: the average
    is mostly "car", but the outermost layers move the tiny UNet most; the fit finds that."""
    dog, car = word_embedding(tiny_model, "dog"), word_embedding(tiny_model, "car")
    result = distil(tiny_model, concept, LayerMapper(dog, car).eval(), seed=0, **FAST)
    assert result.fidelity.distilled < 0.7 * result.fidelity.average
    assert result.fidelity.distilled < 0.7 * result.fidelity.initializer
    average = (2 * dog + 14 * car) / 16
    assert (result.vectors[0] - dog).norm() < 0.95 * (average - dog).norm()


def test_distillation_imitates_the_bypass(tiny_model, concept):
    """A constant token with a constant bypass: the average is that token and misses only the
    bypass; the distilled vector folds part of the bypass's effect into the token."""
    dog, car = word_embedding(tiny_model, "dog"), word_embedding(tiny_model, "car")
    result = distil(tiny_model, concept, LayerMapper(dog, dog, bypass=car).eval(), seed=0, **FAST)
    assert result.fidelity.distilled < 0.7 * result.fidelity.average


def test_two_vectors(tiny_model, concept):
    result = distil(tiny_model, concept, make_mapper(0), vectors=2, seed=0, **FAST)
    assert result.vectors.shape == (2, tiny_model.text_width)
    assert torch.isfinite(result.vectors).all()
    assert result.objective < 0.5 * result.objective_start  # the start [average, "cat"] is poor on tiny
    assert result.fidelity.distilled < 0.7 * result.fidelity.average
    assert result.fidelity.distilled < 0.8 * result.fidelity.initializer
    assert placeholder_tokens("<dog>", 3) == ["<dog>", "<dog>_1", "<dog>_2"]


# --------------------------------------------------------------------------- choosing what is written


def test_a_fit_that_beats_the_average_is_written(random_run):
    result, _, _, _ = random_run
    fidelity = result.fidelity
    assert fidelity.samples == heldout_count(FAST["samples"]) == MIN_HELDOUT == result.heldout.timesteps.shape[0]
    assert fidelity.written == "distilled" and torch.equal(result.vectors, result.fitted)
    assert fidelity.difference == pytest.approx(fidelity.distilled - fidelity.average, rel=1e-9)
    assert fidelity.difference + 2 * fidelity.difference_se < 0  # better by more than its noise
    assert 0 < fidelity.difference_se < fidelity.average_se  # paired: its spread is the smaller
    assert fidelity.decision().startswith("the distilled vectors") and "64 held-out samples" in fidelity.decision()


def test_an_export_never_scores_worse_than_the_average_it_reports(tiny_model, concept, monkeypatch):
    """A fit that ends far from where it started (the average plus noise as large as the vector):
    it scores worse on the held-out set, so the average is written, with its own score."""
    fit = distill_module._fit

    def bad_fit(student, start, steps, tracker=None):
        best, value, first = fit(student, start, steps, tracker)
        noise = torch.randn(start.shape, generator=torch.Generator().manual_seed(3))
        return start + noise * start.norm() / noise.norm(), value, first

    monkeypatch.setattr(distill_module, "_fit", bad_fit)
    result = distil(tiny_model, concept, make_mapper(0), seed=0, **FAST)
    fidelity = result.fidelity
    assert fidelity.distilled > fidelity.average  # the fit did lose here
    assert fidelity.written == "average" and torch.equal(result.vectors, result.average)
    assert not torch.equal(result.fitted, result.average)
    assert fidelity.written_error == fidelity.average <= fidelity.distilled
    assert fidelity.decision().startswith("the plain average")


# --------------------------------------------------------------------------- behaviour


def test_same_seed_same_vectors(random_run, tiny_model, concept):
    first, _, _, _ = random_run
    again = distil(tiny_model, concept, make_mapper(0), seed=0, **FAST)
    assert torch.equal(first.vectors, again.vectors)
    assert first.fidelity == again.fidelity and first.objective == again.objective


def test_progress_reaches_its_total(random_run):
    """One unit per recorded UNet batch (16 samples), one for the layer gains, one per fit step,
    one per held-out batch: 2 + 1 + 20 + 4 for 32 samples (64 held out) and 20 steps."""
    _, _, _, calls = random_run
    total = 2 + 1 + FAST["steps"] + 4
    assert calls == [(done, total) for done in range(1, total + 1)]


def test_base_model_and_mapper_are_left_as_they_were(random_run, tiny_model):
    _, mapper, before, _ = random_run
    pipe = tiny_model.pipeline
    assert len(pipe.tokenizer) == before["tokens"] and pipe.tokenizer.get_vocab() == before["vocab"]
    assert "<dog>" not in pipe.tokenizer.get_vocab()
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, before["embedding"])
    assert dict(pipe.unet.attn_processors) == before["processors"]  # the same processor objects
    assert all(torch.equal(value, before["mapper"][key]) for key, value in mapper.state_dict().items())
    assert not mapper.training
    assert torch.equal(plain_latents(pipe), before["latents"])


def test_student_attention_is_the_processors(tiny_model):
    """The fit's attention (projected queries in, text rows picked from distinct sequences)
    equals the module with stc's processor."""
    pipe = copy.deepcopy(tiny_model.pipeline)
    install_processors(pipe.unet)
    gen = torch.Generator().manual_seed(0)
    rows = torch.tensor([0, 1, 1])
    for name in cross_attention_layer_names(pipe.unet)[::5]:
        attn = pipe.unet.get_submodule(name)
        hidden = torch.randn(3, 10, attn.to_q.in_features, generator=gen)
        text = torch.randn(2, 77, tiny_model.text_width, generator=gen)
        with torch.no_grad():
            expected = attn(hidden, encoder_hidden_states=text[rows])
            # the fit projects 2 distinct sequences, the module 3 rows: other GEMM shapes, rounding
            # relative to the outputs' scale (~0.3); 1e-5 of it is ~80 float32 ulps
            assert_close_in_scale(_attend(attn, attn.to_q(hidden), text, rows), expected, 1e-5)
            assert_close_in_scale(_attend(attn, attn.to_q(hidden), text[rows]), expected, 1e-5)


def test_bad_arguments_are_refused(tiny_model, concept):
    for kwargs in (dict(vectors=0), dict(samples=0), dict(steps=-1), dict(rank=0), dict(rank=129)):
        with pytest.raises(BadInput):
            distil(tiny_model, concept, make_mapper(0), **kwargs)
