"""The concept registry: concepts as bytes and metadata on disk, written atomically and locked.
Torch-free (``stc ls`` stays light) except ``conceptio``, the one module that turns a weights
file into a mapper and back."""
