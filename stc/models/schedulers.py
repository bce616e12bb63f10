"""The samplers ``--scheduler`` offers, and their names in A1111-style metadata."""

from __future__ import annotations

from ..errors import BadInput

SCHEDULERS = {  # --scheduler: (diffusers class, A1111 sampler name)
    "dpm": ("DPMSolverMultistepScheduler", "DPM++ 2M"),
    "ddim": ("DDIMScheduler", "DDIM"),
    "euler": ("EulerDiscreteScheduler", "Euler"),
    "pndm": ("PNDMScheduler", "PLMS"),
}


def check_scheduler(name: str) -> str:
    if name not in SCHEDULERS:
        raise BadInput(f"scheduler (--scheduler) must be one of {', '.join(SCHEDULERS)}, not {name!r}")
    return name


def make_scheduler(name: str, config):
    """A fresh diffusers scheduler of kind ``name`` with the base model's ``config``."""
    import diffusers

    check_scheduler(name)
    overrides = {"skip_prk_steps": True} if name == "pndm" else {}  # as SD's own PNDM config; PRK needs >= 4 steps
    return getattr(diffusers, SCHEDULERS[name][0]).from_config(config, **overrides)
