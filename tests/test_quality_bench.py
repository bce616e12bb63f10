"""benchmarks/quality.py: its textual-inversion baseline, its scoring and its report (the run itself is
CI's `python -m benchmarks.quality --quick`)."""

import torch

from benchmarks import quality
from stc.method.mapper import MapperConfig, NeTIMapper
from stc.worlds.shapes import Scene


def test_textual_inversion_is_one_vector_for_every_timestep_and_layer_and_stays_one_while_training():
    mapper = NeTIMapper(MapperConfig(text_width=8, norm_scale=2.0, bypass=False, nested_dropout=False),
                        generator=torch.Generator().manual_seed(0))
    quality.make_constant(mapper)
    trainable = [name for name, p in mapper.named_parameters() if p.requires_grad]
    assert trainable == ["output_layer.0.bias"]
    t = torch.tensor([10.0, 500.0, 990.0, 10.0])
    layers = torch.tensor([0.0, 7.0, 15.0, 3.0])
    out = mapper(t, layers)
    assert torch.allclose(out, out[:1].expand_as(out))
    optimizer = torch.optim.AdamW([p for p in mapper.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        loss = (mapper(t, layers) * torch.arange(8.0)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moved = mapper(t, layers)
    assert torch.allclose(moved, moved[:1].expand_as(moved)) and not torch.allclose(moved, out)
    assert torch.allclose(moved.norm(dim=-1), torch.full((4,), 2.0))  # normalised like every NeTI output


def test_scores_count_the_concept_and_the_edit_from_pixels():
    images = [
        Scene("triangle", "yellow", "green", 16, 5, 5).render(),  # concept, edited
        Scene("triangle", "yellow", "blue", 16, 5, 5).render(),  # concept, not edited
        Scene("circle", "yellow", "green", 16, 5, 5).render(),  # edited, wrong shape
        Scene("triangle", "red", "green", 16, 5, 5).render(),  # edited, wrong colour
    ]
    scores = quality.score(images, "green")
    assert (scores.fidelity, scores.editability, scores.edit_and_concept, scores.n) == (0.5, 0.75, 0.25, 4)
    assert quality.score(images, None).editability == 0.0
    blue = [Scene("triangle", "blue", "red", 16, 5, 5).render(), Scene("square", "blue", "red", 16, 5, 5).render()]
    assert quality.score(blue + images, None, "blue").recolour == 1 / 6  # a blue triangle, not any blue shape


def test_the_report_has_every_rank_variant_and_floor():
    row = {"fidelity": 0.5, "editability": 0.25, "edit_and_concept": 0.125, "recolour": 0.375, "n": 8}
    results = {
        "variants": {
            "neti": {"training": {"eval_loss_before": 0.2, "eval_loss_after": 0.1},
                     "ranks": {str(r): dict(row) for r in (1, 8, 128)}},
            "textual-inversion": {"training": {"eval_loss_before": 0.2, "eval_loss_after": 0.15},
                                  "ranks": {"128": dict(row)}},
        },
        "floors": {"initializer word: triangle": dict(row)},
    }
    text = quality.table(results)
    for needle in ("| 1 |", "| 8 |", "| 128 |", "| neti |", "| textual-inversion |", "floor — initializer word",
                   "0.50 (4/8)", "0.38 (3/8)", "0.1500"):
        assert needle in text, needle
    svg = quality.svg_plot(results)
    assert svg.startswith("<svg") and svg.count("<polyline") == 4 and svg.count("<circle") == 12
