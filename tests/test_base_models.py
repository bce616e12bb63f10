"""Base models as users keep them: the default model, offline use, local folders."""


import pytest
from helpers import assert_one_line_error, invoke

from stc.errors import BadInput, ModelError
from stc.models.base import load_base_model
from stc.settings import DEFAULT_MODEL, Settings


def default_model() -> str:
    return Settings.from_environment().default_model()


def test_the_default_model_comes_from_stc_model_then_the_config_file(stc_home, monkeypatch):
    monkeypatch.delenv("STC_MODEL", raising=False)
    assert default_model() == DEFAULT_MODEL
    stc_home.mkdir()
    (stc_home / "config.yaml").write_text("model: my-org/my-model\n")
    assert default_model() == "my-org/my-model"
    monkeypatch.setenv("STC_MODEL", "builtin:tiny")
    assert default_model() == "builtin:tiny"
    monkeypatch.delenv("STC_MODEL")
    (stc_home / "config.yaml").write_text("model: [1, 2]\n")
    with pytest.raises(BadInput, match="config.yaml"):
        default_model()


def test_settings_passed_win_over_the_environment_and_are_never_written_to_it(stc_home, monkeypatch):
    """The library behaves the same when called from Python: a Settings object says it all."""
    import os

    monkeypatch.setenv("STC_MODEL", "builtin:tiny")
    monkeypatch.delenv("STC_PREDICTION_TYPE", raising=False)
    env = Settings.from_environment(prediction_type="v_prediction", threads=1)
    assert (env.model, env.prediction_type, env.threads) == ("builtin:tiny", "v_prediction", 1)
    assert env.replace(model="builtin:tiny-sd2").default_model() == "builtin:tiny-sd2"
    base = load_base_model("builtin:tiny", device="cpu", env=env)
    assert base.prediction_type == "v_prediction"  # from the settings passed, not the environment
    assert "STC_PREDICTION_TYPE" not in os.environ
    assert load_base_model("builtin:tiny", device="cpu", env=env.replace(prediction_type="epsilon")
                           ).prediction_type == "epsilon"


def test_stc_model_is_honoured_by_train_and_gen(photos, monkeypatch, tmp_path):
    monkeypatch.setenv("STC_MODEL", "builtin:tiny")
    result = invoke("train", photos, "--name", "envy", "--init", "cat", "--steps", 1, "--batch-size", 1,
                    "--grad-accum", 1, "--save-every", 0)
    assert result.exit_code == 0, result.output
    assert invoke("show", "envy", "--json").stdout.count('"base_model": "builtin:tiny"') == 1
    result = invoke("gen", "a cat", "--steps", 1, "--out", tmp_path, "--json")  # no concept: the default model
    assert result.exit_code == 0, result.output
    assert '"base_model": "builtin:tiny"' in result.stdout


def test_offline_never_opens_a_socket_and_names_what_to_download(monkeypatch, no_network):
    opened = no_network
    result = invoke("--offline", "gen", "a cat", "--model", "nobody/not-downloaded", "--steps", 1)
    assert_one_line_error(result, "nobody/not-downloaded", "hf download nobody/not-downloaded", "offline")
    assert opened == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="hf download"):
        load_base_model("nobody/not-downloaded", device="cpu")
    assert opened == []


def test_a_concept_records_its_base_and_notes_a_compatible_other_model(photos, tmp_path):
    import torch

    from stc.models.base import embedding_fingerprint, load_base_model

    result = invoke("train", photos, "--name", "fp", "--init", "cat", "--model", "builtin:tiny", "--steps", 1,
                    "--batch-size", 1, "--grad-accum", 1, "--save-every", 0)
    assert result.exit_code == 0, result.output
    import json

    shown = json.loads(invoke("show", "fp", "--json").stdout)
    tiny = load_base_model("builtin:tiny", device="cpu")
    assert shown["base_fingerprint"] == embedding_fingerprint(tiny.pipeline)
    assert "32-wide text encoder" in shown["fits"] and "builtin:tiny" in shown["fits"]

    same = tmp_path / "same"
    tiny.pipeline.save_pretrained(same)
    result = invoke("gen", "<fp> on the moon", "--model", same, "--steps", 1, "--out", tmp_path / "a")
    assert result.exit_code == 0 and "Note:" not in result.stderr  # the same weights in a folder: no note

    tuned = tmp_path / "tuned"  # a "fine-tune": same layout, other token embeddings
    with torch.no_grad():
        tiny.pipeline.text_encoder.get_input_embeddings().weight.mul_(1.01)
    tiny.pipeline.save_pretrained(tuned)
    result = invoke("gen", "<fp> on the moon", "--model", tuned, "--steps", 1, "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert "Note: fp was trained on builtin:tiny" in result.stderr and "fine-tune" in result.stderr


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_the_embedding_fingerprint_does_not_depend_on_the_render_dtype(dtype, tiny):
    """A concept trained at fp32 and rendered at bf16/fp16 (or the other way) is on the same
    model: no "other token embeddings" note. A rescaled table (a "fine-tune") still differs."""
    import copy

    import torch

    from stc.models.base import embedding_fingerprint, same_embeddings

    recorded = embedding_fingerprint(tiny.pipeline)  # at training time, fp32
    rendered = copy.deepcopy(tiny.pipeline)
    wanted = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    rendered.text_encoder.to(wanted)  # fp16 loads exist on GPUs only; the table is the same cast
    assert same_embeddings(recorded, rendered) is True
    assert same_embeddings(embedding_fingerprint(rendered), tiny.pipeline) is True  # trained at bf16/fp16
    with torch.no_grad():
        rendered.text_encoder.get_input_embeddings().weight.mul_(1.01)
    assert same_embeddings(recorded, rendered) is False


def test_gen_at_bf16_notes_no_fine_tune(photos, tmp_path):
    result = invoke("train", photos, "--name", "fp", "--init", "cat", "--model", "builtin:tiny", "--steps", 1,
                    "--batch-size", 1, "--grad-accum", 1, "--save-every", 0)
    assert result.exit_code == 0, result.output
    for dtype in ("fp32", "bf16"):
        result = invoke("gen", "<fp> on the moon", "--dtype", dtype, "--steps", 1, "--out", tmp_path / dtype)
        assert result.exit_code == 0, result.output
        assert "fine-tune" not in result.stderr and "Note:" not in result.stderr, (dtype, result.stderr)
