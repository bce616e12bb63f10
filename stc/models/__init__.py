"""Base models: resolving and loading one (``base``: hub ids, folders, single files, builtins),
the model families stc knows, single-file checkpoints (``ldm``), the random-weight test models
(``tiny``), samplers and CPU threads."""
