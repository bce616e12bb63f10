"""stc eval end to end: builtin:shapes with the pixel checker alone (offline, no CLIP), builtin:tiny-sdxl
with a tiny random CLIP from a folder; Ctrl-C and --resume; the record with the concept."""

import json
from pathlib import Path

import pytest
import torch
import urllib3  # noqa: F401  (on import it probes IPv6 with a socket: no network, but no_network counts it)
from helpers import assert_one_line_error, invoke

from stc.method.mapper import MapperConfig, NeTIMapper
from stc.store.conceptio import weights_bytes
from stc.store.registry import Registry
from tests.evaluation_models import save_tiny_clip, save_tiny_dino
from tests.helpers import make_concept

WEDGE = Path(__file__).resolve().parent.parent / "examples" / "wedge"


def random_concept(name: str, spec: str, initializer: str = "triangle") -> None:
    """A concept with a random mapper (hidden 8: ranks 1..8) on ``spec``, its photos examples/wedge."""
    from stc.method.spacetime import cross_attention_layer_names
    from stc.models.base import load_base_model

    base = load_base_model(spec, device="cpu")
    widths = list(base.encoder_widths)
    several = len(widths) > 1
    config = MapperConfig(text_width=sum(widths), norm_scale=0.5, hidden_dim=8,
                          num_layers=len(cross_attention_layer_names(base.pipeline.unet)),
                          encoder_widths=widths if several else None,
                          norm_scales=[0.5] * len(widths) if several else None)
    mapper = NeTIMapper(config, generator=torch.Generator().manual_seed(0)).eval().requires_grad_(False)
    concept = make_concept(name, cross_attention_layer_names(base.pipeline.unet), base_model=spec,
                           text_width=sum(widths), mapper=config.to_dict(), initializer=initializer)
    concept.training.photos_dir = str(WEDGE)
    Registry().save(concept, weights_bytes(mapper, name))


def test_eval_on_the_shapes_world_after_training_offline(tmp_path, no_network):
    result = invoke("train", WEDGE, "--name", "wedge", "--init", "triangle", "--model", "builtin:shapes",
                    "--steps", "3", "--preview-every", "0")
    assert result.exit_code == 0, result.output
    weights = (Registry().path_of("wedge") / "mapper.safetensors").read_bytes()
    out = tmp_path / "eval"
    result = invoke("eval", "wedge", "--ranks", "1,128", "--seeds", "0,1", "--steps", "2", "--out", out)
    assert result.exit_code == 0, result.output
    assert "pixel checker alone, no CLIP model" in result.stderr
    assert "suggested rank for these prompts:" in result.stdout and "checker: concept kept" in result.stdout
    images = sorted(path.name for path in (out / "images").glob("*.png"))
    assert len(images) == 2 * 4 * 2 and "r128-p3-s1.png" in images  # ranks x the world's 4 prompts x seeds
    record = json.loads((out / "eval.json").read_text())
    results = record["results"]
    assert set(results["ranks"]) == {"1", "128"} and results["suggested_rank"] in (1, 128)
    scores = json.loads((out / "scores.json").read_text())
    for rank in (1, 128):  # the mean over seeds of the mean over prompts, by hand
        per_seed = []
        for seed in (0, 1):
            values = [scores[f"r{rank}-p{index}-s{seed}.png"]["checker_fidelity"] for index in range(4)]
            per_seed.append(sum(values) / 4)
        assert results["ranks"][str(rank)]["checker_fidelity"]["mean"] == pytest.approx(sum(per_seed) / 2)
    assert (out / "curve.png").is_file() and (out / "curve.svg").read_text().startswith("<svg")
    # recorded with the concept, its weights untouched; show and ls --json carry it
    assert (Registry().path_of("wedge") / "mapper.safetensors").read_bytes() == weights
    assert Registry().load("wedge").evaluation["suggested_rank"] == results["suggested_rank"]
    shown = invoke("show", "wedge")
    assert "latest eval" in shown.stdout and "suggested rank" in shown.stdout
    listed = json.loads(invoke("ls", "--json").stdout)
    assert listed[0]["eval"]["suggested_rank"] == results["suggested_rank"]
    assert json.loads(invoke("show", "wedge", "--json").stdout)["eval"]["model"] == "builtin:shapes"


def test_interrupting_and_resuming_loses_nothing(tmp_path, monkeypatch):
    from stc.evaluation import protocol
    from stc.render.generation import Renderer

    random_concept("blob", "builtin:shapes")
    out = tmp_path / "eval"
    rendered, real_iter = [], Renderer.iter_render

    def counting(self, requests, settings, progress=None):
        for image in real_iter(self, requests, settings, progress):
            rendered.append((image.prompt, image.seed, dict(image.ranks)["blob"]))
            yield image

    monkeypatch.setattr(Renderer, "iter_render", counting)
    real_score, calls = protocol.Scorers.score, []

    def stop_at_the_sixth(self, *args):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_score(self, *args)

    monkeypatch.setattr(protocol.Scorers, "score", stop_at_the_sixth)
    arguments = ["eval", "blob", "--ranks", "1,8", "--seeds", "0,1", "--steps", "2", "--batch-size", "3", "--out", out]
    stopped = invoke(*arguments)
    assert stopped.exit_code == 130, stopped.output
    assert "5 of 16 images are finished and scored" in stopped.stderr and "--resume" in stopped.stderr
    kept = {path.name: path.read_bytes() for path in (out / "images").glob("*.png")}
    assert len(kept) == 6  # the sixth was saved, then Ctrl-C came before its score
    assert len(json.loads((out / "scores.json").read_text())) == 5
    assert Registry().load("blob").evaluation == {}  # nothing recorded for an unfinished eval

    assert_one_line_error(invoke(*arguments), "holds an eval already", "--resume")
    rendered.clear()
    resumed = invoke(*arguments, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert len(rendered) == 16 - 6  # only what was missing
    for name, data in kept.items():
        assert (out / "images" / name).read_bytes() == data  # not rendered again
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores) == 16 and all(set(value) == {"checker_fidelity", "checker_edit"} for value in scores.values())
    assert Registry().load("blob").evaluation["suggested_rank"] is not None
    rendered.clear()
    again = invoke(*arguments, "--resume", "--json")  # a finished eval re-scores without rendering
    assert again.exit_code == 0 and rendered == []
    assert json.loads(again.stdout)["suggested_rank"] == Registry().load("blob").evaluation["suggested_rank"]


def test_eval_on_tiny_sdxl_with_a_clip_folder(tmp_path):
    random_concept("blob", "builtin:tiny-sdxl", initializer="cat")
    clip, dino = save_tiny_clip(tmp_path / "clip"), save_tiny_dino(tmp_path / "dino")
    out = tmp_path / "eval"
    result = invoke("eval", "blob", "--ranks", "1,8", "--seeds", "0,1", "--steps", "1", "--clip-model", clip,
                    "--dino", "--dino-model", dino, "--prompts", write_prompts(tmp_path), "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert set(summary["measures"]) == {"clip_image", "clip_text", "dino_image"}
    for rank in ("1", "8"):
        for measure in ("clip_image", "clip_text", "dino_image"):
            value = summary["ranks"][rank][measure]
            assert -1.0 <= value["mean"] <= 1.0 and value["seeds"] == 2 and value["std"] >= 0
    assert summary["suggested_rank"] in (1, 8) and summary["suggested_by"] == ["clip_image", "clip_text"]
    assert summary["plan"]["prompts"] == ["a photo of a {}", "a {} on the moon"]
    assert len(list((out / "images").glob("*.png"))) == 2 * 2 * 2
    svg = (out / "curve.svg").read_text()
    for label in ("CLIP image similarity", "CLIP text similarity", "DINO image similarity", "truncation rank",
                  "mean cosine", f"suggested rank {summary['suggested_rank']}"):
        assert label in svg


def write_prompts(folder: Path) -> Path:
    path = folder / "prompts.txt"
    path.write_text("# two prompts\na photo of a <blob>\na {} on the moon\n", encoding="utf-8")
    return path


def test_a_missing_clip_model_is_one_line_before_anything_renders(tmp_path):
    random_concept("blob", "builtin:tiny-sdxl", initializer="cat")
    result = invoke("--offline", "eval", "blob", "--ranks", "1", "--seeds", "0", "--out", tmp_path / "eval")
    assert_one_line_error(result, "openai/clip-vit-base-patch32", "hf download")
    assert not (tmp_path / "eval" / "images").exists()
