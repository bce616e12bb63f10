"""A mapper's configuration: everything that rebuilds one, weights excluded (torch-free, so the
registry can read a concept's ranks without loading torch; the mapper itself is ``mapper.py``).
Constants follow the reference implementation (``docs/method.md``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import BadInput

NUM_UNET_LAYERS = 16
HIDDEN_DIM = 128


@dataclass
class MapperConfig:
    """Everything needed to rebuild a mapper (weights excluded)."""

    text_width: int  # D: width of the UNet's text context (768 for SD 1.x, 1024 for SD 2.x, 2048 for SDXL)
    norm_scale: float  # norm of the initializer word's input embedding (the first text encoder's)
    num_layers: int = NUM_UNET_LAYERS
    num_time_anchors: int = 10
    num_fourier_features: int = 1024
    sigma_t: float = 0.03
    sigma_l: float = 2.0
    hidden_dim: int = HIDDEN_DIM
    bypass: bool = True
    nested_dropout: bool = True
    nested_dropout_prob: float = 0.5
    num_vectors: int = 1  # token embeddings per placeholder: 1 for NeTI; n for imported n-vector embeddings
    # A model with several text encoders (SDXL: 768 + 1280) gets one output group per encoder,
    # [token, bypass] each, normalised to that encoder's initializer norm; None: one encoder.
    encoder_widths: list[int] | None = None
    norm_scales: list[float] | None = None

    def __post_init__(self) -> None:
        if self.text_width <= 0 or self.hidden_dim <= 0 or self.num_layers <= 0 or self.num_vectors <= 0:
            raise ValueError("text_width, hidden_dim, num_layers and num_vectors must be positive")
        if not 0.0 <= self.nested_dropout_prob <= 1.0:
            raise ValueError("nested_dropout_prob must lie in [0, 1]")
        if (self.encoder_widths is None) != (self.norm_scales is None):
            raise ValueError("encoder_widths and norm_scales come together")
        if self.encoder_widths is not None:
            self.encoder_widths, self.norm_scales = list(self.encoder_widths), [float(s) for s in self.norm_scales]
            if (sum(self.encoder_widths) != self.text_width or len(self.norm_scales) != len(self.encoder_widths)
                    or min(self.encoder_widths) <= 0):
                raise ValueError(f"encoder_widths {self.encoder_widths} must be positive and add up to text_width "
                                 f"{self.text_width}, one norm_scale each")

    @classmethod
    def for_encoders(cls, widths, norms, **settings) -> "MapperConfig":
        """The config of a mapper feeding text encoders of ``widths`` whose initializer norms are
        ``norms`` (one output group each). The one home of how a config records them: one encoder
        in the keys concepts have always had, several in ``encoder_widths``/``norm_scales``."""
        widths, norms = [int(width) for width in widths], [float(norm) for norm in norms]
        grouped = len(widths) != 1
        return cls(text_width=sum(widths), norm_scale=norms[0], encoder_widths=widths if grouped else None,
                   norm_scales=norms if grouped else None, **settings)

    @property
    def widths(self) -> list[int]:
        """The width of each text encoder the mapper feeds, in order."""
        return [width for width, _ in self.encoders]

    @property
    def encoders(self) -> list[tuple[int, float]]:
        """(width, initializer norm) of each text encoder the mapper feeds, in order."""
        if self.encoder_widths is None:
            return [(self.text_width, self.norm_scale)]
        return list(zip(self.encoder_widths, self.norm_scales))

    @property
    def rank_max(self) -> int | None:
        """The highest truncation rank (rank r keeps hidden dims [:r]); None when ranks do nothing:
        without nested dropout the hidden dims are unordered (an ablation, or an imported
        textual-inversion embedding)."""
        return self.hidden_dim if self.nested_dropout else None

    @property
    def output_dim(self) -> int:
        return self.text_width * self.num_vectors * (2 if self.bypass else 1)

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.encoder_widths is None:  # one encoder: the keys concepts have always had
            del data["encoder_widths"], data["norm_scales"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "MapperConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def rank_max_of(config: dict) -> int | None:
    """:attr:`MapperConfig.rank_max` of a config given as a mapping (a concept.yaml's ``mapper``),
    tolerating a damaged one: an absent or non-numeric ``hidden_dim`` counts as the default."""
    hidden = config.get("hidden_dim")
    if isinstance(hidden, bool) or not isinstance(hidden, (int, float)) or hidden <= 0:
        hidden = HIDDEN_DIM
    return MapperConfig(text_width=1, norm_scale=1.0, hidden_dim=int(hidden),
                        nested_dropout=config.get("nested_dropout", True) is not False).rank_max


def check_rank(name: str, rank: int, rank_max: int | None, written: str | None = None) -> int:
    """The one rank rule: a rank lies in 1..``rank_max`` (the concept's mapper hidden size), and a
    concept without ranks (``rank_max`` None) takes none. ``written`` is how the user gave it
    (``<mydog:200>``, ``--rank 200``), for the message."""
    written = written or f"rank {rank}"
    if rank_max is None:
        raise BadInput(f"{name} has no ranks (it was trained without nested dropout, or is an imported "
                       f"textual-inversion embedding): {written} does not apply to it")
    if not 1 <= rank <= rank_max:
        raise BadInput(f"{name} has ranks 1..{rank_max}; {written} is outside them")
    return rank
