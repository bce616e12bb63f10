"""Training a concept: the run around the method's step (``trainer.py``).

A run loads the base model and photos, loops over optimizer steps, writes checkpoints,
previews and ``metrics.jsonl`` into the concept folder, and saves the concept atomically; an
interrupted run resumes exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput, ConceptExists, Interrupted, RegistryWriteError, StcError
from ..names import validate_name
from ..settings import Settings
from ..store.concept import Concept, MetricsRecord, TrainingRecord
from ..store.registry import PREVIEW_FILE, PREVIEWS_DIR, Registry, preview_paths
from .config import TrainConfig
from .trainer import Trainer

PREVIEW_PROMPTS = {
    "object": ["a photo of a {}", "a {} on the beach", "an oil painting of a {}"],
    "style": ["a painting in the style of {}", "a house in the style of {}", "a cat in the style of {}"],
}
PREVIEW_SEEDS = [0, 1]
# builtin:shapes knows only coloured shapes on plain backgrounds: its previews ask for those
SHAPES_PREVIEW_PROMPTS = ["a photo of a {}", "a {} on a green background", "a {} on a blue background"]


def preview_prompts(kind: str, base_model: str) -> list[str]:
    if base_model in ("builtin:shapes", "builtin:shapes-sdxl") and kind == "object":
        return SHAPES_PREVIEW_PROMPTS
    return PREVIEW_PROMPTS[kind]


def suggested_prompt(concept) -> str:
    """The prompt ``stc train`` suggests trying next (the second preview prompt)."""
    config = TrainConfig.of(concept.training)
    kind = config.kind if config else "object"
    return preview_prompts(kind, concept.base_model)[1].format(concept.token)


@dataclass
class TrainCallbacks:
    """How the library reports progress; every callback is optional."""

    on_step: Callable[[int, int, float], None] | None = None  # step, total, loss
    on_warning: Callable[[str], None] | None = None
    on_status: Callable[[str], None] | None = None

    def status(self, message: str) -> None:
        if self.on_status:
            self.on_status(message)

    def warn(self, message: str) -> None:
        if self.on_warning:
            self.on_warning(message)


@dataclass
class TrainResult:
    concept: Concept  # as stored in the registry
    mapper: object  # the trained NeTIMapper (unwrapped, on the training device)


def train_concept(
    photos_dir: Path | None,
    name: str,
    model: str | None,
    config: TrainConfig,
    *,
    registry: Registry | None = None,
    device: str | None = None,
    model_config: str | None = None,
    callbacks: TrainCallbacks | None = None,
    env: Settings | None = None,
    force_size: bool = False,
) -> TrainResult:
    """Train a new concept on the photos in ``photos_dir`` and save it in the registry (``env``:
    the environment's settings, by default read from it). A resolution far outside the model's
    range is refused (``stc.models.sizes``) unless ``force_size``."""
    from ..models.sizes import check_size

    env = env or Settings.from_environment()
    registry = registry or Registry(env.home)
    validate_name(name)
    registry.refuse_if_training(name, "train")
    if registry.path_of(name).exists():
        raise ConceptExists(
            f"a concept named {name!r} exists already; choose another --name, resume it (stc train --resume "
            f"{name}), or remove it first (stc rm {name})"
        )
    if photos_dir is None:
        raise BadInput("pass the folder with your photos (stc train PHOTOS --name NAME)")
    run = _Run(registry, name, _photos_folder(photos_dir), model or env.default_model(), config, callbacks, env)
    check_initializer(run.model, run.config.initializer, model_config)
    if not force_size:  # a side no model could take: before anything loads
        check_size(config.resolution, config.resolution, "--resolution")
    run.force_size = force_size
    with _owning(registry, name, device, env):
        if registry.path_of(name).exists():  # again under the lock: a run that just finished may have made it
            raise ConceptExists(f"a concept named {name!r} exists already; choose another --name")
        return run.execute(device, model_config, previous=None)


def check_initializer(model: str, word: str, model_config: str | None = None) -> None:
    """``word`` must be one token of ``model``'s tokenizers: checked on the tokenizers alone, before
    the weights load, where they can be had without the network (else the trainer checks it)."""
    from ..method.placeholders import single_token_id
    from ..models.tokenizers import tokenizers_of

    for tokenizer in tokenizers_of(model, model_config) or []:
        single_token_id(tokenizer, word)


def _photos_folder(folder) -> Path:
    """The photos folder as an absolute path (what the concept records), checked to hold an image."""
    from .images import check_photo_folder

    path = Path(folder).expanduser()
    try:
        path = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symbolic-link loop (RuntimeError before Python 3.13)
        raise BadInput(f"cannot use the photos folder {path}: {exc}") from exc
    check_photo_folder(path)
    return path


def _owning(registry: Registry, name: str, device: str | None, env: Settings):
    """Everything a run needs before it loads a model: a usable device, a writable registry, and
    the name to itself for the whole run (only the main process of a multi-process run holds it)."""
    import contextlib

    if device is not None:
        from ..models.base import check_device

        check_device(device)
    registry.check_writable()
    if not env.is_main_process:
        return contextlib.nullcontext()
    return registry.training_lock(name)


def resume_training(
    name: str,
    steps: int | None = None,
    photos_dir: Path | None = None,
    save_every: int | None = None,
    preview_every: int | None = None,
    *,
    registry: Registry | None = None,
    device: str | None = None,
    model_config: str | None = None,
    callbacks: TrainCallbacks | None = None,
    env: Settings | None = None,
) -> TrainResult:
    """Continue an interrupted concept to ``steps`` (default: the planned total); only the
    step count and the checkpoint/preview intervals may change."""
    from ..store import checkpoints

    env = env or Settings.from_environment()
    registry = registry or Registry(env.home)
    concept = registry.load(name)
    state = checkpoints.load(concept.path)
    record = concept.training
    recorded = TrainConfig.of(record)
    if recorded is None:
        raise BadInput(f"{name!r} was not trained by stc; there is nothing to resume")
    changes = {"steps": steps, "save_every": save_every, "preview_every": preview_every}
    config = dataclasses.replace(recorded, **{key: value for key, value in changes.items() if value is not None})
    if state.step >= config.steps:
        raise BadInput(
            f"{name!r} has already trained {state.step}/{config.steps} steps; pass --steps N (more than "
            f"{state.step}) to train further"
        )
    folder = photos_dir or record.photos_dir
    if folder is None:
        raise BadInput(f"{name!r} does not record its photos folder; pass it: stc train PHOTOS --resume {name}")
    run = _Run(registry, name, _photos_folder(folder), concept.base_model, config, callbacks, env)
    with _owning(registry, name, device, env):
        return run.execute(device, model_config, previous=(concept, state))


def render_preview(base, concept: Concept, mapper, kind: str, resolution: int, steps: int) -> bytes:
    """PNG bytes: fixed-seed renders of a few prompts (columns) x seeds (rows) with ``mapper``."""
    from ..render.generation import Renderer, RenderSettings
    from ..render.grid import tile_images

    renderer = Renderer(base, {concept.name: (concept, mapper)})
    settings = RenderSettings(steps=steps, width=resolution, height=resolution)
    prompts = [prompt.format(concept.token) for prompt in preview_prompts(kind, concept.base_model)]
    columns = [renderer.render(prompt, PREVIEW_SEEDS, settings) for prompt in prompts]
    rows = [[column[index].image for column in columns] for index in range(len(PREVIEW_SEEDS))]
    buffer = io.BytesIO()
    tile_images(rows, padding=0).save(buffer, format="PNG")
    return buffer.getvalue()


class _Run:
    """One training session of a concept: new, or resumed from a checkpoint."""

    def __init__(self, registry, name, photos_dir, model, config, callbacks, env: Settings):
        self.registry, self.name, self.photos_dir, self.model, self.env = registry, name, photos_dir, model, env
        self.config = dataclasses.replace(config, initializer=config.initializer_word)
        self.callbacks = callbacks or TrainCallbacks()
        self.metrics_lines: list[str] = []
        self.files: dict[str, bytes] = {}  # previews etc. carried into every save
        self.losses: list[float] = []
        self.metrics = MetricsRecord()
        self.previous_seconds = 0.0
        self.created = ""
        self.kept = {"training": {}, "mapper": {}}  # unknown keys of a resumed concept, written back
        self.saved_step = 0  # the last step whose state is on disk
        self.force_size = True  # a resumed run keeps the resolution it recorded

    def execute(self, device, model_config, previous) -> TrainResult:
        from .images import load_photos

        self._load_model(device, model_config)
        from ..models.vocabulary import name_warning

        warning = name_warning(self.name, self.base.backbone.tokenizers(self.base.pipeline), self.base.spec)
        if warning:
            self.callbacks.warn(warning)
        self.resolution = self.config.resolution or self.base.default_resolution
        if not self.force_size:
            from ..models.sizes import check_size

            vae = self.base.pipeline.vae
            check_size(self.resolution, self.resolution, "--resolution", native=self.base.default_resolution,
                       images=self.config.batch_size, element_bytes=vae.dtype.itemsize,
                       channels=int(vae.config.block_out_channels[0]), model=self.base.spec)
        from ..models.base import embedding_fingerprint

        self.fingerprint = embedding_fingerprint(self.base.pipeline)
        self.photos = load_photos(self.photos_dir, self.resolution, on_warning=self.callbacks.on_warning)
        self.callbacks.status(f"{len(self.photos.images)} photo(s) at {self.resolution}px")
        self.trainer = Trainer(self.base, self.photos.images, f"<{self.name}>", self.config, self.accelerator)
        start = self._restore(previous) if previous else 0
        if not previous:
            self.metrics.eval_loss_before = self.trainer.evaluate()
        self.started = time.monotonic()
        self._loop(start)
        self.metrics.eval_loss_after = self.trainer.evaluate()
        self.files[PREVIEW_FILE] = self._preview()
        concept = self._save_or_rescue(self.config.steps, final=True)
        return TrainResult(concept=concept, mapper=self.trainer.unwrapped_mapper)

    def _load_model(self, device, model_config) -> None:
        from accelerate import Accelerator

        from ..models.base import load_base_model

        precision = self.config.mixed_precision
        self.accelerator = Accelerator(
            mixed_precision=precision, gradient_accumulation_steps=self.config.grad_accum, cpu=(device == "cpu"),
        )
        if precision == "fp16" and self.accelerator.device.type == "cpu":
            raise BadInput("mixed precision fp16 (--mixed-precision) needs a GPU; on the CPU use bf16 or no")
        weight_dtype = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[precision]
        self.callbacks.status(f"loading {self.model}")
        self.base = load_base_model(
            self.model, device=str(self.accelerator.device.type), dtype=weight_dtype, config=model_config, env=self.env
        )

    def _restore(self, previous) -> int:
        import torch

        from ..store.conceptio import read_state_dict

        concept, state = previous
        self.trainer.unwrapped_mapper.load_state_dict(read_state_dict(concept))
        self.trainer.optimizer.load_state_dict(state.optimizer)
        if self.accelerator.process_index == 0:
            self.trainer.generator.set_state(state.generator)
        torch.set_rng_state(state.global_rng)
        self.metrics = dataclasses.replace(concept.metrics)  # its unknown keys (extra) included
        self.kept = {"training": concept.training.settings, "mapper": concept.mapper}
        self.created = concept.created
        self.previous_seconds = concept.metrics.seconds or 0.0
        for path in preview_paths(concept.path):
            self.files[str(path.relative_to(concept.path))] = path.read_bytes()
        metrics_file = concept.path / "metrics.jsonl"
        if metrics_file.exists():
            lines = metrics_file.read_text(encoding="utf-8").splitlines()
            self.metrics_lines = [line for line in lines if line and json.loads(line)["step"] <= state.step]
            self.losses = [json.loads(line)["loss"] for line in self.metrics_lines]
        self.callbacks.status(f"resuming {self.name} at step {state.step}/{self.config.steps}")
        self.saved_step = state.step
        return state.step

    def _loop(self, start: int) -> None:
        config, accelerator = self.config, self.accelerator
        with InterruptGuard() as guard:
            for step in range(start + 1, config.steps + 1):
                loss = self.trainer.train_step()
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"training of {self.name!r} diverged: the loss became {loss} at step {step}. "
                        + (f"The last checkpoint (step {self.saved_step}) is kept. " if self.saved_step else
                           "Nothing was saved. ") + "Try a lower --lr"
                    )
                self.losses.append(loss)
                self.metrics_lines.append(json.dumps({
                    "step": step, "loss": round(loss, 6), "lr": self.trainer.optimizer.param_groups[0]["lr"],
                    "time": round(self._seconds(), 3),
                }))
                if self.callbacks.on_step:
                    self.callbacks.on_step(step, config.steps, loss)
                if guard.requested(accelerator):
                    self._save_or_rescue(step, final=False)
                    raise TrainingInterrupted(
                        f"training of {self.name!r} stopped at step {step}/{config.steps}; the checkpoint is saved. "
                        f"Resume with: stc train --resume {self.name}"
                    )
                if config.preview_every and step % config.preview_every == 0 and step < config.steps:
                    self.files[f"{PREVIEWS_DIR}/step-{step:06d}.png"] = self._preview()
                if config.save_every and step % config.save_every == 0 and step < config.steps:
                    try:
                        self._save(step, final=False)
                    except RegistryWriteError as exc:  # the previous checkpoint stays; the run goes on
                        self.callbacks.warn(f"the checkpoint at step {step} could not be saved ({exc}); training "
                                            "goes on, and the final save will try again")

    def _seconds(self) -> float:
        return self.previous_seconds + time.monotonic() - self.started

    def _preview(self) -> bytes:
        mapper = self.trainer.unwrapped_mapper
        was_training = mapper.training
        try:
            return render_preview(self.base, self._concept(step=0), mapper.eval(), self.config.kind,
                                  self.resolution, self.config.preview_steps)
        finally:
            mapper.train(was_training)

    def _concept(self, step: int) -> Concept:
        trainer, config = self.trainer, self.config
        training = TrainingRecord(
            settings=config.record_settings(self.kept["training"]), steps_done=step, resolution=self.resolution,
            effective_lr=config.effective_lr(self.accelerator.num_processes),
            num_processes=self.accelerator.num_processes, photos=[p.name for p in self.photos.paths],
            photos_dir=str(self.photos_dir),
        )
        tail = self.losses[-20:]
        metrics = dataclasses.replace(self.metrics, final_loss=sum(tail) / len(tail) if tail else None,
                                      seconds=self._seconds())
        return Concept(
            name=self.name, base_model=self.base.spec, initializer=config.initializer_word,
            text_width=self.base.text_width, layer_names=trainer.layer_names,
            mapper={**self.kept["mapper"], **trainer.unwrapped_mapper.config.to_dict()},
            training=training, metrics=metrics,
            created=self.created, base_fingerprint=self.fingerprint,
        )

    def _save_or_rescue(self, step: int, final: bool) -> Concept:
        """:meth:`_save`; if the registry cannot be written (a full disk), the trained concept is
        written to a rescue folder that ``stc import`` reads, and the error says where."""
        try:
            return self._save(step, final)
        except RegistryWriteError as exc:
            rescued = self._rescue(step)
            kept = (f"; the registry still holds its checkpoint at step {self.saved_step} (stc train --resume "
                    f"{self.name})" if self.saved_step else "")
            if rescued is None:
                raise TrainingNotSaved(f"{exc}; the trained weights could not be written anywhere "
                                       f"either{kept}") from exc
            raise TrainingNotSaved(
                f"{exc}. The trained concept (step {step}) was written to {rescued} instead, complete: free some "
                f"space, then bring it into the registry with: stc import {rescued}{kept}"
            ) from exc

    def _rescue(self, step: int) -> Path | None:
        """The concept at ``step``, complete (its metrics and previews too), in a registry of its own
        in the first of the working folder, the temporary folder and the home folder that takes it;
        the path of that registry (``<name>-rescued-step<N>``), which ``stc import`` reads, or None."""
        import tempfile

        from ..outputs import free_path
        from ..store.conceptio import weights_bytes

        if not self.accelerator.is_main_process:
            return None
        weights = weights_bytes(self.trainer.unwrapped_mapper, self.name)
        files = {**self.files, "metrics.jsonl": ("\n".join(self.metrics_lines) + "\n").encode()}
        for place in dict.fromkeys((Path.cwd(), Path(tempfile.gettempdir()), Path.home())):
            rescue = Registry(free_path(place, f"{self.name}-rescued-step{step}", suffix=""))
            try:
                rescue.save(self._concept(step), weights, extra_files=files)
                return rescue.root
            except StcError:
                continue
        return None

    def _save(self, step: int, final: bool) -> Concept:
        """Write the concept (and, unless final, its training state) atomically; main process only."""
        import torch

        from ..store import checkpoints
        from ..store.conceptio import weights_bytes

        concept = self._concept(step)
        if self.accelerator.is_main_process:
            files = dict(self.files)
            files["metrics.jsonl"] = ("\n".join(self.metrics_lines) + "\n").encode()
            if not final:
                state = checkpoints.TrainingState(
                    step=step, optimizer=self.trainer.optimizer.state_dict(),
                    generator=self.trainer.generator.get_state(), global_rng=torch.get_rng_state(),
                )
                files.update(checkpoints.serialize(state))
            weights = weights_bytes(self.trainer.unwrapped_mapper, self.name)
            concept = self.registry.save(concept, weights, overwrite=True, extra_files=files)
        self.accelerator.wait_for_everyone()
        concept.path = self.registry.path_of(self.name)
        self.saved_step = step
        return concept


class TrainingNotSaved(StcError):
    """The registry could not take the trained concept (a full disk); where it went instead is said."""


class TrainingDiverged(StcError):
    """The loss became NaN or infinite; the last good checkpoint stays as it was."""


class TrainingInterrupted(Interrupted):
    """Ctrl-C or SIGTERM during training: the checkpoint is saved, the run can resume."""


class InterruptGuard:
    """Turns SIGINT/SIGTERM into a request to stop after the current step (a second Ctrl-C aborts)."""

    def __init__(self):
        self.flag = False
        self.previous = {}

    def _handle(self, signum, _frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False

    def requested(self, accelerator) -> bool:
        """True when any process was asked to stop (all processes agree, so none hangs)."""
        if accelerator.num_processes == 1:
            return self.flag
        import torch

        flags = accelerator.gather(torch.tensor([float(self.flag)], device=accelerator.device))
        return bool(flags.max() > 0)
