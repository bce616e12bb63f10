"""The model families stc knows, one backbone each: SD 1.x and SD 2.x (``sd.py``), SDXL
(``sdxl.py``). A family is asked, never tested for (``backbone.py`` says what it answers).

Adding a family: a module here with its :class:`Backbone` subclass (or an instance of an
existing one), its entry in ``BACKBONES`` (and, for a new layout, in ``LAYOUTS``), its shipped
configs under ``stc/models/configs/<name>/``, and a run of the shared family suite
(``tests/test_families.py``) on a random-weight model of its layout (docs/architecture.md).
Importing this package imports no torch.
"""

from __future__ import annotations

from .backbone import CONFIGS, Backbone
from .sd import SD1, SD2, SD_LAYER_NAMES, StableDiffusion
from .sdxl import SDXL, SDXL_LAYER_NAMES, StableDiffusionXL

BACKBONES = (SD1, SD2, SDXL)  # the families stc ships configs for
LAYOUTS = (SDXL, SD1)  # one of each layout, the one with more text encoders first (an SDXL pipeline holds SD's too)

__all__ = [
    "BACKBONES", "CONFIGS", "LAYOUTS", "SD1", "SD2", "SDXL", "SDXL_LAYER_NAMES", "SD_LAYER_NAMES", "Backbone",
    "StableDiffusion", "StableDiffusionXL", "backbone_for_widths", "backbone_of", "backbone_of_hub_model",
    "backbone_of_ti_keys", "encoder_components", "label_of_lora", "label_of_widths", "tokenizer_components",
]


def backbone_for_widths(widths) -> Backbone | None:
    """The backbone of a model (or a concept) whose text encoders have these widths: a known
    family, else the layout with that many text encoders at these widths; None when none has."""
    widths = tuple(int(width) for width in widths)
    known = next((backbone for backbone in BACKBONES if backbone.widths == widths), None)
    if known is not None:
        return known
    layout = next((backbone for backbone in LAYOUTS if len(backbone.readings) == len(widths)), None)
    return layout.with_widths(widths) if layout is not None else None


def backbone_of(pipeline) -> Backbone:
    """The backbone of a loaded diffusers pipeline, from the text encoders it holds."""
    for layout in LAYOUTS:
        if layout.holds(pipeline):
            widths = [int(module.config.hidden_size) for module in layout.encoder_modules(pipeline)]
            return backbone_for_widths(widths)
    raise ValueError(f"{type(pipeline).__name__} has the text encoders of no model family stc knows")


def encoder_components() -> list[str]:
    """The pipeline attributes of the text encoders any layout has, in context order (a model's
    own are the first ones of these it holds)."""
    names = []
    for layout in sorted(LAYOUTS, key=lambda layout: -len(layout.readings)):
        names += [reading.component for reading in layout.readings if reading.component not in names]
    return names


def tokenizer_components() -> list[str]:
    """The pipeline attributes (and diffusers subfolders) of the tokenizers any layout has, in order."""
    names = []
    for layout in sorted(LAYOUTS, key=lambda layout: -len(layout.readings)):
        names += [reading.tokenizer for reading in layout.readings if reading.tokenizer not in names]
    return names


def label_of_widths(widths) -> str:
    """SD 1.x, SD 2.x or SDXL for text encoders of these widths; a test model's layout by its label."""
    backbone = backbone_for_widths(widths)
    return backbone.label if backbone is not None else f"text width {'+'.join(map(str, widths))}"


def backbone_of_hub_model(spec: str) -> Backbone | None:
    return next((backbone for backbone in BACKBONES if backbone.hub_model == spec), None)


def backbone_of_ti_keys(keys) -> Backbone | None:
    """The layout whose textual-inversion file holds the tensors ``keys`` (all of its ``ti_keys``)."""
    keys = set(keys)
    return next((layout for layout in LAYOUTS if set(layout.ti_keys) <= keys), None)


def label_of_lora(shapes) -> str | None:
    """The known family a LoRA file of these tensors (key -> shape) is for; None when they do not say."""
    for backbone in BACKBONES:
        context, encoders = backbone.lora_widths(shapes)
        if (context is not None or any(width is not None for width in encoders)) and not backbone.lora_mismatch(shapes):
            return backbone.label
    return None
