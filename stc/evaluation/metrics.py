"""The papers' measures: CLIP image and text similarity, DINO similarity, and the suggested rank.

- **image similarity** (reconstruction): the mean cosine similarity, in the image space of a CLIP
  model, between a rendered image and every training photo of the concept (textual inversion's
  protocol, which NeTI follows); with a DINO model, the same on its CLS features (DreamBooth's).
- **text similarity** (editability): the cosine similarity, in CLIP space, between a rendered
  image and its prompt with the placeholder replaced by the concept's initializer word.

Scorers are loaded by :func:`load_scorer` from a folder, the hub or the local cache; tests build
tiny random ones from configs. Features are L2-normalised, so a cosine is a dot product.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # what the textual-inversion evaluation uses
DEFAULT_DINO = "facebook/dino-vits16"  # DreamBooth's DINO ViT-S/16
KEEP_FRACTION = 0.9  # the suggested rank keeps this share of the measured image-similarity range


@dataclass
class Scorer:
    """A CLIP (image and text features) or DINO (image features only) model with its processors."""

    kind: str  # "clip" or "dino"
    name: str  # what it was loaded from
    model: object
    image_processor: object
    tokenizer: object | None = None  # CLIP only
    device: str = "cpu"

    def image_features(self, images: list):
        """N x D unit vectors of PIL images (CLIP: the projected image embedding; DINO: the CLS token)."""
        import torch

        pixels = self.image_processor(images=[image.convert("RGB") for image in images],
                                      return_tensors="pt")["pixel_values"].to(self.device)
        with torch.no_grad():
            if self.kind == "clip":
                features = self.model.get_image_features(pixel_values=pixels)
            else:
                features = self.model(pixel_values=pixels).last_hidden_state[:, 0]  # N, D: the CLS token
        features = getattr(features, "pooler_output", features)  # transformers >= 5 returns an output object
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def text_features(self, texts: list[str]):
        """N x D unit vectors of texts (CLIP only)."""
        import torch

        if self.tokenizer is None:
            raise ModelError(f"{self.name} is an image model; text similarity needs a CLIP model")
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        with torch.no_grad():
            features = self.model.get_text_features(input_ids=tokens["input_ids"],
                                                    attention_mask=tokens["attention_mask"])
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features.float(), dim=-1)


def image_similarity(features, reference) -> list[float]:
    """Per rendered image (rows of ``features``), its mean cosine to every reference (the photos)."""
    return (features @ reference.T).mean(dim=1).tolist()  # N x M cosines, averaged over the photos


def text_similarity(image_features, text_features) -> list[float]:
    """Per image, its cosine to its own text (row i against row i)."""
    return (image_features * text_features).sum(dim=-1).tolist()


def load_scorer(kind: str, spec: str, offline: bool = False, device: str = "cpu") -> Scorer:
    """A CLIP (``kind="clip"``) or DINO scorer from a folder, the hub or the local cache; a model
    that is not there (offline, or no network) is a one-line error saying what to download."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

    folder = Path(spec).expanduser()
    source = str(folder) if folder.is_dir() else spec
    local = offline or folder.is_dir()
    flag = "--clip-model" if kind == "clip" else "--dino-model"
    try:
        model_class = CLIPModel if kind == "clip" else AutoModel
        model = model_class.from_pretrained(source, local_files_only=local)
        image_processor = AutoImageProcessor.from_pretrained(source, local_files_only=local)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local) if kind == "clip" else None
    except (OSError, ValueError) as exc:
        if folder.is_dir():
            raise ModelError(f"{flag} {folder} is not a {kind.upper()} model folder with its processor "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        raise ModelError(f"the {kind.upper()} model {spec} is not on this machine{' (offline)' if offline else ''} "
                         f"and could not be downloaded: download it once with `hf download {spec}` (or "
                         f"`huggingface-cli download {spec}`), or pass {flag} FOLDER") from None
    return Scorer(kind, spec, model.to(device).eval(), image_processor, tokenizer, device)


def suggest_rank(curve: dict[int, tuple[float, float]], keep: float = KEEP_FRACTION) -> int:
    """The suggested rank of a measured curve ``{rank: (image similarity, text similarity)}``.

    Of the ranks whose image similarity reaches ``keep`` (90 %) of the way from the lowest to the
    highest measured value (they look nearly as much like the photos as any rank does), the one
    with the highest text similarity (it follows the prompts best); ties go to the lower rank.
    """
    if not curve:
        raise ValueError("no ranks were measured")
    images = [image for image, _ in curve.values()]
    floor = min(images) + keep * (max(images) - min(images))
    candidates = [rank for rank, (image, _) in curve.items() if image >= floor - 1e-12]
    return max(sorted(candidates), key=lambda rank: curve[rank][1])  # max keeps the first (lowest) of ties
