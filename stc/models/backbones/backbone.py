"""What stc asks of a model family: the :class:`Backbone` every family's module fills in.

A backbone is the one object that knows a family's text encoders and tokenizers and how each
one's output is read (final-LayerNorm'd, penultimate, pooled), its layer order, its added
conditioning, its VAE's precision, its single-file layout, its textual-inversion file layout,
its label and its default size. The rest of stc asks the backbone (``base.backbone`` of a loaded
model, :func:`~stc.models.backbones.backbone_for_widths` of a concept) and never tests which
family it is looking at. Importing this module imports no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

CONFIGS = Path(__file__).parent.parent / "configs"


@dataclass(frozen=True)
class EncoderReading:
    """Where a diffusers pipeline holds one text encoder and its tokenizer (attribute names), and
    how its output is read (method.encoding.TextEncoder's ``context``: "final" or "penultimate";
    ``pooled``: its projected end-of-text state is the pooled embedding)."""

    component: str
    tokenizer: str
    context: str = "final"
    pooled: bool = False


@dataclass(frozen=True)
class Backbone:
    """One model family (an instance: SD 1.x, SD 2.x, SDXL) of one layout (a subclass).

    The fields are the family's data; the class attributes and methods what every family of the
    layout shares. :meth:`with_widths` gives the same layout at other widths (the random-weight
    test models), labelled by the layout.
    """

    name: str  # its folder under stc/models/configs
    label: str  # how messages name it
    widths: tuple[int, ...]  # each text encoder's width, in context order
    hub_model: str | None = None  # the model an embedding of this width that names none is taken to be for
    tokenizer_sources: tuple[tuple[str, str], ...] = ()  # (hub id, subfolder) looked up in the local cache
    prediction_type: str = "epsilon"  # what its UNet predicts (stc's shipped configs)
    resolution: int = 512  # the size it was trained at (px)
    checkpoint_layout: str = ""  # how its single files store the text encoders (single_file.py)
    license: str = "openrail++"  # its weights' license, as a Hugging Face model card names it

    layout: ClassVar[str]  # the layout's name: "sd", "sdxl" (what a format says it can hold)
    layout_label: ClassVar[str]  # the label of a model of this layout that is no known family
    readings: ClassVar[tuple[EncoderReading, ...]]  # one per text encoder, in context order
    layer_names: ClassVar[tuple[str, ...]]  # the UNet's layers in execution order (method/spacetime.py)
    pipeline_class: ClassVar[str]  # the diffusers pipeline class of its models
    pretrained_kwargs: ClassVar[dict] = {}  # what its pipeline's from_pretrained gets besides the dtype
    ti_keys: ClassVar[tuple[str, ...]]  # its textual-inversion safetensors' tensors, one per text encoder
    single_file_encoders: ClassVar[tuple[tuple[str, str], ...]]  # (key layout, config subfolder) per text encoder
    lora_text_prefixes: ClassVar[tuple[tuple[str, ...], ...]]  # per text encoder: its keys' prefixes in LoRA files

    @property
    def text_width(self) -> int:
        """The width of the UNet's text context: the text encoders' widths added up."""
        return sum(self.widths)

    @property
    def config_dir(self) -> Path:
        return CONFIGS / self.name

    def with_widths(self, widths) -> Backbone:
        """This layout with text encoders of ``widths`` (a test model's), labelled by the layout."""
        return dataclasses.replace(self, name=self.layout, label=self.layout_label, widths=tuple(widths),
                                   hub_model=None, tokenizer_sources=())

    # ------------------------------------------------------------------ a loaded pipeline

    def holds(self, pipeline) -> bool:
        """Whether ``pipeline`` has every text encoder and tokenizer of this layout."""
        return all(getattr(pipeline, reading.component, None) is not None
                   and getattr(pipeline, reading.tokenizer, None) is not None for reading in self.readings)

    def encoder_modules(self, pipeline) -> list:
        """The text encoder modules of ``pipeline``, in the order their states make up the context."""
        return [getattr(pipeline, reading.component) for reading in self.readings]

    def text_encoders(self, pipeline) -> list:
        """The text encoders of ``pipeline`` and how each one's output is read (method.encoding.TextEncoder)."""
        from ...method.encoding import pipeline_text_encoders

        return pipeline_text_encoders(pipeline, self.readings)

    def tokenizers(self, pipeline) -> list:
        from ...method.encoding import pipeline_tokenizers

        return pipeline_tokenizers(pipeline, self.readings)

    def added_conditioning(self, pooled, height: int, width: int) -> dict | None:
        """What the UNet reads besides the text context, for a batch whose pooled embeddings are
        ``pooled`` (B x P) at height x width px; None when it reads nothing else."""
        return None

    def vae_dtype(self, pipeline, weight_dtype):
        """The VAE's precision when the frozen models run in ``weight_dtype``."""
        return weight_dtype

    def assemble(self, components: dict, index: dict):
        """The diffusers pipeline of a single file's ``components`` (vae, unet, scheduler, and each
        text encoder and tokenizer under its reading's names); ``index``: its model_index.json."""
        raise NotImplementedError

    # ------------------------------------------------------------------ LoRA files

    def lora_widths(self, shapes: dict) -> tuple[int | None, tuple[int | None, ...]]:
        """What a LoRA file's tensors (key -> shape, its header) say it was trained for: the width of
        the text context its UNet cross-attention keys and values read, and each of this layout's
        text encoders' width (None where the file has no such weights). Kohya/webui names
        (``lora_unet_…attn2_to_k.lora_down.weight``, ``lora_te_``, ``lora_te1_``/``lora_te2_``) and
        diffusers/peft names (``unet.….attn2.to_k.lora_A.weight``, ``text_encoder.``/``text_encoder_2.``)."""
        def down_width(key: str, shape) -> int | None:
            down = key.endswith((".lora_down.weight", ".lora_A.weight", ".lora.down.weight", "_lora.down.weight"))
            return int(shape[1]) if down and len(shape) == 2 else None

        context = next((down_width(key, shape) for key, shape in shapes.items()
                        if "attn2" in key and ("to_k" in key or "to_v" in key) and down_width(key, shape)), None)
        encoders = []
        for prefixes in self.lora_text_prefixes:
            encoders.append(next((down_width(key, shape) for key, shape in shapes.items()
                                  if key.startswith(prefixes) and ("q_proj" in key or "k_proj" in key)
                                  and down_width(key, shape)), None))
        return context, tuple(encoders)

    def lora_mismatch(self, shapes: dict) -> str | None:
        """Why a LoRA file of these tensors is not for this family, naming the family it is for;
        None when it fits (or its tensors do not say)."""
        context, encoders = self.lora_widths(shapes)
        if context is not None and context != self.text_width:
            return f"its cross-attention reads a text context {context} wide; {self.label}'s is {self.text_width}"
        for width, ours in zip(encoders, self.widths):
            if width is not None and width != ours:
                return f"its text-encoder weights are {width} wide; {self.label}'s encoder is {ours}"
        return None

    # ------------------------------------------------------------------ textual-inversion files

    def ti_tensors(self, vectors) -> dict:
        """n x D vectors as the tensors of this family's textual-inversion safetensors file: each
        text encoder's part under its key."""
        parts = vectors.split(list(self.widths), dim=-1)
        return {key: part.contiguous() for key, part in zip(self.ti_keys, parts)}

    def ti_vectors(self, tensors: dict):
        """The n x D vectors of a file holding this family's ``ti_keys``, each tensor n x its width;
        None when the tensors do not fit together (different counts)."""
        import torch

        parts = [tensors[key].detach().float() for key in self.ti_keys]
        parts = [part.reshape(-1, part.shape[-1]) if part.ndim else part for part in parts]
        if any(part.ndim != 2 for part in parts) or len({part.shape[0] for part in parts}) != 1:
            return None
        return torch.cat(parts, dim=-1)

    @property
    def a1111_pt(self) -> bool:
        """Whether the A1111 webui's ``.pt`` layout (one tensor) can hold this family's embeddings;
        otherwise the webui reads the ti safetensors file."""
        return len(self.ti_keys) == 1
