"""Small synthetic worlds with really trained Stable Diffusion-topology models (``builtin:shapes``)."""
