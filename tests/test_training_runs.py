"""Checkpoints, resume, Ctrl-C, previews, config files, scale-out, gradient checkpointing."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from typer.testing import CliRunner

from stc.cli import app
from stc.errors import BadInput
from stc.store.conceptio import read_state_dict
from stc.store.registry import Registry
from stc.train.config import TrainConfig
from stc.train.trainer import Trainer
from stc.train.training import TrainCallbacks, TrainingInterrupted, resume_training, train_concept

FAST = dict(steps=6, batch_size=2, grad_accum=2, seed=1, initializer="cat", save_every=0, preview_steps=2)


def weights_equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[key], b[key]) for key in a)


def interrupt_at(step_to_stop):
    def on_step(step, total, loss):
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)

    return TrainCallbacks(on_step=on_step)


def test_sigint_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(photos):
    full = train_concept(photos, "straight", "builtin:tiny", TrainConfig(**FAST), device="cpu")

    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="stc train --resume halted"):
        train_concept(photos, "halted", "builtin:tiny", TrainConfig(**FAST), device="cpu", callbacks=interrupt_at(3))
    registry = Registry()
    partial = registry.load("halted")
    assert (partial.training.steps_done, partial.training.steps_planned) == (3, 6)
    assert (partial.path / "checkpoint" / "state.safetensors").is_file()
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored
    # keys written by a newer stc (or by hand) survive the resumed run's rewrite, in every section
    meta = partial.path / "concept.yaml"
    data = yaml.safe_load(meta.read_text())
    for section in ("training", "metrics", "mapper"):
        data[section]["future_" + section] = 1
    meta.write_text(yaml.safe_dump({**data, "future_top": 2}, sort_keys=False))

    resumed = resume_training("halted", device="cpu")  # no --steps: continues to the planned 6
    assert resumed.concept.training.steps_done == 6
    assert weights_equal(resumed.mapper.state_dict(), full.mapper.state_dict())
    stored = registry.load("halted")
    assert weights_equal(read_state_dict(stored), read_state_dict(registry.load("straight")))
    assert not (stored.path / "checkpoint").exists()  # a finished concept keeps no optimizer state
    data = yaml.safe_load((stored.path / "concept.yaml").read_text())
    assert data["future_top"] == 2 and all(data[s]["future_" + s] == 1 for s in ("training", "metrics", "mapper"))
    steps = [json.loads(line)["step"] for line in (stored.path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    record = json.loads((stored.path / "metrics.jsonl").read_text().splitlines()[0])
    assert set(record) == {"step", "loss", "lr", "time"} and record["lr"] == pytest.approx(4e-3)


def test_periodic_checkpoints_survive_a_crash(photos):
    full = train_concept(photos, "whole", "builtin:tiny", TrainConfig(**FAST), device="cpu")

    def crash(step, total, loss):
        if step == 5:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        train_concept(photos, "crashy", "builtin:tiny", TrainConfig(**{**FAST, "save_every": 2}), device="cpu",
                      callbacks=TrainCallbacks(on_step=crash))
    assert Registry().load("crashy").training.steps_done == 4
    resumed = resume_training("crashy", device="cpu")
    assert weights_equal(resumed.mapper.state_dict(), full.mapper.state_dict())


def test_an_interrupted_concept_renders_and_lists_as_incomplete(photos, tmp_path):
    with pytest.raises(TrainingInterrupted):
        train_concept(photos, "half", "builtin:tiny", TrainConfig(**FAST), device="cpu", callbacks=interrupt_at(2))
    runner = CliRunner()
    listing = json.loads(runner.invoke(app, ["ls", "--json"]).stdout)
    record = next(r for r in listing if r["name"] == "half")
    assert record["complete"] is False
    assert (record["steps_done"], record["steps_planned"]) == (2, 6)
    assert "2/6 (incomplete)" in runner.invoke(app, ["ls"]).stdout
    result = runner.invoke(app, ["gen", "<half> on the moon", "--steps", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith(".png")


def test_resume_further_and_refuse_when_done(photos):
    train_concept(photos, "short", "builtin:tiny", TrainConfig(**{**FAST, "steps": 2}), device="cpu")
    with pytest.raises(Exception, match="no training checkpoint"):
        resume_training("short", device="cpu")
    with pytest.raises(TrainingInterrupted):
        train_concept(photos, "more", "builtin:tiny", TrainConfig(**{**FAST, "steps": 3}), device="cpu",
                      callbacks=interrupt_at(3))
    with pytest.raises(BadInput, match="already trained 3/3"):
        resume_training("more", device="cpu")
    longer = resume_training("more", steps=5, device="cpu")
    assert longer.concept.training.steps_done == 5 and longer.concept.training.steps_planned == 5


def test_previews_are_written_into_the_concept_folder_and_kept_on_resume(photos):
    with pytest.raises(TrainingInterrupted):
        train_concept(photos, "seen", "builtin:tiny", TrainConfig(**{**FAST, "preview_every": 2}), device="cpu",
                      callbacks=interrupt_at(3))
    assert sorted(p.name for p in (Registry().path_of("seen") / "previews").iterdir()) == ["step-000002.png"]
    result = resume_training("seen", device="cpu")
    folder = result.concept.path
    previews = sorted(p.name for p in (folder / "previews").iterdir())
    assert previews == ["step-000002.png", "step-000004.png"]  # the first run's preview survives the resume
    from PIL import Image

    with Image.open(folder / "preview.png") as grid:
        assert grid.size == (3 * 64, 2 * 64)  # 3 prompts x 2 seeds
        assert len(set(grid.convert("L").getdata())) > 10


def test_config_file_and_flag_precedence(photos, tmp_path):
    config_file = tmp_path / "train.yaml"
    # keys are the option names (as on the command line, '_' for '-' too), values of the option's type
    config_file.write_text(yaml.safe_dump({"weight-decay": 0.02, "init": "dog", "adam_beta1": 0.8}))
    config = TrainConfig.from_file(config_file, {})
    assert (config.adam_weight_decay, config.initializer, config.adam_beta1) == (0.02, "dog", 0.8)
    for bad, message in (({"learning-rate": 1}, "unknown setting 'learning-rate'"),
                         ({"steps": "abc"}, "steps: --steps must be a whole number, got 'abc'"),
                         ({"steps": 2.5}, "--steps must be a whole number, got 2.5"),
                         ({"bypass": "no"}, "bypass: --bypass must be true or false, got 'no'"),
                         ({"lr": float("nan")}, "--lr must be a finite number"),
                         ({"adam-beta1": 1.5}, "--adam-beta1 must be a finite number in [0.0, 1.0)"),
                         ({"seed": 10**23}, "seed (--seed) must lie between 0 and")):
        config_file.write_text(yaml.safe_dump(bad))
        with pytest.raises(BadInput) as caught:
            TrainConfig.from_file(config_file, {})
        assert message in str(caught.value) and str(config_file) in str(caught.value)
    config_file.write_text(yaml.safe_dump({"lr": 0.002, "batch-size": 1, "grad_accum": 1, "steps": 2, "kind": "style"}))
    config = TrainConfig.from_file(config_file, {"lr": 0.003})
    assert (config.lr, config.batch_size, config.steps, config.kind) == (0.003, 1, 2, "style")

    result = CliRunner().invoke(app, [
        "train", str(photos), "--name", "fromfile", "--model", "builtin:tiny", "--config", str(config_file),
        "--lr", "0.005", "--init", "cat", "--no-bypass", "--mixed-precision", "no", "--save-every", "0",
    ])
    assert result.exit_code == 0, result.output
    stored = Registry().load("fromfile")
    recorded = TrainConfig.of(stored.training)
    assert recorded.lr == 0.005 and recorded.batch_size == 1
    assert recorded.kind == "style" and recorded.bypass is False
    assert stored.mapper["bypass"] is False and stored.training.effective_lr == pytest.approx(0.005)


def test_resume_refuses_changed_hyper_parameters(photos):
    result = CliRunner().invoke(app, ["train", "--resume", "whatever", "--lr", "0.1"])
    assert result.exit_code == 1 and "Error: --resume: cannot change lr" in result.stderr


def test_cli_interrupt_message_says_how_to_resume(monkeypatch, photos):
    import stc.train.training

    def interrupted(*args, **kwargs):
        raise TrainingInterrupted("training of 'x' stopped at step 3/10; Resume with: stc train --resume x")

    monkeypatch.setattr(stc.train.training, "train_concept", interrupted)
    result = CliRunner().invoke(app, ["train", str(photos), "--name", "x", "--model", "builtin:tiny"])
    assert result.exit_code == 130
    assert "stc train --resume x" in result.stderr and "Traceback" not in result.stderr


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny, photos):
    from accelerate import Accelerator

    from stc.train.images import load_photos

    images = load_photos(photos, 64).images

    def loss_and_grads(checkpointing):
        from stc.models.base import load_base_model

        base = load_base_model("builtin:tiny", device="cpu")
        config = TrainConfig(**{**FAST, "gradient_checkpointing": checkpointing})
        trainer = Trainer(base, images, "<gc>", config, Accelerator(cpu=True))
        assert trainer.unet.is_gradient_checkpointing == checkpointing
        trainer.mapper.eval()  # no nested dropout: identical inputs
        batch = trainer.random_batch()
        loss = trainer.denoising_loss(*batch, generator=torch.Generator().manual_seed(0))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainer.unwrapped_mapper.parameters()]

    loss_plain, grads_plain = loss_and_grads(False)
    loss_ckpt, grads_ckpt = loss_and_grads(True)
    assert torch.allclose(loss_plain, loss_ckpt, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_plain, grads_ckpt))
    assert any(g.abs().sum() > 0 for g in grads_ckpt)


def test_two_processes_train_and_write_exactly_one_concept(photos, stc_home, tmp_path):
    env = {**os.environ, "STC_HOME": str(stc_home), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        "-m", "stc", "train", str(photos), "--name", "duo", "--init", "cat", "--model", "builtin:tiny",
        "--steps", "2", "--grad-accum", "1", "--device", "cpu", "--save-every", "1",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    entries = sorted(p.name for p in (stc_home / "concepts").iterdir())
    assert entries == ["duo"]  # no second copy, no leftover staging folders
    stored = Registry().load("duo")
    assert stored.training.num_processes == 2
    assert stored.training.effective_lr == pytest.approx(1e-3 * 2 * 1 * 2)
    assert result.stdout.count(str(stc_home / "concepts" / "duo")) == 1  # only rank 0 reports


def test_a_diverging_run_stops_and_keeps_its_last_checkpoint(photos, monkeypatch):
    import stc.train.trainer

    real_step = stc.train.trainer.Trainer.train_step
    calls = []

    def diverging(self):
        calls.append(1)
        return float("nan") if len(calls) == 5 else real_step(self)

    monkeypatch.setattr(stc.train.trainer.Trainer, "train_step", diverging)
    from stc.train.training import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="loss became nan at step 5. The last checkpoint \\(step 4\\) is kept"):
        train_concept(photos, "wild", "builtin:tiny", TrainConfig(**{**FAST, "save_every": 2}), device="cpu")
    kept = Registry().load("wild")
    assert kept.training.steps_done == 4 and not kept.complete  # resumable, never saved as complete


def test_a_run_owns_its_name_until_it_stops(photos):
    registry = Registry()
    holder_started = []

    def try_others(step, total, loss):
        if step == 2:  # step 1 is saved by now
            holder_started.append(1)
            with pytest.raises(Exception, match="cannot train .owned.: it is being trained by process"):
                train_concept(photos, "owned", "builtin:tiny", TrainConfig(**FAST), device="cpu")
            for args, fragment in ((("rm", "owned", "--yes"), "cannot remove 'owned'"),
                                   (("mv", "owned", "other"), "cannot rename 'owned'")):
                result = CliRunner().invoke(app, list(args))
                assert result.exit_code == 1 and fragment in result.stderr, result.output

    train_concept(photos, "owned", "builtin:tiny", TrainConfig(**{**FAST, "save_every": 1}), device="cpu",
                  callbacks=TrainCallbacks(on_step=try_others))
    assert holder_started and registry.load("owned").complete
    result = CliRunner().invoke(app, ["mv", "owned", "other"])  # the run is over: the name is free
    assert result.exit_code == 0, result.output


def test_a_killed_run_leaves_no_lock_behind(photos, stc_home, tmp_path):
    script = (
        "import os, signal, sys\n"
        "from stc.train.config import TrainConfig\nfrom stc.train.training import TrainCallbacks, train_concept\n"
        "kill = TrainCallbacks(on_step=lambda step, total, loss: os.kill(os.getpid(), signal.SIGKILL))\n"
        f"train_concept({str(photos)!r}, 'killed', 'builtin:tiny', TrainConfig(steps=3, batch_size=1, grad_accum=1,"
        " initializer='cat', save_every=0), device='cpu', callbacks=kill)\n"
    )
    env = {**os.environ, "STC_HOME": str(stc_home), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert "process" in (stc_home / ".locks" / "killed.training").read_text()  # the stale owner is on record
    done = train_concept(photos, "killed", "builtin:tiny", TrainConfig(**FAST), device="cpu")  # and recovered
    assert done.concept.complete


def test_bad_devices_and_unwritable_registries_fail_before_the_model_loads(photos, monkeypatch):
    import stc.models.base

    monkeypatch.setattr(stc.models.base, "load_base_model", lambda *a, **k: pytest.fail("loaded a model"))
    for device, message in (("tpu", "unknown device 'tpu'"), ("cuda", "no CUDA GPU is available")):
        with pytest.raises(Exception, match=message):
            train_concept(photos, "dev", "builtin:tiny", TrainConfig(**FAST), device=device)
    import tempfile

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "concepts")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    from stc.errors import RegistryWriteError

    with pytest.raises(RegistryWriteError, match="Permission denied"):
        train_concept(photos, "ro", "builtin:tiny", TrainConfig(**FAST), device="cpu")


def test_a_resumed_run_owns_its_name_until_it_stops(photos):
    """stc train --resume holds the same lock as a new run: a second resume, rm and mv wait for none
    and are refused, naming the process."""
    with pytest.raises(TrainingInterrupted):
        train_concept(photos, "again", "builtin:tiny", TrainConfig(**{**FAST, "steps": 4}), device="cpu",
                      callbacks=interrupt_at(1))
    checked = []

    def try_others(step, total, loss):
        if step == 3:
            checked.append(step)
            with pytest.raises(Exception, match="'again' is being trained by process"):
                resume_training("again", device="cpu")
            for args, fragment in ((("rm", "again", "--yes"), "cannot remove 'again'"),
                                   (("mv", "again", "other"), "cannot rename 'again'"),
                                   (("train", "--resume", "again"), "being trained by process")):
                result = CliRunner().invoke(app, list(args))
                assert result.exit_code == 1 and fragment in result.stderr, result.output

    resumed = resume_training("again", device="cpu", callbacks=TrainCallbacks(on_step=try_others))
    assert checked == [3] and resumed.concept.complete


def test_a_full_disk_at_the_final_save_keeps_the_trained_concept(photos, tmp_path, monkeypatch, stc_home):
    """The registry refuses the final save (ENOSPC): the concept goes, complete, to a registry of
    its own beside the work, whose concept folder stc import reads back unchanged; the error says
    where and how, and the checkpoint of step 2 stays resumable in the registry."""
    from stc.errors import RegistryWriteError
    from stc.train.training import TrainingNotSaved

    real_save = Registry.save

    def full_disk(self, concept, weights, overwrite=False, extra_files=None):
        if concept.training.steps_done == 4 and self.root == stc_home:  # the final save, in the full registry
            raise RegistryWriteError(f"could not write {concept.name!r} in {self.root}: No space left on device")
        return real_save(self, concept, weights, overwrite=overwrite, extra_files=extra_files)

    monkeypatch.setattr(Registry, "save", full_disk)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrainingNotSaved) as caught:
        train_concept(photos, "spacey", "builtin:tiny", TrainConfig(**{**FAST, "steps": 4, "save_every": 2}),
                      device="cpu")
    message = str(caught.value)
    rescued = tmp_path / "spacey-rescued-step4"  # as the README says
    assert "No space left on device" in message and f"stc import {rescued}" in message
    assert "checkpoint at step 2 (stc train --resume spacey)" in message
    assert Registry().load("spacey").training.steps_done == 2  # the registry is as the last good save left it
    monkeypatch.setattr(Registry, "save", real_save)
    result = CliRunner().invoke(app, ["import", str(rescued), "--name", "spacey-back"])
    assert result.exit_code == 0, result.output
    back = Registry().load("spacey-back")
    assert back.training.steps_done == 4 and TrainConfig.of(back.training).steps == 4
    assert back.metrics.eval_loss_after is not None and back.complete
    assert (back.path / "preview.png").is_file() and (back.path / "metrics.jsonl").read_text().count("\n") == 4
    assert weights_equal(read_state_dict(back), read_state_dict(Registry(rescued).load("spacey")))
    inner = CliRunner().invoke(app, ["import", str(rescued / "concepts" / "spacey"), "--name", "spacey-inner"])
    assert inner.exit_code == 0, inner.output  # its concept folder imports too
    assert weights_equal(read_state_dict(Registry().load("spacey-inner")), read_state_dict(back))


def test_a_concept_folder_of_another_registry_imports_whole_and_resumes(photos, tmp_path, monkeypatch):
    """stc import of another registry's concept folder keeps every file: an interrupted concept
    brings its training checkpoint and resumes in the new registry."""
    other = Registry(tmp_path / "other-home")
    with pytest.raises(TrainingInterrupted):
        train_concept(photos, "moved", "builtin:tiny", TrainConfig(**{**FAST, "steps": 3}), device="cpu",
                      callbacks=interrupt_at(1), registry=other)
    source = other.path_of("moved")
    result = CliRunner().invoke(app, ["import", str(source), "--name", "arrived"])
    assert result.exit_code == 0, result.output
    arrived = Registry().load("arrived")
    assert (arrived.training.steps_done, arrived.training.steps_planned) == (1, 3) and not arrived.complete
    assert (arrived.path / "checkpoint" / "state.safetensors").is_file()
    assert weights_equal(read_state_dict(arrived), read_state_dict(other.load("moved")))
    assert resume_training("arrived", device="cpu").concept.complete


def test_the_readmes_train_yaml_loads_and_trains_on_a_cpu(photos, tmp_path):
    """The README's train.yaml example, as printed, is accepted by the config loader and a run
    with it (the README's command, on builtin:tiny for 1 step) works on a CPU."""
    from pathlib import Path

    from stc.train.config import TrainConfig

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("cat > train.yaml <<'YAML'\n", 1)[1].split("\nYAML\n", 1)[0]
    (tmp_path / "train.yaml").write_text(block + "\n")
    config = TrainConfig.from_file(tmp_path / "train.yaml", {})
    assert (config.steps, config.lr, config.batch_size) == (1500, 0.002, 4)
    command = readme.split("\nYAML\n", 1)[1].split("\n", 1)[0].split()
    assert command[:2] == ["stc", "train"] and "--config" in command
    args = [str(tmp_path / "train.yaml") if arg == "train.yaml" else str(photos) if arg == "./photos" else arg
            for arg in command[1:]]
    result = CliRunner().invoke(app, [*args, "--model", "builtin:tiny", "--device", "cpu", "--steps", "1",
                                      "--save-every", "0"])
    assert result.exit_code == 0, result.output
    assert Registry().load("mydog").training.steps_done == 1
