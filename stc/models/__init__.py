"""Base models: resolving and loading one (``base``: hub ids, folders, single files, builtins),
the model families stc knows, single-file checkpoints (``backbones.single_file``), the random-weight test models
(``tiny``), samplers and CPU threads."""
