"""The NeTI mapper: (timestep, UNet layer) -> token embedding + textual bypass.

Plain torch, no diffusers. Constants follow the reference implementation so that its
checkpoints can be imported and reproduce the same outputs (``docs/method.md``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mapper_config import HIDDEN_DIM, NUM_UNET_LAYERS, MapperConfig, check_rank  # noqa: F401 (a mapper's config)


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
    check_rank("the mapper", rank, dim)
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
