import pytest
from helpers import assert_close_in_scale

from stc.errors import ModelError
from stc.models.base import load_base_model
from stc.render.generation import Renderer, RenderSettings


def test_local_diffusers_folder_loads_the_same_pipeline(tiny, tmp_path):
    folder = tmp_path / "saved-tiny"
    tiny.pipeline.save_pretrained(folder)
    local = load_base_model(str(folder), device="cpu")
    assert local.spec == str(folder.resolve())
    assert local.text_width == tiny.text_width
    settings = RenderSettings(steps=3)
    a = Renderer(tiny, {}).latents("a cat", [0], settings)
    b = Renderer(local, {}).latents("a cat", [0], settings)
    # the folder's weights sit where the loader put them (other alignment: other kernels), so the
    # renders agree to rounding relative to the latents' scale (~50), not to an absolute amount
    assert_close_in_scale(b, a, 1e-4)
    assert (local.pipeline.tokenizer("a photo of a cat").input_ids
            == tiny.pipeline.tokenizer("a photo of a cat").input_ids)


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(ModelError, match="could not load model 'nobody/no-such-model'.*builtin:shapes"):
        load_base_model("nobody/no-such-model", device="cpu")


def test_bad_model_specs_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="not a diffusers pipeline folder"):
        load_base_model(str(tmp_path), device="cpu")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not really")
    with pytest.raises(ModelError, match="only .safetensors"):
        load_base_model(str(pickle), device="cpu")
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"x")
    with pytest.raises(ModelError, match="--model-config"):
        load_base_model(str(single), device="cpu")
    with pytest.raises(ModelError, match="unknown builtin"):
        load_base_model("builtin:huge", device="cpu")
    with pytest.raises(ModelError, match=r"fp16 \(--dtype\) is not supported on the CPU"):
        load_base_model("builtin:tiny", device="cpu", dtype="fp16")
