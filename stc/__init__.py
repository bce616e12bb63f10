"""stc: neural space-time concepts (NeTI) for Stable Diffusion."""

__version__ = "0.1.0"
