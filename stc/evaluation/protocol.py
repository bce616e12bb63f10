"""The evaluation protocol of ``stc eval``: what is rendered, how it is scored, how it is averaged.

A run renders every (prompt, rank, seed) of its :class:`EvalPlan` into ``<out>/images/`` (one
PNG each, with its metadata), scores each image as soon as it exists, and keeps the per-image
scores in ``<out>/scores.json``; ``<out>/eval.json`` holds the plan and, once complete, the
results. Both are written through the one atomic write after every image, so Ctrl-C loses at
most the image being denoised, and a resumed run renders only what is missing and scores only
what has no score yet (a run with a new scorer, ``--dino`` say, re-scores without rendering).

Averaging (``docs/evaluation.md``): per rank and measure, the mean over the prompts of each seed,
then the mean and the standard deviation of those per-seed means over the seeds.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..atomic import write_file
from ..errors import BadInput
from ..models.tiny import SHAPES, SHAPES_SDXL
from .metrics import KEEP_FRACTION, suggest_rank

# The evaluation prompts ({} is the concept): objects in the style of the textual-inversion,
# DreamBooth and NeTI evaluations (scenes, materials and recolourings that keep the subject), and
# styles (one subject per prompt painted in the concept's style).
OBJECT_PROMPTS = (
    "a photo of a {}", "a {} in the jungle", "a {} in the snow", "a {} on the beach",
    "a {} on a cobblestone street", "a {} on top of pink fabric", "a {} on top of a wooden floor",
    "a {} with a city in the background", "a {} with a mountain in the background",
    "a {} with a blue house in the background", "a {} on top of a purple rug in a forest", "a red {}",
    "a purple {}", "a shiny {}", "a wet {}", "a cube shaped {}",
)
STYLE_PROMPTS = (
    "a painting in the style of {}", "a painting of a dog in the style of {}",
    "a painting of a house in the style of {}", "a painting of a lighthouse in the style of {}",
    "a painting of a tree in the style of {}", "a painting of a car in the style of {}",
    "a painting of a city street in the style of {}", "a painting of a mountain lake in the style of {}",
    "a portrait of a woman in the style of {}", "a still life of fruit in the style of {}",
)
# The shapes world knows only its own words: the edits its checker can read (background, colour).
SHAPES_PROMPTS = (
    "a photo of a {}", "a {} on a green background", "a {} on a red background", "a photo of a blue {}",
)
SHAPES_WORLDS = (SHAPES, SHAPES_SDXL)
DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64, 128)
DEFAULT_SEEDS = (0, 1, 2, 3)
IMAGES_DIR = "images"
PLAN_FILE = "eval.json"
SCORES_FILE = "scores.json"
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}

# measure -> (label, unit, side): "image" measures reconstruction, "text" editability
MEASURES = {
    "clip_image": ("CLIP image similarity", "mean cosine", "image"),
    "clip_text": ("CLIP text similarity", "cosine", "text"),
    "dino_image": ("DINO image similarity", "mean cosine", "image"),
    "checker_fidelity": ("checker: concept kept", "share of images", "image"),
    "checker_edit": ("checker: edit honoured", "share of images", "text"),
}


def is_shapes_world(model: str) -> bool:
    return model in SHAPES_WORLDS


def default_prompts(kind: str, model: str) -> list[str]:
    if is_shapes_world(model):
        return list(SHAPES_PROMPTS)
    if kind not in ("object", "style"):
        raise BadInput(f"kind (--kind) must be object or style, got {kind!r}")
    return list(OBJECT_PROMPTS if kind == "object" else STYLE_PROMPTS)


def prompt_templates(prompts: list[str], token: str) -> list[str]:
    """Prompts as templates: ``{}`` or the concept's ``<name>`` marks the concept (added in front
    as "a photo of {}"-style would guess; a prompt without it is refused)."""
    templates = []
    for prompt in prompts:
        template = prompt.replace(token, "{}") if "{}" not in prompt else prompt
        if template.count("{}") != 1:
            raise BadInput(f"prompts (--prompts): {prompt!r} must name the concept once, as {{}} or {token}")
        templates.append(template)
    return templates


@dataclass
class EvalPlan:
    """What an eval renders: the concept, its model, prompt templates, ranks, seeds, render settings."""

    concept: str
    model: str
    initializer: str
    prompts: list[str]  # templates with {} for the concept
    prompt_source: str  # "object", "style", "shapes" or the --prompts file
    ranks: list[int]
    seeds: list[int]
    settings: dict  # RenderSettings' fields
    weights_sha256: str = ""

    def prompt(self, index: int) -> str:
        return self.prompts[index].format(f"<{self.concept}>")

    def text_prompt(self, index: int) -> str:
        """The prompt with the initializer word for the concept: what text similarity compares with."""
        return self.prompts[index].format(self.initializer)

    def cells(self) -> list[tuple[int, int, int]]:
        """(rank, prompt index, seed) of every image, rank-major (a rank's images share batches)."""
        return [(rank, index, seed) for rank in self.ranks for index in range(len(self.prompts)) for seed in self.seeds]

    @staticmethod
    def image_name(rank: int, index: int, seed: int) -> str:
        return f"r{rank}-p{index}-s{seed}.png"

    @classmethod
    def from_dict(cls, data: dict) -> "EvalPlan":
        known = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        return cls(**known)


def read_photos(folder: Path) -> list:
    """The concept's training photos (PIL images) from ``folder``."""
    from PIL import Image

    if not folder.is_dir():
        raise BadInput(f"the concept's photos are not at {folder}; pass --photos FOLDER (image similarity compares "
                       "with them)")
    paths = sorted(path for path in folder.iterdir() if path.suffix.lower() in PHOTO_SUFFIXES)
    if not paths:
        raise BadInput(f"{folder} holds no photos (.png, .jpg, .webp, .bmp); pass --photos FOLDER")
    return [Image.open(path).convert("RGB") for path in paths]


# --------------------------------------------------------------------------- the shapes world's checker

_BACKGROUND = re.compile(r"on an? (\w+) background")


def checker_request(template: str) -> dict:
    """What a shapes-world prompt asks of the checker: a background colour, a colour for the concept."""
    from ..worlds.shapes import COLOURS

    asked = {}
    background = _BACKGROUND.search(template)
    if background and background.group(1) in COLOURS:
        asked["background"] = background.group(1)
    before = template.split("{}")[0].split()
    if before and before[-1] in COLOURS:
        asked["colour"] = before[-1]
    return asked


def concept_reading(photos: list) -> tuple[str | None, str | None]:
    """The (colour, shape) most of the photos show, as the checker reads them."""
    from ..worlds.shapes import read_image

    readings = Counter((reading.colour, reading.shape) for reading in map(read_image, photos))
    return readings.most_common(1)[0][0]


def checker_scores(image, template: str, concept: tuple[str | None, str | None]) -> dict:
    """1/0 per checker measure: the concept's shape (and colour, unless the prompt asks another)
    is there; the prompt's edit (background, colour) is honoured (None: the prompt asks none)."""
    from ..worlds.shapes import read_image

    reading, asked = read_image(image), checker_request(template)
    colour, shape = concept
    kept = reading.shape == shape and ("colour" in asked or reading.colour == colour)
    edit = None
    if asked:
        edit = float(all(getattr(reading, key) == value for key, value in asked.items()))
    return {"checker_fidelity": float(kept), "checker_edit": edit}


# --------------------------------------------------------------------------- running


@dataclass
class Scorers:
    """What scores the images: CLIP and DINO scorers (either may be None), the shapes checker, and
    their references (the photos' features, the concept's reading)."""

    clip: object | None = None
    dino: object | None = None
    photos: list = field(default_factory=list)
    checker: bool = False
    _references: dict = field(default_factory=dict)

    @property
    def measures(self) -> list[str]:
        names = []
        if self.clip is not None:
            names += ["clip_image", "clip_text"]
        if self.dino is not None:
            names.append("dino_image")
        if self.checker:
            names += ["checker_fidelity", "checker_edit"]
        return names

    def score(self, image, plan: EvalPlan, index: int, missing: list[str]) -> dict:
        """The ``missing`` measures of one image of prompt ``index``."""
        from .metrics import image_similarity, text_similarity

        scores = {}
        if self.clip is not None and {"clip_image", "clip_text"} & set(missing):
            features = self.clip.image_features([image])
            if "clip" not in self._references:
                self._references["clip"] = self.clip.image_features(self.photos)
            scores["clip_image"] = image_similarity(features, self._references["clip"])[0]
            scores["clip_text"] = text_similarity(features, self.clip.text_features([plan.text_prompt(index)]))[0]
        if self.dino is not None and "dino_image" in missing:
            if "dino" not in self._references:
                self._references["dino"] = self.dino.image_features(self.photos)
            scores["dino_image"] = image_similarity(self.dino.image_features([image]), self._references["dino"])[0]
        if self.checker and {"checker_fidelity", "checker_edit"} & set(missing):
            if "reading" not in self._references:
                self._references["reading"] = concept_reading(self.photos)
            scores.update(checker_scores(image, plan.prompts[index], self._references["reading"]))
        return scores


class EvalFolder:
    """An eval's folder: its plan, its images and their scores, all kept as they are made."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.images = self.folder / IMAGES_DIR

    def exists(self) -> bool:
        return (self.folder / PLAN_FILE).is_file()

    def read(self) -> tuple[EvalPlan, dict, dict]:
        """(plan, results or {}, per-image scores)."""
        try:
            data = json.loads((self.folder / PLAN_FILE).read_text(encoding="utf-8"))
            plan = EvalPlan.from_dict(data["plan"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BadInput(f"{self.folder / PLAN_FILE} is not an stc eval record ({exc}); choose another --out"
                           ) from None
        scores = {}
        if (self.folder / SCORES_FILE).is_file():
            try:
                scores = json.loads((self.folder / SCORES_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                scores = {}  # scores are cheap to redo from the images
        return plan, data.get("results") or {}, scores if isinstance(scores, dict) else {}

    def write_plan(self, plan: EvalPlan, results: dict | None = None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"plan": asdict(plan), "results": results or {}}
        write_file(self.folder / PLAN_FILE, json.dumps(record, indent=1, sort_keys=True))

    def write_scores(self, scores: dict) -> None:
        write_file(self.folder / SCORES_FILE, json.dumps(scores, indent=0, sort_keys=True))


ImageCallback = Callable[[int, int], None]  # (images done, images in all), rendered or found


def run_eval(renderer, plan: EvalPlan, render_settings, folder: EvalFolder, scorers: Scorers, progress=None,
             on_image: ImageCallback | None = None) -> dict:
    """Render what ``folder`` lacks of ``plan``, score what has no score, and return the results
    (written to the folder's ``eval.json``). ``progress(done, total)``: denoising steps."""
    from PIL import Image

    from ..render.generation import RenderRequest, resolve_request
    from ..render.pngmeta import save_png

    _, _, scores = folder.read() if folder.exists() else (None, None, {})
    folder.write_plan(plan)
    folder.images.mkdir(parents=True, exist_ok=True)
    measures = scorers.measures
    cells = plan.cells()
    done = 0

    def keep(name: str, image, index: int) -> None:
        nonlocal done
        own = scores.setdefault(name, {})
        missing = [measure for measure in measures if measure not in own]
        if missing:
            own.update(scorers.score(image, plan, index, missing))
            folder.write_scores(scores)
        done += 1
        if on_image is not None:
            on_image(done, len(cells))

    wanted = {}
    for rank, index, seed in cells:
        name = plan.image_name(rank, index, seed)
        if (folder.images / name).is_file():
            with Image.open(folder.images / name) as image:
                keep(name, image.convert("RGB"), index)
        else:
            request = RenderRequest(plan.prompt(index), seed, rank)
            wanted.setdefault(resolve_request(request, render_settings, renderer.concepts).image_key, []).append(
                (request, name, index))
    requests = [request for entries in wanted.values() for request, _, _ in entries[:1]]
    for rendered in renderer.iter_render(requests, render_settings, progress) if requests else ():
        for _, name, index in wanted[rendered.key]:
            path = save_png(rendered, folder.images, stem=name.removesuffix(".png"))
            keep(path.name, rendered.image, index)
    results = summarize(plan, scores, measures)
    folder.write_plan(plan, results)
    return results


def summarize(plan: EvalPlan, scores: dict, measures: list[str]) -> dict:
    """Per rank and measure: mean and spread over seeds of the per-seed means over prompts; the
    suggested rank; what was measured."""
    per_rank: dict[str, dict] = {}
    for rank in plan.ranks:
        row = {}
        for measure in measures:
            seed_means = []
            for seed in plan.seeds:
                values = [scores.get(plan.image_name(rank, index, seed), {}).get(measure)
                          for index in range(len(plan.prompts))]
                values = [value for value in values if value is not None]
                if values:
                    seed_means.append(sum(values) / len(values))
            if seed_means:
                mean = sum(seed_means) / len(seed_means)
                spread = math.sqrt(sum((v - mean) ** 2 for v in seed_means) / (len(seed_means) - 1)) \
                    if len(seed_means) > 1 else 0.0
                row[measure] = {"mean": mean, "std": spread, "seeds": len(seed_means)}
        per_rank[str(rank)] = row
    pair = next(((image, text) for image, text in (("clip_image", "clip_text"), ("checker_fidelity", "checker_edit"))
                 if image in measures and text in measures), None)
    suggested = None
    if pair is not None:
        curve = {rank: (per_rank[str(rank)][pair[0]]["mean"], per_rank[str(rank)][pair[1]]["mean"])
                 for rank in plan.ranks if all(m in per_rank[str(rank)] for m in pair)}
        suggested = suggest_rank(curve) if curve else None
    return {
        "measures": {name: dict(zip(("label", "unit", "side"), MEASURES[name])) for name in measures},
        "ranks": per_rank,
        "suggested_rank": suggested,
        "suggested_by": list(pair) if pair else None,
        "rule": (f"of the ranks whose {MEASURES[pair[0]][0]} reaches {KEEP_FRACTION:.0%} of the way from the lowest "
                 f"to the highest measured, the one with the highest {MEASURES[pair[1]][0]}; ties to the lower rank")
        if pair else None,
        "images": len(plan.cells()),
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def eval_summary(plan: EvalPlan, results: dict, folder: Path) -> dict:
    """What the concept records of its latest eval (``concept.yaml``'s ``eval``): small, plain data."""
    return {
        "finished": results["finished"],
        "suggested_rank": results["suggested_rank"],
        "suggested_by": results["suggested_by"],
        "model": plan.model,
        "prompts": plan.prompt_source,
        "prompt_count": len(plan.prompts),
        "seeds": list(plan.seeds),
        "steps": plan.settings.get("steps"),
        "folder": str(Path(folder).resolve()),
        "means": {rank: {measure: round(value["mean"], 4) for measure, value in row.items()}
                  for rank, row in results["ranks"].items()},
    }
