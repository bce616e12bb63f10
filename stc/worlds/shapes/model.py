"""The models of the shapes world: their configurations, and ``builtin:shapes`` from the shipped weights.

SD 1.x topology at tiny widths, like ``builtin:tiny``: a UNet with 4 down blocks (3 with
cross-attention), a mid block and 4 up blocks, 2 transformer layers per down block and 3 per
up block, i.e. the 16 cross-attention layers the method maps; a CLIP text model; an
``AutoencoderKL``. Unlike ``builtin:tiny`` the weights were trained (``python -m
stc.worlds.shapes train``) and ship with the package in ``shapes.safetensors`` (fp16).

The VAE downsamples 4x (3 blocks), not SD's 8x: at the world's 32 px, 8x8 latents.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...atomic import atomic_write
from . import RESOLUTION, WORLD_WORDS

WEIGHTS = Path(__file__).with_name("shapes.safetensors")
TEXT_WIDTH = 64
LATENT_CHANNELS = 4
VAE_FACTOR = 4
FORMAT = "stc-shapes-world"


def shapes_tokenizer():
    from ...models.tiny import WORDS, build_tiny_tokenizer

    return build_tiny_tokenizer(words=tuple(WORDS) + WORLD_WORDS)


def build_components(tokenizer, scaling_factor: float = 1.0):
    """Text encoder, UNet and VAE with fresh (random) weights, in the world's configuration."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // VAE_FACTOR, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(32, 64, 64, 64),
        attention_head_dim=8, cross_attention_dim=TEXT_WIDTH, norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
        latent_channels=LATENT_CHANNELS, norm_num_groups=16, sample_size=RESOLUTION, scaling_factor=scaling_factor,
    )
    return text_encoder, unet, vae


def scheduler():
    """SD 1.x's noise schedule (epsilon prediction), with the DPM-Solver++ sampler stc renders with."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, prediction_type="epsilon",
    )


def assemble(tokenizer, text_encoder, unet, vae):
    from diffusers import StableDiffusionPipeline

    for module in (text_encoder, unet, vae):
        module.eval().requires_grad_(False)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def in_module_layout(module, state: dict) -> dict:
    """``state`` under the key names this transformers release gives ``module``: CLIP's text models
    name their weights with or without a ``text_model.`` level depending on the release (5.0 has
    it, later 5.x do not), and the shipped weights were saved by one of them."""
    expected = set(module.state_dict())
    if set(state) <= expected:
        return state
    level = "text_model."
    nested = {level + key: value for key, value in state.items()}
    flat = {key.removeprefix(level): value for key, value in state.items()}
    return max((state, nested, flat), key=lambda candidate: len(set(candidate) & expected))


def save_weights(path: Path, text_encoder, unet, vae, metadata: dict) -> None:
    """One safetensors file (fp16) holding the three models, prefixed by name."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for prefix, module in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae)):
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value.detach().to(torch.float16).contiguous()
    meta = {"format": FORMAT, "scaling_factor": repr(float(vae.config.scaling_factor))}
    meta.update({key: json.dumps(value) for key, value in metadata.items()})
    with atomic_write(path) as temporary:
        save_file(tensors, str(temporary), metadata=meta)


def build_shapes_pipeline(weights: Path = WEIGHTS):
    """``builtin:shapes``: the trained world, fp32 on the CPU, from the shipped weights."""
    import torch
    from safetensors import safe_open

    from ...errors import ModelError

    if not weights.is_file():
        raise ModelError(f"builtin:shapes has no weights at {weights}; train them with "
                         "`python -m stc.worlds.shapes train` (or reinstall stc)")
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ModelError(f"{weights} is not a shapes-world weights file")
        state = {key: handle.get_tensor(key).to(torch.float32) for key in handle.keys()}
    tokenizer = shapes_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the modules' initial draws are overwritten; this only keeps them quiet
        text_encoder, unet, vae = build_components(tokenizer, float(metadata["scaling_factor"]))
    for prefix, module in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae)):
        own = {key[len(prefix) + 1:]: value for key, value in state.items() if key.startswith(prefix + ".")}
        module.load_state_dict(in_module_layout(module, own), strict=True)
    return assemble(tokenizer, text_encoder, unet, vae)


# --------------------------------------------------------------------------- the SDXL layout

SDXL_WEIGHTS = Path(__file__).with_name("shapes-sdxl.safetensors")
SDXL_FORMAT = "stc-shapes-world-sdxl"
SDXL_TEXT_WIDTHS = (64, 64)  # the CLIP ViT-L and OpenCLIP ViT-bigG places
SDXL_TIME_EMBED = 8  # per size id


def build_sdxl_components(tokenizer):
    """The SDXL-layout world's text encoders and UNet with fresh weights (the VAE is the world's
    own, shared with builtin:shapes): SDXL's blocks (no attention in the first down block and the
    last up block), several transformer blocks per attention module (1, 2, 2 by depth), the
    pooled embedding and size ids as added conditioning."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    first, second = SDXL_TEXT_WIDTHS
    common = dict(vocab_size=len(tokenizer), num_attention_heads=4, max_position_embeddings=77,
                  bos_token_id=tokenizer.bos_token_id, num_hidden_layers=3)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=first, intermediate_size=4 * first, projection_dim=first, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **common,
    ))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=second, intermediate_size=4 * second, projection_dim=second, hidden_act="gelu",
        eos_token_id=2, pad_token_id=1, **common,  # SDXL's config values
    ))
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // VAE_FACTOR, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        layers_per_block=2, block_out_channels=(32, 64, 64), attention_head_dim=(1, 2, 2), norm_num_groups=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), cross_attention_dim=first + second, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED + second,
    )
    return text_encoder, text_encoder_2, unet


def shapes_tokenizer_2():
    """The second encoder's tokenizer: the world's words, padded with "!" as SDXL's second is."""
    from ...models.tiny import WORDS, build_tiny_tokenizer

    return build_tiny_tokenizer(pad_token="!", words=tuple(WORDS) + WORLD_WORDS)


def assemble_sdxl(tokenizer, text_encoder, text_encoder_2, unet, vae):
    from ...models.tiny import sdxl_pipeline

    return sdxl_pipeline(tokenizer, shapes_tokenizer_2(), text_encoder, text_encoder_2, unet, vae, scheduler())


def save_sdxl_weights(path: Path, text_encoder, text_encoder_2, unet, metadata: dict) -> None:
    """The SDXL layout's text encoders and UNet in one safetensors file (fp16); the VAE stays in
    shapes.safetensors."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for prefix, module in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2), ("unet", unet)):
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value.detach().to(torch.float16).contiguous()
    meta = {"format": SDXL_FORMAT}
    meta.update({key: json.dumps(value) for key, value in metadata.items()})
    with atomic_write(path) as temporary:
        save_file(tensors, str(temporary), metadata=meta)


def _read_weights(weights: Path, kind: str, fmt: str, how: str):
    import torch
    from safetensors import safe_open

    from ...errors import ModelError

    if not weights.is_file():
        raise ModelError(f"{kind} has no weights at {weights}; train them with `{how}` (or reinstall stc)")
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != fmt:
            raise ModelError(f"{weights} is not a {kind} weights file")
        return metadata, {key: handle.get_tensor(key).to(torch.float32) for key in handle.keys()}


def _load(modules, state: dict) -> None:
    for prefix, module in modules:
        own = {key[len(prefix) + 1:]: value for key, value in state.items() if key.startswith(prefix + ".")}
        module.load_state_dict(in_module_layout(module, own), strict=True)


def build_shapes_sdxl_pipeline(weights: Path = SDXL_WEIGHTS, world: Path = WEIGHTS):
    """``builtin:shapes-sdxl``: the world in the SDXL layout, fp32 on the CPU, from the shipped
    weights (its text encoders and UNet; the world's VAE from shapes.safetensors)."""
    import torch

    _, state = _read_weights(weights, "builtin:shapes-sdxl", SDXL_FORMAT, "python -m stc.worlds.shapes train --sdxl")
    metadata, world_state = _read_weights(world, "builtin:shapes", FORMAT, "python -m stc.worlds.shapes train")
    tokenizer = shapes_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the modules' initial draws are overwritten; this only keeps them quiet
        text_encoder, text_encoder_2, unet = build_sdxl_components(tokenizer)
        vae = build_components(tokenizer, float(metadata["scaling_factor"]))[2]
    _load((("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2), ("unet", unet)), state)
    _load((("vae", vae),), world_state)
    return assemble_sdxl(tokenizer, text_encoder, text_encoder_2, unet, vae)
