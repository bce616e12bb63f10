"""SDXL's rules on the training side. Rendering and training share the encoding code, but the
trainer assembles its own inputs (its text encoders, norm scales, the pooled embedding it passes,
keys and values per layer, size ids), so each SDXL rule is pinned here on the trainer's UNet call
against a hand computation from docs/method.md, "SDXL": the context is both encoders' penultimate
states side by side (no final LayerNorm); values add 0.2 x each encoder's bypass rescaled to the
state's norm at the placeholder; the pooled embedding is the second encoder's projected,
final-LayerNorm'd state at the end-of-text token, averaged over the 11 layers; size ids are
[H, W, 0, 0, H, W]; each encoder's part of the mapper output has its own initializer's norm.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_in_scale

WIDTHS = (32, 48)  # builtin:tiny-sdxl's two text encoders
LAYERS = 11  # SDXL's attention modules


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Trainer on builtin:tiny-sdxl (initializer 'cat') and what its UNet read in evaluate()."""
    from accelerate import Accelerator
    from PIL import Image

    from stc.models.base import load_base_model
    from stc.train.config import TrainConfig
    from stc.train.images import load_photos
    from stc.train.trainer import Trainer

    folder = tmp_path_factory.mktemp("photos")
    for index in range(2):
        Image.new("RGB", (64, 64), (40 * index + 60, 120, 200 - 30 * index)).save(folder / f"p{index}.png")
    base = load_base_model("builtin:tiny-sdxl", device="cpu")
    config = TrainConfig(steps=1, batch_size=2, grad_accum=1, seed=0, eval_samples=2, initializer="cat")
    trainer = Trainer(base, load_photos(folder, 64).images, "<blob>", config, Accelerator(cpu=True))
    calls = []
    base.pipeline.unet.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    trainer.evaluate()
    return trainer, base.pipeline, calls[0], config


def _stock_states(encoder, ids, token_id, row):
    """transformers' own forward with the placeholder's input embedding set to ``row``:
    (hidden_states[-2], the final-LayerNorm'd last state)."""
    encoder = copy.deepcopy(encoder)
    table = encoder.get_input_embeddings().weight.detach()
    table = torch.cat([table, torch.zeros(max(0, token_id + 1 - table.shape[0]), table.shape[1])])  # the new token
    table[token_id] = row
    encoder.set_input_embeddings(torch.nn.Embedding.from_pretrained(table))
    with torch.no_grad():
        output = encoder(ids, output_hidden_states=True)
    return output.hidden_states[-2][0], output.last_hidden_state[0]


def test_the_trainer_gives_each_encoder_its_own_initializer_norm(trained):
    trainer, pipe, _, _ = trained
    expected = []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        (index,) = tokenizer("cat", add_special_tokens=False).input_ids
        expected.append(float(encoder.get_input_embeddings().weight[index].norm()))
    assert expected[0] != pytest.approx(expected[1])  # two encoders, two norms: a shared one would show
    config = trainer.unwrapped_mapper.config
    assert config.norm_scales == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():
        outputs = trainer.unwrapped_mapper(torch.tensor([500.0]), torch.tensor([4.0]))
    # one group per encoder, [token_l, bypass_l | token_g, bypass_g], each at its encoder's norm
    groups = outputs[0].split([2 * WIDTHS[0], 2 * WIDTHS[1]])
    assert [float(group.norm()) for group in groups] == pytest.approx(expected, rel=1e-5)


def test_the_trainers_unet_call_reads_the_hand_computed_sdxl_conditioning(trained):
    trainer, pipe, call, config = trained
    captions = [config.templates[0].format("<blob>")] * 2  # evaluate(): the first template, no flips
    timesteps = torch.linspace(1000 * 0.05, 1000 * 0.95, 2).long()  # evaluate()'s fixed set
    tokenizers, encoders = (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2)
    ids = [tok(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids for tok in tokenizers]
    token_ids = [tok.convert_tokens_to_ids("<blob>") for tok in tokenizers]
    spacetime = call["cross_attention_kwargs"]["spacetime"]
    assert spacetime.keys.shape == (LAYERS, 2, 77, sum(WIDTHS))
    for sample in range(2):
        pooled = []
        for layer in range(LAYERS):
            with torch.no_grad():
                outputs = trainer.unwrapped_mapper(timesteps[sample : sample + 1].float(), torch.tensor([float(layer)]))
            token_l, bypass_l, token_g, bypass_g = outputs[0].split([WIDTHS[0], WIDTHS[0], WIDTHS[1], WIDTHS[1]])
            states, values = [], []
            for k, (token, bypass) in enumerate(((token_l, bypass_l), (token_g, bypass_g))):
                penultimate, last = _stock_states(encoders[k], ids[k][sample : sample + 1], token_ids[k], token)
                where = ids[k][sample] == token_ids[k]
                assert int(where.sum()) == 1
                value = penultimate.clone()
                state = penultimate[where]
                rescaled = F.normalize(bypass, dim=-1) * state.norm(dim=-1, keepdim=True)
                value[where] = state + 0.2 * rescaled  # the spec's 0.2
                states.append(penultimate)
                values.append(value)
                if k == 1:
                    end = int((ids[1][sample] == tokenizers[1].eos_token_id).nonzero()[0])
                    with torch.no_grad():
                        pooled.append(pipe.text_encoder_2.text_projection(last[end]))
            # two code paths (the trainer's batched encoding, transformers' forward) over one set of
            # weights: they differ by fp32 rounding, far below 1e-5 of the states' scale
            assert_close_in_scale(spacetime.keys[layer, sample], torch.cat(states, dim=-1), 1e-5)
            assert_close_in_scale(spacetime.values[layer, sample], torch.cat(values, dim=-1), 1e-5)
        expected_pooled = torch.stack(pooled).mean(dim=0)  # the mean over the 11 layers
        assert not torch.allclose(pooled[0], pooled[-1])  # the layers' pooled embeddings differ: the mean matters
        assert_close_in_scale(call["added_cond_kwargs"]["text_embeds"][sample], expected_pooled, 1e-5)
    assert call["added_cond_kwargs"]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2  # uncropped, 64 px


# --------------------------------------------------------------------------- the distillation's UNet inputs


@pytest.fixture(scope="module")
def distilling():
    """The distillation's context for an SDXL concept of 2 vectors on builtin:tiny-sdxl."""
    from helpers import make_concept

    from stc.exchange import distill
    from stc.method.mapper import MapperConfig, NeTIMapper
    from stc.models.backbones import SDXL_LAYER_NAMES
    from stc.models.base import load_base_model

    config = MapperConfig(text_width=sum(WIDTHS), norm_scale=0.5, num_layers=LAYERS, encoder_widths=list(WIDTHS),
                          norm_scales=[0.5, 0.8])
    mapper = NeTIMapper(config, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # a random output layer: each (t, l) a clearly different embedding
        mapper.output_layer[0].weight.normal_(generator=torch.Generator().manual_seed(6))
    concept = make_concept("pup", layer_names=list(SDXL_LAYER_NAMES), base_model="builtin:tiny-sdxl",
                           text_width=sum(WIDTHS), mapper=config.to_dict())
    base = load_base_model("builtin:tiny-sdxl", device="cpu")
    return distill._prepare(base, concept, mapper.eval(), vectors=2, rank=None), base


def test_the_distillation_reads_the_concept_as_the_trainer_does_on_sdxl(distilling):
    """The fit's reference (the concept's prediction) gets the mean of the layers' pooled
    embeddings and the size ids of the latents' image size, as training and rendering do."""
    from stc.exchange import distill

    ctx, base = distilling
    calls = []
    handle = base.pipeline.unet.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs),
                                                          with_kwargs=True)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([100, 800])
    captions = ["a photo of <pup>", "a <pup> on the moon"]
    try:
        with torch.no_grad():
            distill._predict_concept(ctx, latents, timesteps, captions)
    finally:
        handle.remove()
    ids = ctx.ids(captions)
    token_ids = [ids_k for ids_k in ctx.token_ids([ctx.token])]
    for sample in range(2):
        pooled = []
        for layer in range(LAYERS):
            with torch.no_grad():
                outputs = ctx.mapper(timesteps[sample : sample + 1].float(), torch.tensor([float(layer)]))
            token_g = outputs[0].split([WIDTHS[0], WIDTHS[0], WIDTHS[1], WIDTHS[1]])[2]
            _, last = _stock_states(base.pipeline.text_encoder_2, ids[1][sample : sample + 1], token_ids[1][0], token_g)
            end = int((ids[1][sample] == ctx.tokenizers[1].eos_token_id).nonzero()[0])
            with torch.no_grad():
                pooled.append(base.pipeline.text_encoder_2.text_projection(last[end]))
        # stc's batched encoding vs transformers' forward, one set of weights: fp32 rounding only
        assert_close_in_scale(calls[0]["added_cond_kwargs"]["text_embeds"][sample], torch.stack(pooled).mean(0), 1e-5)
    assert calls[0]["added_cond_kwargs"]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2  # 8 latents x 8


def test_the_distillations_plain_candidate_is_the_sdxl_pipelines_own_encoding(distilling):
    """What the fit and the fidelity take as "plain textual inversion with these vectors": the
    context StableDiffusionXLPipeline.encode_prompt gives once the vectors are loaded into both
    encoders (diffusers' own code), and the pooled embedding at the end-of-text token."""
    import copy

    from stc.exchange import distill

    ctx, base = distilling
    vectors = torch.randn(2, sum(WIDTHS), generator=torch.Generator().manual_seed(1))
    words = " ".join(ctx.vector_tokens)  # <pup> <pup>_1
    slots = distill._vector_slots(ctx.token_ids(ctx.vector_tokens), vectors, ctx.widths)
    ids = ctx.ids([f"a photo of {words}"])
    with torch.no_grad():
        plain = distill._encode_plain(ctx.encoders, ids, slots)
    pipe = copy.deepcopy(base.pipeline)
    pipe.load_textual_inversion(vectors[:, :WIDTHS[0]], token="<pup>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vectors[:, WIDTHS[0]:], token="<pup>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    with torch.no_grad():
        context, _, _, _ = pipe.encode_prompt("a photo of <pup>", device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    # two code paths over one set of weights: fp32 rounding, far below 1e-5 of the states' scale
    assert_close_in_scale(plain.keys[0], context[0], 1e-5)
    assert torch.equal(plain.keys, plain.values)  # no bypass in plain textual inversion
    # the pooled embedding at the end-of-text token (transformers pools SDXL's second encoder at the
    # largest id, its legacy eos id 2: with added tokens that is the placeholder, not the end)
    second = pipe.tokenizer_2(f"a photo of {words}", padding="max_length", max_length=77,
                              return_tensors="pt").input_ids
    with torch.no_grad():
        last = pipe.text_encoder_2(second, output_hidden_states=True).hidden_states[-1]
        end = int((second[0] == pipe.tokenizer_2.eos_token_id).nonzero()[0])
        expected = pipe.text_encoder_2.text_projection(pipe.text_encoder_2.text_model.final_layer_norm(last[0, end]))
    assert_close_in_scale(plain.pooled[0], expected, 1e-5)
