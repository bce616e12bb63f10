"""Training a concept: its settings (``config``), the photos, the method's step (``trainer``) and
the run around it (``training``: checkpoints, previews, resume, saving)."""
