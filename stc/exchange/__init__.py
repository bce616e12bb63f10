"""Other tools' formats: exporting concepts to them and importing theirs. Each format reads and
writes in one place; the distillation to plain textual inversion is ``distill``."""
