"""The method of the paper (NeTI): the mapper, the space-time text encoding with its textual
bypass, the attention processors and the placeholder tokens. Torch (and the text encoder's
own classes) only: no diffusers pipelines, no files."""

# The method's code a host carries, copied at export/install time (the diffusers export's
# stc_concept.py, the ComfyUI nodes): (module, public top-level names) in definition order. Each
# host adds what only it uses; the one list keeps them from drifting apart.
HOSTED = (
    ("stc.method.mapper_config", ("NUM_UNET_LAYERS", "HIDDEN_DIM", "MapperConfig", "check_rank")),
    ("stc.method.mapper", ("FourierEncoding", "NeTIMapper", "group_factor", "encoder_outputs", "split_outputs",
                           "truncate", "seeded_init")),
    ("stc.method.encoding", ("BYPASS_SCALE", "ConceptSlot", "TextEncoder", "Encoding", "text_transformer",
                             "causal_mask", "spacetime_rows", "encode_context", "same_rows", "encode_one",
                             "penultimate_state", "pooled_state", "encode_layers", "SCHEDULE_CHUNK",
                             "pooled_over_layers", "encode_schedule")),
)
