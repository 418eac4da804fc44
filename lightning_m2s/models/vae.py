"""Frozen video VAE (SVD's AutoencoderKLTemporalDecoder): chunked encode, temporal decode with gradients.

Latent conventions (released code):
- condition latents (left, warped): the posterior **mode**, NOT multiplied by scaling_factor;
- target latent (right view): a **sampled** posterior (or its mean) times scaling_factor (0.18215);
- `decode` takes scaled latents (the UNet's output space) and divides by scaling_factor first.
The weights never train (requires_grad False, always eval), but `decode` does not block gradients:
end-to-end training back-propagates image losses through the decoder into the predicted latents.
Encoding runs under no_grad (its inputs never need gradients).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLTemporalDecoder
from torch import nn

from lightning_m2s.errors import ModelError
from lightning_m2s.models.pretrained import check_svd_directory

# The embedded default's architecture (its weights: pretrain.vae, shipped in weights/): 2x down, 4 latent
# channels (the UNet's conditioning layout). At 4x a tiny VAE stops near 21 dB on the evaluation clips,
# below the classical-fill floor (about 28 dB); at 2x (3x fewer numbers than pixels) it passes it.
# One layer per block keeps the temporal decoder cheap; 64 wide is the smallest that reaches the goal.
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    block_out_channels=(64, 64),
    layers_per_block=1,
    latent_channels=4,
    sample_size=64,
    scaling_factor=0.18215,  # refitted by the recipe
)

ENCODE_MODES = ("mode", "sample", "mean")


class FrozenVideoVAE(nn.Module):
    """Video in [-1, 1] [B, T, 3, H, W] <-> latents [B, T, 4, H/d, W/d] (d = downscale: 8 for SVD, 2 for the tiny default)."""

    def __init__(self, vae: AutoencoderKLTemporalDecoder, encode_chunk_size: int = 16, decode_chunk_size: int | None = None):
        super().__init__()
        if encode_chunk_size < 1 or (decode_chunk_size is not None and decode_chunk_size < 1):
            raise ModelError(f"vae chunk sizes must be >= 1, got {encode_chunk_size}, {decode_chunk_size}")
        self.vae = vae
        self.encode_chunk_size = encode_chunk_size
        self.decode_chunk_size = decode_chunk_size  # None: whole clip (the released training setting)
        self.vae.requires_grad_(False)
        self.vae.eval()

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict | None = None, seed: int | None = 0, **kwargs) -> "FrozenVideoVAE":
        config = dict(config or {})
        if "block_out_channels" in config and "down_block_types" not in config:  # one encoder block per width
            config["down_block_types"] = ("DownEncoderBlock2D",) * len(config["block_out_channels"])
        config = {**TINY_VAE_CONFIG, **config}
        try:
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed)
                vae = AutoencoderKLTemporalDecoder(**config)
        except (TypeError, ValueError) as err:
            raise ModelError(f"vae config {config}: {err}") from err
        return cls(vae, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = "vae", variant: str | None = None, **kwargs):
        """From an SVD directory (`vae/` subfolder) or, with subfolder=None, a saved VAE directory."""
        root = Path(path)
        if subfolder == "vae":
            check_svd_directory(root, components=("vae",))
        elif not (root / (subfolder or "") / "config.json").is_file():
            raise ModelError(f"{root / (subfolder or '')}: no config.json of an AutoencoderKLTemporalDecoder")
        try:
            vae = AutoencoderKLTemporalDecoder.from_pretrained(root, subfolder=subfolder, variant=variant)
        except (OSError, ValueError) as err:
            raise ModelError(f"{root / (subfolder or '')}: cannot load AutoencoderKLTemporalDecoder: {err}") from err
        return cls(vae, **kwargs)

    def train(self, mode: bool = True) -> "FrozenVideoVAE":
        super().train(mode)
        self.vae.eval()  # frozen: never in training mode
        return self

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # --- encode ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(
        self, video: torch.Tensor, mode: str = "mode", scale: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """video [B, T, 3, H, W] in [-1, 1] -> latents [B, T, 4, H/d, W/d], in chunks of frames.

        mode: "mode" / "mean" (the same for a Gaussian posterior) or "sample"; scale: times scaling_factor."""
        if mode not in ENCODE_MODES:
            raise ModelError(f"vae encode mode {mode!r}: choose from {ENCODE_MODES}")
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be [B, T, 3, H, W], got {tuple(video.shape)}")
        B, T, _, H, W = video.shape
        if H % self.downscale or W % self.downscale:
            raise ValueError(f"video size {H}x{W} is not a multiple of the VAE's {self.downscale}x downscale")
        dtype = next(self.vae.parameters()).dtype
        frames = video.flatten(0, 1).to(dtype)  # [B*T, 3, H, W]
        latents = []
        for i in range(0, frames.shape[0], self.encode_chunk_size):
            dist = self.vae.encode(frames[i : i + self.encode_chunk_size]).latent_dist
            latents.append(dist.sample(generator) if mode == "sample" else dist.mode())
        z = torch.cat(latents).to(video.dtype)  # [B*T, 4, h, w]
        if scale:
            z = z * self.scaling_factor
        return z.unflatten(0, (B, T))

    def encode_condition(self, video: torch.Tensor) -> torch.Tensor:
        """Condition latents: posterior mode, unscaled (released code)."""
        return self.encode(video, mode="mode", scale=False)

    def encode_target(self, video: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """Target latent: sampled posterior (or its mean with sample=False) times scaling_factor."""
        return self.encode(video, mode="sample" if sample else "mean", scale=True, generator=generator)

    # --- decode ---------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor, decode_chunk_size: int | None = None) -> torch.Tensor:
        """Scaled latents [B, T, 4, h, w] -> video [B, T, 3, 8h, 8w] (about [-1, 1]).

        The temporal decoder mixes frames within a chunk: chunks of `decode_chunk_size` frames per
        clip (default: the wrapper's setting; None = the whole clip). Under no_grad the peak memory is
        bounded by the chunk; with gradients autograd keeps every chunk's activations anyway."""
        if latents.ndim != 5:
            raise ValueError(f"latents must be [B, T, C, h, w], got {tuple(latents.shape)}")
        B, T = latents.shape[:2]
        chunk = decode_chunk_size or self.decode_chunk_size or T
        dtype = next(self.vae.parameters()).dtype
        z = (latents / self.scaling_factor).to(dtype)
        clips = []
        for b in range(B):
            parts = []
            for i in range(0, T, chunk):
                part = z[b, i : i + chunk]  # [t, 4, h, w]
                parts.append(self.vae.decode(part, num_frames=part.shape[0]).sample)
            clips.append(torch.cat(parts))  # [T, 3, H, W]
        return torch.stack(clips).to(latents.dtype)
