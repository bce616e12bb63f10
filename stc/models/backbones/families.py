"""The Stable Diffusion model families stc knows, each described once: what the rest of stc asks
about a base model of that family.

A family says which text encoders a model has (how wide, which layout its single files store
them in), what its UNet predicts and at which size it was trained, where stc's shipped configs
for its single files are, which hub model an embedding of its width that names no model is
taken to be for, and where a tokenizer for it may already be in the local Hugging Face cache.
Adding a family is adding an entry here (and its configs under ``stc/models/configs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIGS = Path(__file__).parent.parent / "configs"


@dataclass(frozen=True)
class Family:
    name: str  # its folder under stc/models/configs
    label: str  # how messages name it
    text_width: int  # the width of the UNet's text context (the text encoders' hidden sizes added up)
    encoder: str  # how its single files store the text encoders: "clip" (OpenAI CLIP), "openclip", "sgm" (SDXL's)
    hub_model: str  # the model an embedding of this width that names none is taken to be for
    tokenizer_sources: tuple[tuple[str, str], ...]  # (hub id, subfolder) looked up in the local cache
    prediction_type: str = "epsilon"  # what its UNet predicts (stc's shipped configs)
    resolution: int = 512  # the size it was trained at (px)
    encoder_widths: tuple[int, ...] = ()  # several text encoders (SDXL): each one's width; () = one

    @property
    def widths(self) -> tuple[int, ...]:
        """The width of each text encoder (one for SD 1.x/2.x)."""
        return self.encoder_widths or (self.text_width,)

    @property
    def config_dir(self) -> Path:
        return CONFIGS / self.name


SD1 = Family(
    "sd1", "SD 1.x", 768, "clip", "stable-diffusion-v1-5/stable-diffusion-v1-5", (
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"), ("runwayml/stable-diffusion-v1-5", "tokenizer"),
        ("CompVis/stable-diffusion-v1-4", "tokenizer"), ("openai/clip-vit-large-patch14", ""),
    ),
)
SD2 = Family(
    "sd2", "SD 2.x", 1024, "openclip", "stabilityai/stable-diffusion-2-1", (
        ("stabilityai/stable-diffusion-2-1", "tokenizer"), ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
        ("stabilityai/stable-diffusion-2", "tokenizer"), ("stabilityai/stable-diffusion-2-base", "tokenizer"),
    ),
    prediction_type="v_prediction", resolution=768,  # 2.x; 2.x-base is epsilon at 512 px
)
SDXL = Family(
    "sdxl", "SDXL", 2048, "sgm", "stabilityai/stable-diffusion-xl-base-1.0", (
        ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
        ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2"),
    ),
    resolution=1024, encoder_widths=(768, 1280),
)
FAMILIES = (SD1, SD2, SDXL)


def family_of_width(width: int) -> Family | None:
    """The one family whose text context is ``width`` wide, or None."""
    fitting = [family for family in FAMILIES if family.text_width == width]
    return fitting[0] if len(fitting) == 1 else None


def family_of_widths(widths) -> Family | None:
    """The family whose text encoders have these widths (one for SD 1.x/2.x, two for SDXL), or None."""
    return next((family for family in FAMILIES if family.widths == tuple(widths)), None)


def family_of_hub_model(spec: str) -> Family | None:
    return next((family for family in FAMILIES if family.hub_model == spec), None)
