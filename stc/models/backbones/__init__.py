"""The model families stc knows (SD 1.x, SD 2.x, SDXL), one backbone object each."""
