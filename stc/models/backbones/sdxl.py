"""SDXL: two text encoders (CLIP ViT-L, 768 wide, and OpenCLIP ViT-bigG, 1280 wide, each read at
its penultimate state; the second's projected pooled embedding), 11 layers (attention modules of
2 or 10 transformer blocks), the pooled embedding and size ids added to the UNet's input, a VAE
that runs in fp32 when the rest is fp16 (docs/method.md, "SDXL")."""

from __future__ import annotations

from dataclasses import dataclass

from .backbone import Backbone, EncoderReading

# The 11 layers (attention modules; 70 cross-attentions) of SDXL's UNet in execution order.
SDXL_LAYER_NAMES = tuple(
    f"{block}.attentions.{index}.transformer_blocks.*.attn2"
    for block, count in (("down_blocks.1", 2), ("down_blocks.2", 2), ("mid_block", 1), ("up_blocks.0", 3),
                         ("up_blocks.1", 3))
    for index in range(count)
)


@dataclass(frozen=True)
class StableDiffusionXL(Backbone):
    layout = "sdxl"
    layout_label = "SDXL"
    readings = (EncoderReading("text_encoder", "tokenizer", "penultimate"),
                EncoderReading("text_encoder_2", "tokenizer_2", "penultimate", pooled=True))
    layer_names = SDXL_LAYER_NAMES
    pipeline_class = "StableDiffusionXLPipeline"
    ti_keys = ("clip_l", "clip_g")  # kohya writes it; the webui, ComfyUI, InvokeAI and diffusers read it
    single_file_encoders = (("sgm-clip", "text_encoder"), ("sgm-openclip", "text_encoder_2"))
    lora_text_prefixes = (("lora_te1_", "text_encoder."), ("lora_te2_", "text_encoder_2."))  # kohya, diffusers

    def added_conditioning(self, pooled, height: int, width: int) -> dict:
        """The pooled embeddings and the size "time ids" [H, W, 0, 0, H, W] (original size =
        target size, no crop: StableDiffusionXLPipeline's defaults, and uncropped training photos)."""
        from ...method.encoding import size_time_ids

        return {"text_embeds": pooled, "time_ids": size_time_ids(height, width, pooled.shape[0], pooled.device,
                                                                 pooled.dtype)}

    def vae_dtype(self, pipeline, weight_dtype):
        """fp32 for a VAE in fp16 whose config asks to be upcast (``force_upcast``: SDXL's VAE
        overflows in fp16), as StableDiffusionXLPipeline upcasts it to decode."""
        import torch

        upcast = weight_dtype == torch.float16 and pipeline.vae.config.get("force_upcast", False)
        return torch.float32 if upcast else weight_dtype

    def assemble(self, components: dict, index: dict):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            **components, force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
            add_watermarker=False,
        )


SDXL = StableDiffusionXL(
    "sdxl", "SDXL", (768, 1280), "stabilityai/stable-diffusion-xl-base-1.0", (
        ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
        ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2"),
    ),
    resolution=1024, checkpoint_layout="sgm",
)
