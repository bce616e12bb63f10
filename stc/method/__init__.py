"""The method of the paper (NeTI): the mapper, the space-time text encoding with its textual
bypass, the attention processors and the placeholder tokens. Torch (and the text encoder's
own classes) only: no diffusers pipelines, no files."""
