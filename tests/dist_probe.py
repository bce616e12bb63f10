"""Probe of two-process training, run by tests/test_pins.py under torchrun:

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT tests/dist_probe.py PHOTOS OUT [STEPS]

Builds the training pieces the way ``stc train`` does (an Accelerator on the CPU, builtin:tiny,
the photos through ``load_photos``, a ``Trainer``), records the first batch each process draws
and a digest of its mapper before and after ``STEPS`` optimizer steps, and writes
``OUT/rank<N>.json`` per process. The test compares the files: the processes must draw different
batches (each sees other data) and end with identical mappers (gradients are synchronised).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path


def mapper_digest(mapper) -> dict:
    """sha256 of every parameter's bytes (name-sorted), plus per-parameter sums for diagnosis."""
    digest = hashlib.sha256()
    sums = {}
    for name, tensor in sorted(mapper.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous().float()
        digest.update(name.encode())
        digest.update(data.numpy().tobytes())
        sums[name] = float(data.double().sum())
    return {"sha256": digest.hexdigest(), "sums": sums}


def main(photos_dir: str, out_dir: str, steps: int = 2) -> None:
    from accelerate import Accelerator

    from stc.models.base import load_base_model
    from stc.train.config import TrainConfig
    from stc.train.images import load_photos
    from stc.train.trainer import Trainer

    config = TrainConfig(steps=steps, batch_size=2, grad_accum=1, seed=1, initializer="cat", save_every=0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=config.grad_accum)
    base = load_base_model("builtin:tiny", device="cpu")
    images = load_photos(Path(photos_dir), config.resolution or base.default_resolution).images
    trainer = Trainer(base, images, "<probe>", config, accelerator)
    before = mapper_digest(trainer.unwrapped_mapper)

    # The first batch this process will train on: draw it, then rewind the generator so that
    # train_step draws exactly this batch again.
    state = trainer.generator.get_state()
    image_index, flip, noise, timesteps, captions = trainer.random_batch()
    trainer.generator.set_state(state)

    losses = [trainer.train_step() for _ in range(steps)]
    after = mapper_digest(trainer.unwrapped_mapper)
    record = {
        "rank": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "first_batch": {
            "image_index": [int(i) for i in image_index],
            "flip": [bool(f) for f in flip],
            "timesteps": [int(t) for t in timesteps],
            "noise_sum": float(noise.double().sum()),
            "captions": list(captions),
        },
        "losses": losses,
        "before": before,
        "after": after,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(record, indent=1))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(arg) for arg in sys.argv[3:4]))
