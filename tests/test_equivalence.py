"""A concept whose mapper is a constant vector with zero bypass is plain textual inversion."""

import copy

import torch
from helpers import assert_close_in_scale

from stc.method.mapper import MapperConfig, NeTIMapper
from stc.method.spacetime import cross_attention_layer_names
from stc.render.generation import Renderer, RenderSettings
from stc.store.registry import Concept


def constant_mapper(vector: torch.Tensor) -> NeTIMapper:
    """A real NeTIMapper forced to output (vector, 0) for every (t, l)."""
    width = vector.shape[0]
    mapper = NeTIMapper(MapperConfig(text_width=width, norm_scale=float(vector.norm())))
    with torch.no_grad():
        mapper.output_layer[0].weight.zero_()
        mapper.output_layer[0].bias.copy_(torch.cat([vector, torch.zeros(width)]))
    return mapper.eval().requires_grad_(False)


def test_constant_mapper_reproduces_textual_inversion(tiny):
    width = tiny.text_width
    vector = torch.randn(width, generator=torch.Generator().manual_seed(3)) * 0.3
    plain_pipe = copy.deepcopy(tiny.pipeline)  # stock diffusers, stock attention processors

    # textual inversion through diffusers alone
    plain_pipe.tokenizer.add_tokens(["<ti>"])
    plain_pipe.text_encoder.resize_token_embeddings(len(plain_pipe.tokenizer))
    with torch.no_grad():
        plain_pipe.text_encoder.get_input_embeddings().weight[-1] = vector
    expected = plain_pipe(
        "a photo of <ti> on the moon", num_inference_steps=6, guidance_scale=7.5, height=64, width=64,
        generator=[torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)],
        num_images_per_prompt=2, output_type="latent",
    ).images

    concept = Concept(
        name="ti", base_model="builtin:tiny", initializer="object", text_width=width,
        layer_names=cross_attention_layer_names(tiny.pipeline.unet), mapper={},
    )
    renderer = Renderer(tiny, {"ti": (concept, constant_mapper(vector))})
    ours = renderer.latents("a photo of <ti> on the moon", [11, 12], RenderSettings(steps=6, cfg=7.5))
    assert ours.shape == expected.shape
    # diffusers encodes the prompt once, stc the schedule's 96 (step, layer) rows in one batch:
    # other GEMM shapes, so rounding relative to the latents' scale (~50; measured up to 1e-6 of
    # it); another vector moves them by a sizeable fraction of it
    assert_close_in_scale(ours, expected, 1e-4)
    # and the comparison is sensitive: another vector gives other latents
    other = Renderer(tiny, {"ti": (concept, constant_mapper(vector.flip(0)))})
    different = other.latents("a photo of <ti> on the moon", [11, 12], RenderSettings(steps=6, cfg=7.5))
    assert (different - expected).abs().max() > 1e-2


def test_prompt_without_concepts_is_plain_stable_diffusion(tiny):
    plain_pipe = copy.deepcopy(tiny.pipeline)
    expected = plain_pipe(
        "a cat on the beach", num_inference_steps=5, guidance_scale=5.0, height=64, width=64,
        generator=[torch.Generator().manual_seed(4)], output_type="latent",
    ).images
    ours = Renderer(tiny, {}).latents("a cat on the beach", [4], RenderSettings(steps=5, cfg=5.0))
    # stc's denoising loop and attention processors vs diffusers' own: rounding relative to the
    # latents' scale (~50), as above; a concept or CFG applied wrongly moves them by a sizeable part of it
    assert_close_in_scale(ours, expected, 1e-4)
