"""``builtin:tiny``, ``builtin:tiny-sd2`` and ``builtin:tiny-sdxl``: random-weight Stable Diffusion pipelines.

Built from code with a fixed seed, in seconds, with no network. ``builtin:tiny`` has the SD 1.x
topology: 4 down blocks (3 with cross-attention), a mid block, 4 up blocks (3 with
cross-attention), 2 transformer layers per down block and 3 per up block, i.e. the 16
cross-attention layers of SD 1.x, at tiny widths; epsilon prediction, 64 px.

``builtin:tiny-sd2`` is the same at SD 2.x's choices: v-prediction, another text width (48),
a text encoder built the way diffusers ships SD 2's (OpenCLIP-style ``gelu`` layers, the last
of OpenCLIP's layers dropped: SD 2 keeps 23 of 24, the tiny one 3 of 4), SD 2's UNet options
(``use_linear_projection``, ``upcast_attention``, a head count per block that keeps the head
width constant like SD 2's (5, 10, 20, 20)), its tokenizer's ``!`` padding, and SD 2's default
resolution ratio (768/512 = 96/64 px).

``builtin:tiny-sdxl`` has the SDXL layout: two text encoders (a CLIP one, 32 wide, read at
its penultimate layer, and an OpenCLIP-style one with a text projection, 48 wide, that also
gives the pooled embedding; its config keeps SDXL's legacy end-of-text id 2), both tokenizers
(the second pads with ``!``), and a UNet with SDXL's blocks (no attention in the first down
block, none in the last up block), its added "text_time" conditioning, linear projections and
several transformer blocks per attention module (1, 2 and 3 by depth, as SDXL's 1, 2 and 10):
11 attention modules with 28 cross-attentions; SDXL's VAE scaling factor (0.13025) and
scheduler (Euler). It renders at 64 px (SDXL's ratio to SD 1.x is not kept, for speed).

The tokenizer is a real byte-level BPE tokenizer in the CLIP layout (lower-casing, ``</w>``
word ends, start/end tokens) whose vocabulary covers the words below as single tokens.
"""

from __future__ import annotations

from functools import lru_cache

TINY = "builtin:tiny"
TINY_SD2 = "builtin:tiny-sd2"
TINY_SDXL = "builtin:tiny-sdxl"
SHAPES = "builtin:shapes"
SHAPES_SDXL = "builtin:shapes-sdxl"
# random-weight test models in the SD 1.x, SD 2.x and SDXL layouts (stc/models/tiny.py), and the
# trained shapes world in the SD 1.x and SDXL layouts (stc/worlds/shapes)
BUILTINS = (TINY, TINY_SD2, TINY_SDXL, SHAPES, SHAPES_SDXL)

TINY_SEED = 20230524
TINY_TEXT_WIDTH = 32
TINY_RESOLUTION = 64

TINY_SD2_SEED = 20221124
TINY_SD2_TEXT_WIDTH = 48
TINY_SD2_RESOLUTION = 96  # sample_size 12: SD 2's 768 px is 1.5 x SD 1's 512
TINY_SD2_TEXT_LAYERS = 3  # OpenCLIP-style: 4 layers with the last dropped, as SD 2 keeps 23 of 24

# Words that the tiny tokenizer knows as single tokens (everything else splits into pieces).
WORDS = """
a an the of on in at to with and or by for from my one two three next near under over above
photo photograph picture rendering rendition painting drawing sketch image portrait close-up
cropped clean dirty dark bright good nice cool weird small large big tiny little old new
style art artwork oil watercolor pencil sculpture statue toy doll plush figure
object thing animal pet cat dog kitten puppy bird horse cow fish bear fox rabbit lion tiger
person man woman boy girl child face head eye eyes hand hair
car truck bike boat train plane house building castle tower bridge city street road
tree flower flowers grass forest mountain mountains hill river lake sea ocean beach sand
sky cloud clouds sun moon star stars space planet earth snow rain water fire ice
red blue green yellow orange purple pink black white gray grey brown gold golden silver
table chair bed sofa cup mug bowl vase bottle book lamp clock hat shoe shoes bag box
teapot teddy backpack sunglasses glasses shirt jacket dress
sitting standing running walking jumping flying swimming sleeping playing wearing holding
eating looking lying floating riding reading
is are as it its this that front back top side behind inside outside around
colorful vintage modern ancient futuristic realistic detailed beautiful cute happy sad
high quality best masterpiece wallpaper poster cartoon anime digital 3d render cinematic
light lighting night day sunset sunrise morning evening
van gogh monet picasso style of
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE: repeatedly merge the lowest-ranked adjacent pair."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, index = min(pairs)
        if rank == 1 << 30:
            break
        symbols[index : index + 2] = [symbols[index] + symbols[index + 1]]
    return symbols


@lru_cache(maxsize=4)
def tiny_vocab_and_merges(words: tuple[str, ...] = tuple(WORDS)) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of the tiny tokenizer; every word in ``words`` is one token."""
    byte_chars = list(bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    words = sorted({w for w in words if w.isalpha()}, key=lambda w: (len(w), w))

    def add_merge(a: str, b: str) -> None:
        if (a, b) not in ranks:
            ranks[(a, b)] = len(merges)
            merges.append((a, b))
            vocab_list.append(a + b)

    for _ in range(8):  # later merges never change words that already merge fully
        unfinished = 0
        for word in words:
            symbols = list(word[:-1]) + [word[-1] + "</w>"]
            pieces = _bpe(symbols, ranks)
            if len(pieces) == 1:
                continue
            unfinished += 1
            joined = pieces[0]
            for piece in pieces[1:]:
                add_merge(joined, piece)
                joined += piece
        if not unfinished:
            break
    vocab_list = list(dict.fromkeys(vocab_list)) + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(vocab_list)}, merges


def build_tiny_tokenizer(pad_token: str = "<|endoftext|>", words: tuple[str, ...] = tuple(WORDS)):
    """The tiny CLIP-layout tokenizer; SD 2's tokenizer pads with ``!`` instead of the end token.
    ``words`` are the single-token words (builtin:shapes adds its own)."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab_and_merges(tuple(words))
    tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77, pad_token=pad_token)
    if len(tokenizer("a photo of a cat").input_ids) != 7:  # bos + 5 words + eos
        raise RuntimeError("the builtin:tiny tokenizer does not tokenize; transformers changed its API")
    return tokenizer


def build_tiny_pipeline():
    """A ``StableDiffusionPipeline`` with random weights and the SD 1.x topology (fp32, CPU)."""
    tokenizer = build_tiny_tokenizer()
    text = dict(hidden_size=TINY_TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2)
    unet = dict(block_out_channels=(16, 32, 32, 32), attention_head_dim=4)
    return _random_pipeline(tokenizer, TINY_SEED, TINY_RESOLUTION, text, unet)


def build_tiny_sd2_pipeline():
    """A ``StableDiffusionPipeline`` with random weights and the SD 2.x choices (fp32, CPU)."""
    tokenizer = build_tiny_tokenizer(pad_token="!")
    text = dict(
        hidden_size=TINY_SD2_TEXT_WIDTH,
        intermediate_size=4 * TINY_SD2_TEXT_WIDTH,  # OpenCLIP's MLP ratio
        num_hidden_layers=TINY_SD2_TEXT_LAYERS,
        hidden_act="gelu",  # OpenCLIP's; SD 1's OpenAI CLIP uses quick_gelu
    )
    unet = dict(
        block_out_channels=(16, 32, 64, 64),
        attention_head_dim=(1, 2, 4, 4),  # heads per block, as SD 2's (5, 10, 20, 20): 16-wide heads
        use_linear_projection=True,
        upcast_attention=True,
    )
    return _random_pipeline(tokenizer, TINY_SD2_SEED, TINY_SD2_RESOLUTION, text, unet, prediction_type="v_prediction")


TINY_SDXL_SEED = 20230726
TINY_SDXL_TEXT_WIDTHS = (32, 48)  # CLIP ViT-L's and OpenCLIP ViT-bigG's places (768, 1280)
TINY_SDXL_RESOLUTION = 64


def build_tiny_sdxl_pipeline():
    """A ``StableDiffusionXLPipeline`` with random weights and the SDXL layout (fp32, CPU)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .backbones import SDXL

    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_tokenizer(pad_token="!")
    first, second = TINY_SDXL_TEXT_WIDTHS
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SDXL_SEED)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=first, intermediate_size=2 * first, num_hidden_layers=3, num_attention_heads=4,
            projection_dim=first, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            **common,
        ))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=second, intermediate_size=4 * second, num_hidden_layers=3, num_attention_heads=4,
            projection_dim=second, hidden_act="gelu", eos_token_id=2, pad_token_id=1,  # SDXL's config values
            **common,
        ))
        unet = UNet2DConditionModel(
            sample_size=TINY_SDXL_RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(16, 32, 32), attention_head_dim=(1, 2, 2), norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 3), cross_attention_dim=first + second, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + second,  # 6 size ids x 8, the pooled embedding
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
            latent_channels=4, norm_num_groups=8, sample_size=TINY_SDXL_RESOLUTION, scaling_factor=0.13025,
        )
    scheduler = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(SDXL.config_dir / "scheduler"))
    return sdxl_pipeline(tokenizer, tokenizer_2, text_encoder, text_encoder_2, unet, vae, scheduler)


def sdxl_pipeline(tokenizer, tokenizer_2, text_encoder, text_encoder_2, unet, vae, scheduler):
    """A frozen ``StableDiffusionXLPipeline`` of these components with SDXL base's settings: an
    empty negative prompt is zeros (``force_zeros_for_empty_prompt``), no watermark."""
    from diffusers import StableDiffusionXLPipeline

    for module in (text_encoder, text_encoder_2, unet, vae):
        module.eval().requires_grad_(False)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _random_pipeline(tokenizer, seed: int, resolution: int, text: dict, unet: dict, prediction_type: str = "epsilon"):
    """Text encoder, UNet (the 16 cross-attention layers of SD) and VAE drawn from ``seed``, in that order."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    width = text["hidden_size"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), num_attention_heads=4, max_position_embeddings=77, projection_dim=width,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **text,
        ))
        unet_model = UNet2DConditionModel(
            sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=width, norm_num_groups=8, **unet,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
            latent_channels=4, norm_num_groups=8, sample_size=resolution,
        )
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, prediction_type=prediction_type,
    )
    for module in (text_encoder, unet_model, vae):
        module.eval().requires_grad_(False)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet_model, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def builtin_tokenizers(spec: str) -> list:
    """A builtin model's tokenizers (two for the SDXL layouts), built without its weights."""
    if spec in (SHAPES, SHAPES_SDXL):
        from ..worlds.shapes.model import shapes_tokenizer, shapes_tokenizer_2

        return [shapes_tokenizer()] + ([shapes_tokenizer_2()] if spec == SHAPES_SDXL else [])
    return {TINY: lambda: [build_tiny_tokenizer()], TINY_SD2: lambda: [build_tiny_tokenizer(pad_token="!")],
            TINY_SDXL: lambda: [build_tiny_tokenizer(), build_tiny_tokenizer(pad_token="!")]}[spec]()
