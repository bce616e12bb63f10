"""stc eval's measures against hand computations, on tiny random CLIP and DINO models."""

import random

import pytest

from stc.errors import ModelError
from stc.evaluation.metrics import image_similarity, load_scorer, suggest_rank, text_similarity
from tests.evaluation_models import save_tiny_clip, save_tiny_dino


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return load_scorer("clip", str(save_tiny_clip(tmp_path_factory.mktemp("clip"))))


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    return load_scorer("dino", str(save_tiny_dino(tmp_path_factory.mktemp("dino"))))


def scenes(count, seed=0):
    from stc.worlds.shapes import sample_scene

    rng = random.Random(seed)
    return [sample_scene(rng).render() for _ in range(count)]


@pytest.mark.parametrize("kind", ["clip", "dino"])
def test_identical_images_score_one(kind, clip, dino):
    scorer = clip if kind == "clip" else dino
    image = scenes(1)[0]
    features = scorer.image_features([image, image.copy()])
    assert image_similarity(features[:1], features[1:]) == pytest.approx([1.0], abs=1e-5)


def test_image_similarity_is_the_mean_cosine_to_every_photo(clip):
    import torch

    images, photos = scenes(3, seed=1), scenes(4, seed=2)
    pixels = clip.image_processor(images=images + photos, return_tensors="pt")["pixel_values"]
    with torch.no_grad():  # by hand: the model's own projection, normalised, every pair averaged
        raw = clip.model.vision_model(pixel_values=pixels).pooler_output
        embedded = clip.model.visual_projection(raw)
    unit = embedded / embedded.norm(dim=-1, keepdim=True)
    expected = [sum(float(unit[i] @ unit[3 + j]) for j in range(4)) / 4 for i in range(3)]
    scores = image_similarity(clip.image_features(images), clip.image_features(photos))
    assert scores == pytest.approx(expected, abs=1e-5)


def test_text_score_orders_two_prompts_as_the_models_logits_do(clip):
    import torch

    prompts = ["a photo of a red circle", "a painting of a blue square"]
    for image in scenes(4, seed=3):
        tokens = clip.tokenizer(prompts, padding=True, return_tensors="pt")
        pixels = clip.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            logits = clip.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                pixel_values=pixels).logits_per_image[0]
        features = clip.image_features([image, image])
        scores = text_similarity(features, clip.text_features(prompts))
        assert (scores[0] > scores[1]) == bool(logits[0] > logits[1])
        scale = float(clip.model.logit_scale.detach().exp())  # the logits are the cosines times the learned scale
        assert [score * scale for score in scores] == pytest.approx(logits.tolist(), rel=1e-4, abs=1e-4)


def test_suggested_rank_on_a_made_up_curve():
    curve = {1: (0.60, 0.30), 2: (0.70, 0.29), 4: (0.78, 0.28), 8: (0.795, 0.27), 16: (0.80, 0.25),
             128: (0.80, 0.22)}
    # 90 % of the image range 0.60..0.80 is 0.78: ranks 4, 8, 16, 128 qualify; rank 4 follows the text best
    assert suggest_rank(curve) == 4
    assert suggest_rank(curve, keep=1.0) == 16  # only 16 and 128 reach the top; 16 edits better
    flat = {1: (0.5, 0.2), 2: (0.5, 0.2), 4: (0.5, 0.2)}
    assert suggest_rank(flat) == 1  # nothing to choose: the lowest rank
    assert suggest_rank({8: (0.9, 0.1), 2: (0.2, 0.3)}) == 8


def test_a_missing_model_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError) as error:
        load_scorer("clip", "openai/clip-vit-base-patch32", offline=True)
    message = str(error.value)
    assert "\n" not in message and "hf download openai/clip-vit-base-patch32" in message
    with pytest.raises(ModelError, match="--clip-model .* is not a CLIP model folder"):
        load_scorer("clip", str(tmp_path))
