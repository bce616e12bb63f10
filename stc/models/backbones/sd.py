"""Stable Diffusion 1.x and 2.x: one text encoder (CLIP ViT-L, 768 wide; OpenCLIP ViT-H, 1024
wide) read at its final-LayerNorm'd last state, 16 cross-attention layers, nothing added to the
UNet's text context."""

from __future__ import annotations

from dataclasses import dataclass

from .backbone import Backbone, EncoderReading

# The 16 cross-attention layers of SD 1.x/2.x UNets in execution order (docs/method.md, "Space").
SD_LAYER_NAMES = tuple(
    f"{block}.attentions.{index}.transformer_blocks.0.attn2"
    for block, count in (("down_blocks.0", 2), ("down_blocks.1", 2), ("down_blocks.2", 2), ("mid_block", 1),
                         ("up_blocks.1", 3), ("up_blocks.2", 3), ("up_blocks.3", 3))
    for index in range(count)
)


@dataclass(frozen=True)
class StableDiffusion(Backbone):
    layout = "sd"
    layout_label = "SD 1.x/2.x"
    readings = (EncoderReading("text_encoder", "tokenizer"),)
    layer_names = SD_LAYER_NAMES
    pipeline_class = "StableDiffusionPipeline"
    pretrained_kwargs = {"safety_checker": None, "requires_safety_checker": False}  # stc renders for the user
    ti_keys = ("emb_params",)  # diffusers, the A1111 webui, ComfyUI and kohya read this single key
    lora_text_prefixes = (("lora_te_", "text_encoder."),)  # kohya/webui, diffusers/peft

    @property
    def single_file_encoders(self):
        return ((self.checkpoint_layout, "text_encoder"),)

    def assemble(self, components: dict, index: dict):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)


SD1 = StableDiffusion(
    "sd1", "SD 1.x", (768,), "stable-diffusion-v1-5/stable-diffusion-v1-5", (
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"), ("runwayml/stable-diffusion-v1-5", "tokenizer"),
        ("CompVis/stable-diffusion-v1-4", "tokenizer"), ("openai/clip-vit-large-patch14", ""),
    ),
    checkpoint_layout="clip", license="creativeml-openrail-m",
)
SD2 = StableDiffusion(
    "sd2", "SD 2.x", (1024,), "stabilityai/stable-diffusion-2-1", (
        ("stabilityai/stable-diffusion-2-1", "tokenizer"), ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
        ("stabilityai/stable-diffusion-2", "tokenizer"), ("stabilityai/stable-diffusion-2-base", "tokenizer"),
    ),
    prediction_type="v_prediction", resolution=768,  # 2.x; 2.x-base is epsilon at 512 px
    checkpoint_layout="openclip",
)
