"""stc gen: prompts with several concepts, inline ranks, PNG metadata, call counts, the CLI."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import invoke, make_concept, make_mapper
from PIL import Image

from stc.errors import BadInput
from stc.method.encoding import text_transformer
from stc.method.spacetime import cross_attention_layer_names
from stc.render.generation import Renderer, RenderSettings
from stc.render.pngmeta import a1111_parameters, parse_parameters, save_png
from stc.render.prompts import parse_prompt, resolve_ranks
from stc.store.conceptio import weights_bytes
from stc.store.registry import Registry


@pytest.fixture
def saved_concepts(tiny):
    """Concepts mydog and mycat in the (temporary) registry, with different random mappers."""
    registry = Registry()
    for name, seed in (("mydog", 1), ("mycat", 2)):
        mapper = make_mapper(seed)
        registry.save(make_concept(name, cross_attention_layer_names(tiny.pipeline.unet)), weights_bytes(mapper, name))
    return registry


def count_text_encoder_calls(renderer) -> list:
    """Instrument the text encoder: every call (batched or not) appends its batch size."""
    calls = []
    encoder = text_transformer(renderer.base.pipeline.text_encoder).encoder
    encoder.register_forward_hook(lambda module, args, kwargs, output: calls.append(kwargs.get(
        "inputs_embeds", args[0] if args else None).shape[0]), with_kwargs=True)
    return calls


# --------------------------------------------------------------------------- prompts


def test_inline_ranks_are_parsed_per_concept():
    parsed = parse_prompt("<mydog:8> sitting next to <mycat> and <mydog>")
    assert parsed.text == "<mydog> sitting next to <mycat> and <mydog>"
    assert parsed.ranks == {"mydog": 8, "mycat": None}
    limits = {"mydog": 128, "mycat": 16}
    assert resolve_ranks(parsed, limits, 2) == {"mydog": 8, "mycat": 2}
    assert resolve_ranks(parsed, limits) == {"mydog": 8, "mycat": 16}  # no default: each concept's full rank
    assert parse_prompt("a cat").ranks == {}
    assert parse_prompt("a < b > c").ranks == {}  # opens no reference: left as text
    for bad, fragment in (("<mydog:4> and <mydog:8>", "two different ranks"), ("<MyDog>", "<mydog>")):
        with pytest.raises(BadInput, match=fragment):
            parse_prompt(bad)
    # ranks are checked against each concept's own maximum, in one place
    for prompt, default, message in (("<mydog:0>", None, "mydog has ranks 1..128; <mydog:0>"),
                                     ("<mydog:200>", None, "mydog has ranks 1..128; <mydog:200>"),
                                     ("<mycat> and <mydog>", 32, "mycat has ranks 1..16; --rank 32")):
        with pytest.raises(BadInput) as caught:
            resolve_ranks(parse_prompt(prompt), limits, default)
        assert str(caught.value).startswith(message)


def test_inline_rank_overrides_the_default_rank(tiny):
    unet = tiny.pipeline.unet
    renderer = Renderer(tiny, {"mydog": (make_concept("mydog", cross_attention_layer_names(unet)), make_mapper(1))})
    settings = RenderSettings(steps=2)
    inline = renderer.condition("<mydog:8> on the moon", settings)  # default rank 128
    default = renderer.condition("<mydog> on the moon", settings, rank=8)
    full = renderer.condition("<mydog> on the moon", settings)
    assert inline.ranks == default.ranks == {"mydog": 8}
    assert torch.equal(inline.keys, default.keys) and torch.equal(inline.values, default.values)
    assert not torch.allclose(inline.keys, full.keys)


# --------------------------------------------------------------------------- several concepts


def placeholder_inputs(renderer, prompt: str, settings: RenderSettings) -> dict[str, torch.Tensor]:
    """The token embeddings the text encoder receives at each concept's position: name -> K·L x D."""
    captured = []
    embeddings = text_transformer(renderer.base.pipeline.text_encoder).embeddings
    handle = embeddings.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs["inputs_embeds"]) if "inputs_embeds" in kwargs else None,
        with_kwargs=True,
    )
    try:
        renderer.condition(prompt, settings)
    finally:
        handle.remove()
    inputs = torch.cat(captured)  # K·L, S, D
    ids = renderer.text.tokenize(parse_prompt(prompt).text)[0][0]
    return {name: inputs[:, int((ids == slot.token_id).nonzero()[0])] for name, slot in renderer.text.slots.items()}


def mapper_tokens(mapper, timesteps, num_layers: int) -> torch.Tensor:
    rows_t = timesteps.float().repeat_interleave(num_layers)
    rows_l = torch.arange(num_layers).repeat(len(timesteps)).float()
    return mapper.split(mapper(rows_t, rows_l))[0]


def test_each_placeholder_is_conditioned_by_its_own_mapper(tiny):
    unet = tiny.pipeline.unet
    dog, cat = (make_concept("mydog", cross_attention_layer_names(unet)),
                make_concept("mycat", cross_attention_layer_names(unet)))
    mapper_a, mapper_b = make_mapper(1), make_mapper(2)
    settings = RenderSettings(steps=2, batch_size=2)
    prompt = "<mydog> sitting next to <mycat>"
    straight = Renderer(tiny, {"mydog": (dog, mapper_a), "mycat": (cat, mapper_b)})
    timesteps = straight.timesteps(settings)
    tokens_a, tokens_b = mapper_tokens(mapper_a, timesteps, 16), mapper_tokens(mapper_b, timesteps, 16)
    assert not torch.allclose(tokens_a, tokens_b)

    inputs = placeholder_inputs(straight, prompt, settings)
    assert torch.allclose(inputs["mydog"], tokens_a, atol=1e-6)
    assert torch.allclose(inputs["mycat"], tokens_b, atol=1e-6)
    straight_images = straight.latents(prompt, [0, 1], settings)

    swapped = Renderer(tiny, {"mydog": (dog, mapper_b), "mycat": (cat, mapper_a)})
    inputs = placeholder_inputs(swapped, prompt, settings)
    assert torch.allclose(inputs["mydog"], tokens_b, atol=1e-6)
    assert torch.allclose(inputs["mycat"], tokens_a, atol=1e-6)
    swapped_images = swapped.latents(prompt, [0, 1], settings)
    assert (straight_images - swapped_images).abs().max() > 1e-3

    # swapping the names in the prompt too gives back the first images: each name follows its mapper
    back = swapped.latents("<mycat> sitting next to <mydog>", [0, 1], settings)
    assert torch.allclose(back, straight_images, atol=1e-5)


def test_negative_with_a_malformed_concept_and_overlong_prompts_are_clear_errors(tiny):
    with pytest.raises(BadInput, match="--negative"):
        RenderSettings(negative="<mydog:abc>")
    renderer = Renderer(tiny, {"mydog": (make_concept("mydog", cross_attention_layer_names(tiny.pipeline.unet)),
                                         make_mapper(1))})
    with pytest.raises(BadInput, match="shorten the prompt"):
        renderer.condition("cat " * 80 + "<mydog>", RenderSettings(steps=1))
    with pytest.raises(BadInput, match="not loaded"):
        renderer.render("<mycat>", [0], RenderSettings(steps=1))


# --------------------------------------------------------------------------- speed


def test_text_encoder_calls_stay_within_the_design_and_do_not_grow_with_images(tiny):
    renderer = Renderer(tiny, {"mydog": (make_concept("mydog", cross_attention_layer_names(tiny.pipeline.unet)),
                                         make_mapper(1))})
    calls = count_text_encoder_calls(renderer)
    settings = RenderSettings(steps=3, batch_size=2)
    counts = []
    for seeds in ([0], [0, 1, 2]):
        calls.clear()
        renderer.latents("<mydog> on the moon", seeds, settings)
        counts.append(len(calls))
    assert counts == [2, 2]  # the negative prompt + all 3 x 16 (step, layer) rows in one call
    for steps in (16, 17):  # 256 and 272 (step, layer) rows: 1 and 2 batched calls
        calls.clear()
        renderer.condition("<mydog> on the moon", RenderSettings(steps=steps), negative=torch.zeros(1, 77, 32))
        assert len(calls) == math.ceil(steps * 16 / 256), steps
    calls.clear()
    renderer.latents("a cat on the moon", [0, 1, 2], RenderSettings(steps=3))
    assert len(calls) == 2  # negative + positive, plain SD


# --------------------------------------------------------------------------- metadata


def test_png_metadata_round_trips(tiny, tmp_path):
    renderer = Renderer(tiny, {
        "mydog": (make_concept("mydog", cross_attention_layer_names(tiny.pipeline.unet)), make_mapper(1)),
        "mycat": (make_concept("mycat", cross_attention_layer_names(tiny.pipeline.unet)), make_mapper(2)),
    })
    settings = RenderSettings(steps=2, cfg=6.0, scheduler="euler", negative="blurry, low quality: bad", rank=16)
    [rendered] = renderer.render("<mydog:4> next to <mycat>, at night", [7], settings)
    path = save_png(rendered, tmp_path)
    from PIL import Image

    with Image.open(path) as image:
        text = dict(image.text)
    record = json.loads(text["stc"])
    assert record == rendered.metadata
    assert record["concepts"] == {"mydog": {"rank": 4, "sha256": "ab" * 32}, "mycat": {"rank": 16, "sha256": "ab" * 32}}
    lines = text["parameters"].split("\n")
    assert lines[0] == "<mydog:4> next to <mycat>, at night"
    assert lines[1] == "Negative prompt: blurry, low quality: bad"
    assert lines[2].startswith("Steps: 2, Sampler: Euler, CFG scale: 6.0, Seed: 7, Size: 64x64, ")
    parsed = parse_parameters(text["parameters"])
    assert parsed.pop("extra") == {}
    assert parsed == {key: record[key] for key in parsed}
    assert set(record) - set(parsed) == {"dtype"}


def test_parameters_without_negative_or_concepts():
    metadata = {
        "prompt": "a cat\non two lines", "negative": "", "seed": 1, "steps": 5, "cfg": 7.5, "scheduler": "pndm",
        "width": 64, "height": 96, "base_model": "/models/my, model", "concepts": {}, "stc_version": "0.1.0",
    }
    text = a1111_parameters(metadata)
    assert "Negative prompt" not in text and "Sampler: PLMS" in text and 'Model: "/models/my, model"' in text
    parsed = parse_parameters(text)
    parsed.pop("extra")
    assert parsed == metadata


# --------------------------------------------------------------------------- CLI


def test_gen_two_concepts_json_records(saved_concepts, tmp_path):
    result = invoke("gen", "<mydog> sitting next to <mycat:4>", "--rank", 8, "-n", 3, "--batch-size", 2,
                    "--steps", 2, "--out", tmp_path, "--json", "--seed", 3)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["seed"] for r in records] == [3, 4, 5]
    assert all(r["concepts"]["mydog"]["rank"] == 8 and r["concepts"]["mycat"]["rank"] == 4 for r in records)
    assert len({r["concepts"]["mydog"]["sha256"] for r in records}) == 1
    from PIL import Image

    pixels = []
    for record in records:
        with Image.open(record["path"]) as image:
            assert image.size == (64, 64)
            assert json.loads(image.text["stc"]) == {k: v for k, v in record.items() if k != "path"}
            pixels.append(np.asarray(image))
    assert not np.array_equal(pixels[0], pixels[1])


def test_gen_is_byte_reproducible(saved_concepts, tmp_path):
    args = ("gen", "<mydog> and <mycat>", "--steps", 2, "--seed", 4, "--scheduler", "ddim", "--cfg", 5)
    first = invoke(*args, "--out", tmp_path / "a").stdout.strip()
    second = invoke(*args, "--out", tmp_path / "b").stdout.strip()
    third = invoke(*args, "--rank", 2, "--out", tmp_path / "c").stdout.strip()
    data = [Path(path).read_bytes() for path in (first, second, third)]
    assert data[0] == data[1] and data[0] != data[2]


def test_gen_unknown_concept_lists_close_names(saved_concepts):
    result = invoke("gen", "<mydgo> on the moon", "--steps", 1)
    assert result.exit_code == 1
    [line] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert "mydgo" in line and "mydog" in line and "Traceback" not in result.output


@pytest.mark.parametrize("args, fragment", [
    (("--scheduler", "heun"), "--scheduler"),
    (("--width", 60), "--width"),
    (("--height", 0), "--height"),
    (("--dtype", "fp8"), "--dtype"),
    (("--dtype", "fp16", "--device", "cpu"), "fp16"),
    (("--rank", 0), "--rank"),
    (("--negative", "<mycat:abc>"), "--negative"),
])
def test_gen_bad_options_are_one_line_errors(saved_concepts, args, fragment):
    result = invoke("gen", "<mydog>", "--steps", 1, *args)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr


def test_gen_sizes_schedulers_and_bf16(saved_concepts, tmp_path):
    from PIL import Image

    pixels = {}
    for scheduler in ("dpm", "ddim", "euler", "pndm"):
        result = invoke("gen", "<mydog>", "--steps", 2, "--scheduler", scheduler, "--width", 72, "--height", 64,
                        "--out", tmp_path / scheduler)
        assert result.exit_code == 0, result.output
        with Image.open(result.stdout.strip()) as image:
            assert image.size == (72, 64)
            assert parse_parameters(image.text["parameters"])["scheduler"] == scheduler
            pixels[scheduler] = np.asarray(image)
    assert not np.array_equal(pixels["dpm"], pixels["euler"])
    result = invoke("gen", "<mydog>", "--steps", 2, "--dtype", "bf16", "--device", "cpu", "--json", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dtype"] == "bfloat16"


def test_gen_without_concept_notes_plain_sd(tmp_path):
    result = invoke("gen", "a cat on the moon", "--model", "builtin:tiny", "--steps", 1, "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    assert "plain Stable Diffusion" in result.stderr
    assert json.loads(result.stdout)["concepts"] == {}


# --------------------------------------------------------------------------- long renders


def interrupt_at_decode(monkeypatch, calls: int):
    """Ctrl-C while the ``calls``-th batch is decoded (the batches before it are done)."""
    real_decode = Renderer.decode
    seen = []

    def decode(self, latents):
        seen.append(1)
        if len(seen) == calls:
            raise KeyboardInterrupt
        return real_decode(self, latents)

    monkeypatch.setattr(Renderer, "decode", decode)


def test_an_interrupted_gen_keeps_every_finished_image_and_says_so(saved_concepts, tmp_path, monkeypatch):
    interrupt_at_decode(monkeypatch, calls=3)
    out = tmp_path / "out"
    result = invoke("gen", "<mydog> on the moon", "-n", 6, "--batch-size", 2, "--steps", 1, "--out", out)
    assert result.exit_code == 130
    assert "Stopped: rendering stopped: 4 of 6 image(s) were finished and saved in" in result.stderr
    saved = sorted(out.iterdir())
    assert [path.name for path in saved] == [f"mydog-on-the-moon-s{seed}-r128.png" for seed in range(4)]
    assert result.stdout.split() == [str(path) for path in saved]  # each path printed as it was written
    for path in saved:
        with Image.open(path) as image:
            image.load()  # whole files, none cut off


def test_an_interrupted_grid_keeps_its_finished_cells(saved_concepts, tmp_path, monkeypatch):
    interrupt_at_decode(monkeypatch, calls=2)
    result = invoke("grid", "<mydog> on the moon", "--ranks", "1,2", "--seeds", "0,1", "--steps", 1,
                    "--batch-size", 2, "--out", tmp_path / "g.png")
    assert result.exit_code == 130 and "2 of 4 cell image(s) were finished" in result.stderr
    assert sorted(path.name for path in (tmp_path / "g").iterdir()) == ["p0-s0-r1.png", "p0-s1-r1.png"]
    assert not (tmp_path / "g.png").exists()


def test_gen_checks_out_first_and_warns_far_from_the_model_size(saved_concepts, tmp_path, monkeypatch):
    import stc.models.base

    (tmp_path / "taken").write_text("a file")
    loaded = []
    real_load = stc.models.base.load_base_model
    monkeypatch.setattr(stc.models.base, "load_base_model", lambda *a, **k: loaded.append(1) or real_load(*a, **k))
    result = invoke("gen", "<mydog> on the moon", "--out", tmp_path / "taken")
    assert result.exit_code == 1 and "--out" in result.stderr and "is a file" in result.stderr and not loaded
    result = invoke("gen", "<mydog> on the moon", "--steps", 1, "--width", 512, "--out", tmp_path / "wide")
    assert result.exit_code == 0, result.output
    assert "512x64 px is far from builtin:tiny's 64 px" in result.stderr and "about 8x" in result.stderr
    quiet = invoke("gen", "<mydog> on the moon", "--steps", 1, "--width", 96, "--out", tmp_path / "fine")
    assert "far from" not in quiet.stderr


def test_concepts_of_two_families_in_one_prompt_say_they_cannot_render_together(tmp_path):
    """An SDXL concept beside an SD 1.x one: no --model fits both, so the error does not suggest one."""
    from helpers import assert_one_line_error, save_concept

    save_concept("wedge", base_model="builtin:shapes")
    save_concept("wsx", base_model="builtin:shapes-sdxl",
                 mapper={**make_mapper(0).config.to_dict(), "encoder_widths": [32, 64]})
    result = invoke("gen", "a <wsx> and a <wedge>", "--steps", 1, "--out", tmp_path / "out")
    assert_one_line_error(result, "'wsx' (SDXL, trained on builtin:shapes-sdxl)", "'wedge' (SD 1.x",
                          "cannot render together")
    assert "--model" not in result.stderr
    with_model = invoke("gen", "a <wsx> and a <wedge>", "--model", "builtin:tiny", "--out", tmp_path / "out")
    assert_one_line_error(with_model, "cannot render together")


def test_an_empty_prompt_is_a_one_line_error_before_anything_loads(no_network, monkeypatch, tmp_path):
    """``stc gen ''`` used to load (download) the default model first and fail after a minute."""
    from helpers import assert_one_line_error

    import stc.models.base as base

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded for an empty prompt")

    monkeypatch.setattr(base, "load_base_model", no_load)
    for args in (("gen", "", "--out", tmp_path / "out"), ("gen", "   ", "--out", tmp_path / "out"),
                 ("grid", " ", "--out", tmp_path / "out" / "grid.png")):
        result = invoke(*args)
        assert_one_line_error(result, "the prompt is empty", "builtin:shapes")
    assert not (tmp_path / "out").exists()


def test_a_hub_model_that_cannot_load_advises_the_offline_builtin(monkeypatch):
    from stc.errors import ModelError
    from stc.models.base import load_base_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="--model builtin:shapes") as caught:
        load_base_model("nobody/not-downloaded", device="cpu")
    assert "builtin:tiny" not in str(caught.value)


def test_sizes_far_outside_the_model_are_refused_with_their_memory_unless_forced(saved_concepts, tmp_path,
                                                                                monkeypatch):
    from helpers import assert_one_line_error

    import stc.models.base

    loaded = []
    real_load = stc.models.base.load_base_model
    monkeypatch.setattr(stc.models.base, "load_base_model", lambda *a, **k: loaded.append(1) or real_load(*a, **k))
    huge = invoke("gen", "<mydog> on the moon", "--width", 100000, "--out", tmp_path / "huge")
    assert_one_line_error(huge, "100000x512 px", "far outside", "12.2 GiB", "--force-size")
    grid = invoke("grid", "<mydog>", "--height", 100000, "--out", tmp_path / "grid.png")
    assert_one_line_error(grid, "x100000 px", "--force-size")
    assert not loaded  # refused before any model loads
    far = invoke("gen", "<mydog> on the moon", "--steps", 1, "--width", 1024, "--out", tmp_path / "far")
    assert_one_line_error(far, "1024x64 px is far outside builtin:tiny's range (it was trained at 64 px)",
                          "MiB", "--force-size")  # 16x builtin:tiny's side: refused once the model is known
    assert not (tmp_path / "far").exists() or not list((tmp_path / "far").iterdir())
    forced = invoke("gen", "<mydog> on the moon", "--steps", 1, "--width", 1024, "--force-size",
                    "--out", tmp_path / "forced")
    assert forced.exit_code == 0 and "far from builtin:tiny's 64 px" in forced.stderr, forced.output


def test_a_resolution_far_outside_the_model_is_refused_before_training(photos, monkeypatch):
    from helpers import assert_one_line_error

    import stc.models.base

    loaded = []
    real_load = stc.models.base.load_base_model
    monkeypatch.setattr(stc.models.base, "load_base_model", lambda *a, **k: loaded.append(1) or real_load(*a, **k))
    result = invoke("train", photos, "--name", "big", "--model", "builtin:tiny", "--resolution", 100000)
    assert_one_line_error(result, "--resolution 100000x100000 px is far outside", "TiB", "--force-size")
    assert not loaded
    result = invoke("train", photos, "--name", "big", "--model", "builtin:tiny", "--resolution", 1024, "--steps", 1)
    assert_one_line_error(result, "--resolution 1024x1024 px is far outside builtin:tiny's range", "--force-size")
    assert Registry().names() == []


@pytest.mark.parametrize("scheduler", ["pndm", "dpm"])
def test_progress_counts_the_users_steps(tiny, scheduler):
    """PNDM makes 11 UNet calls for --steps 10 (its warm-up repeats one): progress still says n/10."""
    from stc.render.generation import RenderRequest

    reports = []
    settings = RenderSettings(steps=10, scheduler=scheduler, batch_size=1)
    requests = [RenderRequest("a cat", seed) for seed in (0, 1)]
    list(Renderer(tiny, {}).iter_render(requests, settings, progress=lambda done, total: reports.append((done, total))))
    assert {total for _, total in reports} == {20}
    assert [done for done, _ in reports] == sorted(done for done, _ in reports) and reports[-1] == (20, 20)
    assert {done for done, _ in reports} >= {10, 20}  # the first image's end is 10/20


def test_ctrl_c_before_the_first_image_says_nothing_was_written(saved_concepts, tmp_path, monkeypatch):
    """Not a bare "Interrupted.": what happened, and that nothing is lost."""
    import stc.models.base

    interrupt_at_decode(monkeypatch, calls=1)
    out = tmp_path / "out"
    result = invoke("gen", "<mydog> on the moon", "--steps", 1, "--out", out)
    assert result.exit_code == 130 and "before the first image was finished: nothing was written" in result.stderr
    assert not out.exists() or not list(out.iterdir())
    interrupt_at_decode(monkeypatch, calls=1)
    grid = invoke("grid", "<mydog>", "--ranks", "1", "--seeds", "0", "--steps", 1, "--out", tmp_path / "g.png")
    assert grid.exit_code == 130 and "before its first cell was finished: nothing was written" in grid.stderr
    assert not (tmp_path / "g").exists() or not list((tmp_path / "g").iterdir())

    def interrupted_load(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stc.models.base, "load_base_model", interrupted_load)
    result = invoke("gen", "<mydog> on the moon", "--out", out)
    assert result.exit_code == 130
    assert "Stopped: stopped while loading the model, before the first image: nothing was written" in result.stderr
