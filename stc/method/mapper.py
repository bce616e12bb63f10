"""The NeTI mapper: (timestep, UNet layer) -> token embedding + textual bypass.

Plain torch, no diffusers. Constants follow the reference implementation so that its
checkpoints can be imported and reproduce the same outputs (``docs/method.md``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

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


class FourierEncoding(nn.Module):
    """Random Fourier features of (t, l): [sin(w @ x), cos(w @ x)], L2-normalised.

    ``w`` is frozen but saved with the concept (it is drawn once, at creation).
    """

    def __init__(self, num_features: int, sigma_t: float, sigma_l: float, generator: torch.Generator | None = None):
        super().__init__()
        w = torch.randn(num_features, 2, generator=generator)
        w[:, 0] *= sigma_t
        w[:, 1] *= sigma_l
        self.register_buffer("w", w)

    def forward(self, timesteps: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        x = torch.stack([timesteps, layers], dim=-1).to(self.w)  # N, 2
        proj = x @ self.w.T  # N, F
        v = torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)  # N, 2F
        return v / v.norm(dim=-1, keepdim=True)

    def anchors(self, num_time_anchors: int, num_layers: int) -> torch.Tensor:
        """Encodings of t in {0, 100, ..., 900} x l in {0..15}, time-major (160 x 2048)."""
        step = 1000 // num_time_anchors
        t = torch.arange(0, 1000, step, dtype=torch.float32).repeat_interleave(num_layers)
        l = torch.arange(num_layers, dtype=torch.float32).repeat(num_time_anchors)
        return self.forward(t, l)


class NeTIMapper(nn.Module):
    """Maps (timestep, layer) to a normalised 2·D vector: token embedding, then bypass."""

    def __init__(self, config: MapperConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        num_anchors = config.num_time_anchors * config.num_layers
        self.encoding = FourierEncoding(config.num_fourier_features, config.sigma_t, config.sigma_l, generator)
        with seeded_init(generator):
            input_layer = nn.Linear(2 * config.num_fourier_features, num_anchors)
            self.net = nn.Sequential(
                input_layer,
                nn.Linear(num_anchors, config.hidden_dim),
                nn.LayerNorm(config.hidden_dim),
                nn.LeakyReLU(),
                nn.Linear(config.hidden_dim, config.hidden_dim),
                nn.LayerNorm(config.hidden_dim),
                nn.LeakyReLU(),
            )
            self.output_layer = nn.Sequential(nn.Linear(config.hidden_dim, config.output_dim))
        with torch.no_grad():
            input_layer.weight.copy_(self.encoding.anchors(config.num_time_anchors, config.num_layers))

    def hidden(self, timesteps: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        """The 128-d representation before nested dropout (N -> N x 128)."""
        return self.net(self.encoding(timesteps.float(), layers.float()))

    def output(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output layer and normalisation of the whole vector to the initializer's norm; with
        several text encoders, of each encoder's group [token, bypass] to its own norm."""
        raw = self.output_layer(hidden)
        encoders = self.config.encoders
        if len(encoders) == 1:
            return F.normalize(raw, dim=-1) * self.config.norm_scale
        sizes = [width * group_factor(self.config) for width, _ in encoders]
        parts = raw.split(sizes, dim=-1)
        return torch.cat([F.normalize(part, dim=-1) * scale for part, (_, scale) in zip(parts, encoders)], dim=-1)

    def forward(
        self,
        timesteps: torch.Tensor,
        layers: torch.Tensor,
        rank: int | None = None,
        dropout_groups: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Mapper outputs for N (timestep, layer) pairs: N x output_dim.

        ``rank`` keeps hidden dims [:rank] (inference truncation; None or 128 = full).
        In training mode with nested dropout, each dropout group (one reference "mapper call",
        i.e. one layer of one step) is truncated with probability p, each sample at its own k.
        """
        hidden = self.hidden(timesteps, layers)
        if self.training and self.config.nested_dropout:
            hidden = self.nested_dropout(hidden, dropout_groups, generator)
        if rank is not None and self.config.nested_dropout:  # as the reference: without nested dropout
            hidden = truncate(hidden, rank)  # the dims are unordered and a rank changes nothing
        return self.output(hidden)

    def nested_dropout(
        self, hidden: torch.Tensor, groups: torch.Tensor | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        n, dim = hidden.shape
        if groups is None:
            groups = torch.zeros(n, dtype=torch.long)
        groups = groups.cpu()
        num_groups = int(groups.max()) + 1
        apply = torch.rand(num_groups, generator=generator) < self.config.nested_dropout_prob  # G
        keep = torch.randint(0, dim, (n,), generator=generator)  # N
        keep = torch.where(apply[groups], keep, torch.full_like(keep, dim))
        mask = torch.arange(dim).unsqueeze(0) < keep.unsqueeze(1)  # N, dim
        return hidden * mask.to(hidden)

    def split(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return split_outputs(outputs, self.config)


def group_factor(config: MapperConfig) -> int:
    """Output dims per dim of an encoder's width: n vectors, and as many for the bypass."""
    return config.num_vectors * (2 if config.bypass else 1)


def encoder_outputs(outputs: torch.Tensor, config: MapperConfig) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Mapper outputs -> per text encoder (token embeddings, bypass vectors or None): encoder k's
    group holds its n·D_k token dims (the n vectors one after the other), then its bypass."""
    parts, start = [], 0
    for width, _ in config.encoders:
        size = width * config.num_vectors
        token = outputs[..., start : start + size]
        bypass = outputs[..., start + size : start + 2 * size] if config.bypass else None
        parts.append((token, bypass))
        start += width * group_factor(config)
    return parts


def split_outputs(outputs: torch.Tensor, config: MapperConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mapper outputs -> (token embeddings, bypass vectors or None), each encoder's concatenated
    (one encoder: the first n·D dims, then the rest)."""
    parts = encoder_outputs(outputs, config)
    if len(parts) == 1:
        return parts[0]
    token = torch.cat([token for token, _ in parts], dim=-1)
    return token, (torch.cat([bypass for _, bypass in parts], dim=-1) if config.bypass else None)


def truncate(hidden: torch.Tensor, rank: int) -> torch.Tensor:
    """Zero the hidden dims >= rank (nested-dropout truncation at inference)."""
    dim = hidden.shape[-1]
    if not 1 <= rank <= dim:
        raise ValueError(f"rank must be between 1 and {dim}, got {rank}")
    if rank == dim:
        return hidden
    mask = torch.zeros(dim, dtype=hidden.dtype, device=hidden.device)
    mask[:rank] = 1
    return hidden * mask


class seeded_init:
    """Context manager: module initialisation draws from ``generator``'s seed when given."""

    def __init__(self, generator: torch.Generator | None):
        self.generator = generator
        self._fork = None

    def __enter__(self):
        if self.generator is not None:
            self._fork = torch.random.fork_rng(devices=[])
            self._fork.__enter__()
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.generator)))
        return self

    def __exit__(self, *exc):
        if self._fork is not None:
            self._fork.__exit__(*exc)
        return False
