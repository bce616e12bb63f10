"""PNG files with their parameters: A1111-style ``parameters`` text, an ``stc`` JSON chunk.

Used by ``stc gen``, grids, training previews and exports alike. Files are never overwritten:
:func:`stc.outputs.free_path` finds the next free name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput
from ..models.schedulers import SCHEDULERS
from ..outputs import free_path, staged
from .prompts import parse_prompt

_A1111_FIELD = re.compile(r'\s*(\w[\w \-/.]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_CONCEPT_FIELD = re.compile(r"stc concept ([a-z0-9][a-z0-9_-]*)")
_CONCEPT_VALUE = re.compile(r"(?:rank (\d+))? ?(?:sha256 ([0-9a-f]*))?|full")


def _quote(value: object) -> str:
    """A1111's quoting: values with commas, colons or newlines become JSON strings."""
    text = str(value)
    if any(char in text for char in ',:\n"'):
        return json.dumps(text)
    return text


def a1111_parameters(metadata: dict) -> str:
    """The ``parameters`` text chunk in the layout A1111-style tools read.

    ``prompt``, ``Negative prompt: ...``, then one line of ``Key: value`` fields.
    """
    sampler = SCHEDULERS[metadata["scheduler"]][1]
    fields = [
        ("Steps", metadata["steps"]), ("Sampler", sampler), ("CFG scale", metadata["cfg"]),
        ("Seed", metadata["seed"]), ("Size", f"{metadata['width']}x{metadata['height']}"),
        ("Model", metadata["base_model"]),
    ]
    if metadata.get("init_image") is not None:  # img2img: the webui's field, and stc's path of the photo
        fields += [("Denoising strength", metadata["strength"]), ("stc init image", metadata["init_image"])]
    for name, info in metadata["concepts"].items():
        parts = ([f"rank {info['rank']}"] if info.get("rank") is not None else []) + (
            [f"sha256 {info['sha256']}"] if info.get("sha256") else [])
        fields.append((f"stc concept {name}", " ".join(parts) or "full"))
    loras = metadata.get("loras") or []
    if loras:  # the webui's field: the first 12 characters of each file's hash
        fields.append(("Lora hashes", ", ".join(f"{lora['name']}: {lora['hash'][:12]}" for lora in loras)))
    fields.append(("stc scheduler", metadata["scheduler"]))
    fields.append(("stc version", metadata["stc_version"]))
    from .loras import strip_lora_tags

    inline = strip_lora_tags(metadata["prompt"])[1]
    tags = [f"<lora:{lora['name']}:{lora['weight']:g}>" for lora in loras if lora["name"] not in inline]
    lines = [" ".join([metadata["prompt"], *tags])]  # as the webui: every LoRA's tag in the prompt text
    if metadata["negative"]:
        lines.append(f"Negative prompt: {metadata['negative']}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict:
    """Read a ``parameters`` chunk back into stc's metadata keys (what A1111 layouts hold).

    Returns prompt, negative, steps, cfg, seed, width, height, scheduler, base_model,
    concepts ({name: {rank, sha256}}), stc_version, plus ``extra`` for unknown fields.
    """
    *prompt_lines, field_line = text.split("\n")
    prompt, negative, in_negative = [], [], False
    for line in prompt_lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields = {}
    for key, value in _A1111_FIELD.findall(field_line):
        fields[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    samplers = {sampler: name for name, (_, sampler) in SCHEDULERS.items()}
    width, _, height = fields.pop("Size", "x").partition("x")
    result = {
        "prompt": "\n".join(prompt),
        "negative": "\n".join(negative),
        "steps": int(fields.pop("Steps")),
        "cfg": float(fields.pop("CFG scale")),
        "seed": int(fields.pop("Seed")),
        "width": int(width),
        "height": int(height),
        "base_model": fields.pop("Model", ""),
        "concepts": {},
        "stc_version": fields.pop("stc version", ""),
    }
    if "Denoising strength" in fields:  # img2img (the webui's own PNGs name no photo)
        result["strength"] = float(fields.pop("Denoising strength"))
        result["init_image"] = fields.pop("stc init image", None)
    sampler = fields.pop("Sampler", "")
    result["scheduler"] = fields.pop("stc scheduler", samplers.get(sampler, sampler))
    for key in list(fields):
        name, value = _CONCEPT_FIELD.fullmatch(key), _CONCEPT_VALUE.fullmatch(fields[key])
        if name and value:
            rank = value.group(1)
            result["concepts"][name.group(1)] = {"rank": int(rank) if rank else None, "sha256": value.group(2) or ""}
            del fields[key]
    result["extra"] = fields
    return result


def slug(text: str, limit: int = 40) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (words[:limit].rstrip("-")) or "image"


def png_info(metadata: dict, extra: dict[str, str] | None = None):
    """PNG text chunks: ``parameters`` (A1111 layout) and ``stc`` (the full record as JSON)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", a1111_parameters(metadata))
    info.add_text("stc", json.dumps(metadata, sort_keys=True))
    for key, value in (extra or {}).items():
        info.add_text(key, value)
    return info


def default_stem(rendered) -> str:
    rank_part = "-".join(f"r{rank}" for rank in rendered.ranks.values() if rank is not None)  # None: no ranks
    parts = (slug(parse_prompt(rendered.prompt).text), f"s{rendered.seed}", rank_part)
    return "-".join(part for part in parts if part)


def save_png(rendered, folder: Path, stem: str | None = None) -> Path:
    """Save a RenderedImage with its metadata as ``folder/stem.png``, at a free name (never overwrites)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = free_path(folder, stem or default_stem(rendered))
    with staged(path) as temporary:  # a PNG is there whole or not at all (Ctrl-C, a full disk)
        rendered.image.save(temporary, format="PNG", pnginfo=png_info(rendered.metadata))
    return path


# --------------------------------------------------------------------------- re-rendering a PNG


@dataclass
class PngRecipe:
    """What ``stc gen --from IMAGE.png`` renders: the image's parameters as gen's options (None:
    not recorded, the default applies), and notes on what could not be carried over."""

    prompt: str
    negative: str
    seed: int | None
    steps: int | None
    cfg: float | None
    width: int | None
    height: int | None
    scheduler: str | None
    model: str | None
    rank: int | None  # the rank every concept without an inline one had (stc's --rank)
    notes: list[str] = field(default_factory=list)
    init_image: str | None = None  # img2img: the photo it started from (stc records its path)
    strength: float | None = None
    loras: list[str] = field(default_factory=list)  # --lora FILE:WEIGHT of LoRAs not tagged in the prompt


def read_parameters(path: Path) -> str:
    """The ``parameters`` text chunk of a PNG (stc's and the A1111 webui's); a file that is no
    image or has none is a one-line error."""
    return _read_chunks(path)[0]


def _read_chunks(path: Path) -> tuple[str, dict | None]:
    """(the ``parameters`` text, stc's JSON record or None) of a PNG."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            chunks = dict(getattr(image, "text", None) or image.info)
            text = chunks.get("parameters")
    except FileNotFoundError:
        raise BadInput(f"the image to render again (--from): {path} does not exist") from None
    except (OSError, UnidentifiedImageError) as exc:
        raise BadInput(f"the image to render again (--from): cannot read {path} as an image: {exc}") from None
    if not isinstance(text, str) or not text.strip():
        raise BadInput(f"the image to render again (--from): {path} holds no generation parameters (no "
                       "'parameters' text, as stc and the A1111 webui write); give the prompt and options on the "
                       "command line")
    try:
        record = json.loads(chunks["stc"]) if "stc" in chunks else None
    except ValueError:
        record = None
    return text, record if isinstance(record, dict) else None


def recipe_from_png(path: Path) -> PngRecipe:
    """The render that made the PNG at ``path`` (stc's own or the A1111 webui's), as gen's options."""
    text, record = _read_chunks(path)
    try:
        parsed = parse_parameters(text)
        if record is not None:  # stc's own record: exact (the prompt without the LoRA tags added to the text)
            parsed = {**parsed, **{key: record[key] for key in record if key in parsed or key in (
                "init_image", "strength", "loras")}}
    except (KeyError, ValueError) as exc:
        raise BadInput(f"the image to render again (--from): {path}'s parameters lack or garble a field stc "
                       f"needs ({exc}); give the prompt and options on the command line") from None
    from .generation import RenderSettings

    notes = []
    scheduler = parsed["scheduler"] or None
    if scheduler is not None and scheduler not in SCHEDULERS:
        notes.append(f"{path.name} was rendered with the sampler {scheduler!r}, which stc does not have; "
                     f"rendering with --scheduler {RenderSettings().scheduler} (or pass --scheduler)")
        scheduler = None
    model = parsed["base_model"] or None
    if model is not None and not parsed["stc_version"]:  # the webui names a checkpoint file, not a path
        notes.append(f"{path.name} names the webui's model {model!r}, which stc cannot load by that name; pass "
                     "--model for it")
        model = None
    recipe = PngRecipe(
        prompt=parsed["prompt"], negative=parsed["negative"], seed=parsed["seed"], steps=parsed["steps"],
        cfg=parsed["cfg"], width=parsed["width"], height=parsed["height"], scheduler=scheduler, model=model,
        rank=_default_rank(parsed["prompt"], parsed["concepts"]), notes=notes,
        init_image=parsed.get("init_image"), strength=parsed.get("strength"),
        loras=_option_loras(parsed),
    )
    if recipe.strength is not None and recipe.init_image is None:
        notes.append(f"{path.name} is an img2img render whose photo is not recorded; pass --init-image to "
                     "render from a photo again (without it, it renders from noise)")
        recipe.strength = None  # given with --init-image, or the default
    return recipe


def _default_rank(prompt: str, concepts: dict) -> int | None:
    """The rank the concepts of ``prompt`` without an inline rank rendered at (``--rank``): their
    recorded rank (they all share it); None when none has one."""
    inline = parse_prompt(prompt).ranks
    ranks = {concepts[name]["rank"] for name, rank in inline.items()
             if rank is None and name in concepts and concepts[name].get("rank") is not None}
    return ranks.pop() if len(ranks) == 1 else None


def _option_loras(parsed: dict) -> list[str]:
    """stc's record of LoRAs given as files (``--lora``), as ``--lora`` values; the prompt's
    ``<lora:NAME>`` tags resolve again in the LoRA folder."""
    from .loras import strip_lora_tags

    inline = strip_lora_tags(parsed["prompt"])[1]
    return [f"{lora['path']}:{lora['weight']}" for lora in parsed.get("loras") or [] if lora["name"] not in inline]
