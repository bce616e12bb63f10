"""LoRAs with concepts: ``--lora FILE[:WEIGHT]`` and the webui's inline ``<lora:NAME:WEIGHT>``.

A LoRA is a file of low-rank weight deltas for the UNet (and maybe the text encoders); diffusers'
``load_lora_weights`` reads the layouts people have (kohya/webui safetensors, diffusers/peft), with
peft. stc checks the file's family against the model's from its header alone (the backbone reads
what a LoRA layout says, ``Backbone.lora_mismatch``) before any weights load, then loads every LoRA
as an adapter at its weight. Names of inline tags resolve in the LoRA folder (``--lora-dir``, or
``loras:`` in ``$STC_HOME/config.yaml``). PNGs record them as the webui does (``<lora:name:0.8>``
in the prompt text, ``Lora hashes: "name: hash"``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput, ModelError

LORA_TAG = re.compile(r"<lora:([^:<>]+?)(?::\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*)?>")  # <lora:name> or <lora:name:0.8>
LORA_SUFFIXES = (".safetensors",)


@dataclass(frozen=True)
class Lora:
    """One LoRA of a render: its name (the file's stem, as the webui names it), file and weight."""

    name: str
    path: Path
    weight: float = 1.0

    @property
    def tag(self) -> str:
        return f"<lora:{self.name}:{self.weight:g}>"


def strip_lora_tags(prompt: str) -> tuple[str, dict[str, float]]:
    """``prompt`` without its ``<lora:NAME:WEIGHT>`` tags (the text encoder never reads them), and the
    weight of each name (1.0 when none is given)."""
    loras: dict[str, float] = {}

    def take(match: re.Match) -> str:
        name, weight = match.group(1).strip(), match.group(2)
        value = float(weight) if weight is not None else 1.0
        if name in loras and loras[name] != value:
            raise BadInput(f"<lora:{name}> is given two weights ({loras[name]:g} and {value:g}) in one prompt")
        loras[name] = value
        return ""

    return LORA_TAG.sub(take, prompt), loras


def parse_lora_option(value: str) -> Lora:
    """``--lora FILE[:WEIGHT]``: a file and its weight (1.0 when none is given)."""
    path_text, colon, weight = value.rpartition(":")
    if colon and path_text and re.fullmatch(r"[+-]?(?:\d+\.?\d*|\.\d+)", weight.strip()):
        path, value_weight = Path(path_text), float(weight)
    else:
        path, value_weight = Path(value), 1.0
    return Lora(name=path.stem, path=check_lora_file(path, "--lora").resolve(), weight=value_weight)  # for --from


def check_lora_file(path: Path, flag: str) -> Path:
    if not path.is_file():
        raise BadInput(f"{flag}: {path} does not exist (give a LoRA .safetensors file, e.g. --lora "
                       "style.safetensors:0.8)")
    if path.suffix.lower() not in LORA_SUFFIXES:
        raise BadInput(f"{flag}: {path.name} is not a .safetensors file; stc loads LoRAs from safetensors files only")
    return path


def resolve_inline(name: str, weight: float, folder: Path | None) -> Lora:
    """The file of ``<lora:NAME:WEIGHT>``: NAME.safetensors in the LoRA folder."""
    if folder is None:
        raise BadInput(f"<lora:{name}> names a LoRA, but no LoRA folder is set: pass --lora-dir DIR, or write "
                       "'loras: DIR' in $STC_HOME/config.yaml (or give the file with --lora FILE)")
    path = Path(folder) / f"{name}.safetensors"
    if not path.is_file():
        present = sorted(candidate.stem for candidate in Path(folder).glob("*.safetensors"))[:8]
        hint = f" (it holds {', '.join(present)})" if present else " (it holds no .safetensors files)"
        raise BadInput(f"<lora:{name}>: no {name}.safetensors in the LoRA folder {folder}{hint}")
    return Lora(name=name, path=path, weight=weight)


def render_loras(prompts: list[str], options: list[Lora], folder: Path | None) -> list[Lora]:
    """The LoRAs of a render: ``--lora`` ones, then the prompts' inline ones (every prompt of one
    render must name the same: a LoRA changes the model for all of them)."""
    inline = [strip_lora_tags(prompt)[1] for prompt in prompts]
    if any(tags != inline[0] for tags in inline):
        raise BadInput("the prompts of one grid name different <lora:…> tags; a LoRA changes the model for every "
                       "cell: render them in separate grids, or give the LoRAs with --lora")
    loras = list(options)
    for name, weight in (inline[0] if inline else {}).items():
        if any(lora.name == name for lora in loras):
            raise BadInput(f"LoRA {name} is given twice (--lora and <lora:{name}>); give it once")
        loras.append(resolve_inline(name, weight, folder))
    if len({lora.name for lora in loras}) != len(loras):
        raise BadInput("two --lora files have one name; rename one (the name is the file's stem)")
    return loras


def check_lora_family(loras: list[Lora], backbone, spec: str) -> None:
    """A LoRA of another family than the model's (its header's shapes say) is a one-line error,
    before any weights load."""
    from ..models.backbones import label_of_lora
    from ..models.backbones.single_file import header_shapes

    for lora in loras:
        shapes = header_shapes(lora.path)
        if shapes is None:
            raise BadInput(f"{lora.path} is not a readable .safetensors file")
        why = backbone.lora_mismatch(shapes)
        if why is not None:
            family = label_of_lora(shapes)
            what = f"a LoRA for {family}" if family else "a LoRA for another model family"
            raise ModelError(f"{lora.path.name} is {what} ({why}); {spec} is {backbone.label}: use a LoRA made for "
                             f"{backbone.label}, or a {family or 'matching'} --model")


def lora_hash(path: Path) -> str:
    """The webui's hash of a LoRA safetensors file, in full (it prints the first 12 characters): the
    ``sshs_model_hash`` its header's metadata holds (kohya writes it), else the "addnet" hash, the
    sha256 of the bytes after the header."""
    import json

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        try:
            recorded = json.loads(handle.read(header_length)).get("__metadata__", {}).get("sshs_model_hash")
        except (ValueError, AttributeError):
            recorded = None
        if isinstance(recorded, str) and re.fullmatch(r"[0-9a-fA-F]{12,64}", recorded):
            return recorded.lower()
        handle.seek(8 + header_length)
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_loras(pipeline, loras: list[Lora]) -> None:
    """Load ``loras`` into ``pipeline`` as adapters at their weights (diffusers' load_lora_weights)."""
    if not loras:
        return
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ModelError("loading LoRAs needs peft: pip install peft") from None
    for index, lora in enumerate(loras):
        try:
            # the tensors, not the path: a path makes some diffusers releases look for a hub repository
            # (offline: "you must specify a weight_name")
            source = str(lora.path)
            if lora.path.suffix == ".safetensors":
                from safetensors.torch import load_file

                source = load_file(source)
            pipeline.load_lora_weights(source, adapter_name=adapter_name(index))
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            from ..errors import one_line

            raise ModelError(f"cannot load the LoRA {lora.path.name}: {one_line(exc)}") from exc
    pipeline.set_adapters([adapter_name(index) for index in range(len(loras))],
                          adapter_weights=[lora.weight for lora in loras])


def adapter_name(index: int) -> str:
    return f"stc_lora_{index}"
