"""Training state for resuming: optimizer, RNG streams and step, stored without pickles.

Tensors go to ``checkpoint/state.safetensors``; the rest (step, optimizer hyper-parameters,
non-tensor optimizer entries) to ``checkpoint/state.json``. Both live in the concept folder
and are written together with the concept, atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptConcept

CHECKPOINT_DIR = "checkpoint"
TENSORS_FILE = f"{CHECKPOINT_DIR}/state.safetensors"
META_FILE = f"{CHECKPOINT_DIR}/state.json"
FORMAT = "stc-training-state/1"


@dataclass
class TrainingState:
    step: int
    optimizer: dict  # torch optimizer state_dict
    generator: object  # torch.ByteTensor: state of the run's data/noise generator
    global_rng: object  # torch.ByteTensor: torch's global CPU RNG state


def serialize(state: TrainingState) -> dict[str, bytes]:
    """The two checkpoint files' contents, keyed by their path inside the concept folder."""
    from safetensors.torch import save

    tensors = {"rng.generator": state.generator, "rng.global": state.global_rng}
    scalars = {}
    for index, entries in state.optimizer["state"].items():
        for key, value in entries.items():
            if hasattr(value, "shape"):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    meta = {
        "format": FORMAT,
        "step": state.step,
        "param_groups": state.optimizer["param_groups"],
        "optimizer_scalars": scalars,
    }
    return {TENSORS_FILE: save(tensors), META_FILE: json.dumps(meta, indent=1, sort_keys=True).encode()}


def load(folder: Path) -> TrainingState:
    """Read the training state saved in a concept folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta_path, tensor_path = folder / META_FILE, folder / TENSORS_FILE
    if not meta_path.exists() or not tensor_path.exists():
        raise CorruptConcept(
            f"{folder} has no training checkpoint to resume from; it was trained to the end or saved "
            "by a version without checkpoints"
        )
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(tensor_path)
    except (ValueError, OSError, SafetensorError) as exc:
        raise CorruptConcept(f"the training checkpoint in {folder} cannot be read: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CorruptConcept(f"{meta_path} has an unknown format {meta.get('format')!r}")
    optimizer_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer_state.setdefault(int(index), {})[name] = value
    for key, value in meta["optimizer_scalars"].items():
        index, name = key.split(".", 1)
        optimizer_state.setdefault(int(index), {})[name] = value
    return TrainingState(
        step=int(meta["step"]),
        optimizer={"state": optimizer_state, "param_groups": meta["param_groups"]},
        generator=tensors["rng.generator"],
        global_rng=tensors["rng.global"],
    )
