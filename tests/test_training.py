import pytest
import torch
from helpers import assert_close_in_scale

from stc.errors import BadInput, ConceptExists, InvalidName
from stc.method.templates import OBJECT_TEMPLATES
from stc.store.conceptio import load_mapper
from stc.store.registry import Registry
from stc.train.config import TrainConfig
from stc.train.training import train_concept

FAST = dict(steps=15, batch_size=2, grad_accum=1, seed=0, initializer="cat")


def test_short_training_lowers_the_denoising_loss_and_reloads_identically(photos):
    result = train_concept(photos, "blob", "builtin:tiny", TrainConfig(**FAST), device="cpu")
    metrics = result.concept.metrics
    assert metrics.eval_loss_after < metrics.eval_loss_before

    registry = Registry()
    stored = registry.load("blob")
    assert stored.base_model == "builtin:tiny" and stored.token == "<blob>"
    assert len(stored.layer_names) == 16 and stored.layer_names[6].startswith("mid_block")
    assert stored.training.steps_done == 15 and stored.training.effective_lr == pytest.approx(2e-3)
    reloaded = load_mapper(stored)
    trained = result.mapper.eval()
    t = torch.tensor([999.0, 500.0, 20.0, 0.0])
    l = torch.tensor([0.0, 6.0, 15.0, 3.0])
    with torch.no_grad():
        assert torch.equal(reloaded(t, l), trained(t, l))
        assert torch.equal(reloaded.encoding.w, trained.encoding.w)


def test_training_is_deterministic(photos, tmp_path):
    first = train_concept(photos, "one", "builtin:tiny", TrainConfig(**{**FAST, "steps": 3}), device="cpu")
    second = train_concept(photos, "two", "builtin:tiny", TrainConfig(**{**FAST, "steps": 3}), device="cpu")
    a, b = first.mapper.state_dict(), second.mapper.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_only_the_mapper_is_trained(photos, monkeypatch):
    from stc.train import training

    seen = {}
    original = training.Trainer.train_step

    def spy(self):
        loss = original(self)
        seen["frozen_grads"] = [
            name for module in (self.unet, self.vae, self.text_encoder)
            for name, p in module.named_parameters() if p.requires_grad or p.grad is not None
        ]
        seen["optimized"] = sum(p.numel() for group in self.optimizer.param_groups for p in group["params"])
        seen["mapper"] = sum(p.numel() for p in self.unwrapped_mapper.parameters())
        return loss

    monkeypatch.setattr(training.Trainer, "train_step", spy)
    train_concept(photos, "frozen", "builtin:tiny", TrainConfig(**{**FAST, "steps": 1}), device="cpu")
    assert seen["frozen_grads"] == []
    assert seen["optimized"] == seen["mapper"]


def test_reference_defaults():
    config = TrainConfig()
    assert (config.steps, config.batch_size, config.grad_accum) == (1000, 2, 4)
    assert config.effective_lr() == pytest.approx(8e-3)
    assert (config.adam_beta1, config.adam_beta2, config.adam_weight_decay) == (0.9, 0.999, 1e-2)
    assert config.initializer_word == "object"
    assert TrainConfig(kind="style").initializer_word == "painting"
    assert "a photo of a {}" in OBJECT_TEMPLATES


def test_errors_before_any_training(photos, tmp_path):
    with pytest.raises(InvalidName):
        train_concept(photos, "My Dog", "builtin:tiny", TrainConfig(**FAST), device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photos here")
    with pytest.raises(BadInput, match="no usable images"):
        train_concept(empty, "x", "builtin:tiny", TrainConfig(**FAST), device="cpu")
    with pytest.raises(BadInput, match="single token"):
        train_concept(photos, "x", "builtin:tiny", TrainConfig(**{**FAST, "initializer": "hippopotamus"}), device="cpu")
    with pytest.raises(BadInput, match="steps"):
        TrainConfig(steps=0)
    train_concept(photos, "taken", "builtin:tiny", TrainConfig(**{**FAST, "steps": 1}), device="cpu")
    with pytest.raises(ConceptExists):
        train_concept(photos, "taken", "builtin:tiny", TrainConfig(**FAST), device="cpu")
    assert Registry().names() == ["taken"]


def test_training_reads_keys_without_the_bypass_and_values_with_it(tiny, photos):
    """Cross-attention keys come from the sequence without the bypass, values from the one with it,
    each layer at its own (t, l); checked against a direct call of the pinned text encoding."""
    from accelerate import Accelerator
    from helpers import encode_spacetime

    from stc.method.encoding import ConceptSlot
    from stc.train.images import load_photos
    from stc.train.trainer import Trainer

    config = TrainConfig(**{**FAST, "batch_size": 2})
    trainer = Trainer(tiny, load_photos(photos, 64).images, "<kv>", config, Accelerator(cpu=True))
    trainer.mapper.eval()  # no nested dropout: the direct call below sees the same mapper outputs
    modules = dict(trainer.unet.named_modules())
    seen = {}
    hooks = [
        modules[f"{name}.{projection}"].register_forward_hook(
            lambda module, args, output, key=(index, projection): seen.update({key: args[0].detach()}))
        for index, name in enumerate(trainer.layer_names) for projection in ("to_k", "to_v")
    ]
    batch = trainer.random_batch()
    with torch.no_grad():
        trainer.denoising_loss(*batch, generator=torch.Generator().manual_seed(0))
    for hook in hooks:
        hook.remove()

    _, _, _, timesteps, captions = batch
    ids = trainer.tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids
    slot = ConceptSlot(trainer.token_id, trainer.unwrapped_mapper)
    for layer in range(16):
        with torch.no_grad():
            plain, bypassed = encode_spacetime(
                trainer.text_encoder, ids, timesteps.float(), torch.full((len(captions),), float(layer)),
                {trainer.token_id: slot},
            )
        assert not torch.allclose(plain, bypassed)  # the bypass changes the placeholder position
        # training encodes 32 rows (batch x layers) in one call, this 2: other GEMM shapes, so
        # rounding of ~1e-6 on values of ~3 (measured); a wrong layer or rule differs by far more
        assert_close_in_scale(seen[(layer, "to_k")], plain, 1e-5)
        assert_close_in_scale(seen[(layer, "to_v")], bypassed, 1e-5)


def test_text_layers_are_recomputed_in_the_backward_with_identical_gradients(tiny, photos, monkeypatch):
    """Memory: the 16-row text batch keeps no activations of the recomputed layers; the gradients
    are exactly those of a step that keeps them."""
    from accelerate import Accelerator

    import stc.train.trainer
    from stc.train.images import load_photos
    from stc.train.trainer import Trainer

    images = load_photos(photos, 64).images

    def gradients(fraction):
        monkeypatch.setattr(stc.train.trainer, "RECOMPUTED_TEXT_LAYERS", fraction)
        trainer = Trainer(tiny, images, f"<rc{int(fraction * 100)}>", TrainConfig(**FAST), Accelerator(cpu=True))
        trainer.mapper.eval()
        first = getattr(trainer.text_encoder, "text_model", trainer.text_encoder).encoder.layers[0]
        calls = []
        hook = first.self_attn.register_forward_pre_hook(lambda *args: calls.append(1))  # recomputation stops early
        loss = trainer.denoising_loss(*trainer.random_batch(), generator=torch.Generator().manual_seed(0))
        loss.backward()
        hook.remove()
        assert "forward" not in vars(first)  # the layer is back to its own forward
        return [p.grad.clone() for p in trainer.unwrapped_mapper.parameters()], len(calls)

    kept, kept_calls = gradients(0.0)
    recomputed, recomputed_calls = gradients(2 / 3)
    assert (kept_calls, recomputed_calls) == (1, 2)  # the first layer ran again in the backward pass
    assert all(torch.equal(a, b) for a, b in zip(kept, recomputed))


@pytest.mark.parametrize("model", ["builtin:tiny", "builtin:shapes-sdxl", "folder"])
def test_a_multi_token_init_fails_before_any_weights_load_with_related_suggestions(photos, tmp_path, monkeypatch,
                                                                                   model):
    """``--init "red flower"`` is refused from the tokenizer alone (the weights' load is made to
    fail), and the suggestions come from the word: its own words, close spellings."""
    from helpers import assert_one_line_error, invoke

    import stc.models.base as base
    from stc.models.tokenizers import tokenizers_of

    if model == "folder":  # a diffusers folder: its tokenizer/ read alone
        model = tmp_path / "model"
        tokenizers_of("builtin:tiny")[0].save_pretrained(model / "tokenizer")

    def no_weights(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before --init was checked")

    monkeypatch.setattr(base, "load_base_model", no_weights)
    result = invoke("train", photos, "--name", "rose", "--init", "red flower", "--model", model)
    assert_one_line_error(result, "'red flower' is 2 tokens", "Try --init flower (or: red")
    misspelt = invoke("train", photos, "--name", "rose", "--init", "flowerz", "--model", model)
    assert_one_line_error(misspelt, "Try --init flower")
    assert "toy" not in misspelt.stderr and "tree" not in misspelt.stderr  # no unrelated defaults
    assert Registry().names() == []
