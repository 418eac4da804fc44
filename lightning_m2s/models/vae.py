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

# The embedded default's architecture (its weights: pretrain.vae, shipped in weights/): 2x down with as many
# latent numbers as pixel values (12 channels = 2 x 2 pixels x RGB), so the round trip can be near lossless;
# the UNet's conditioning layout follows the latent channel count (models.unet). The mid blocks' attention
# is switched off (zero output projection, see `switch_off_mid_attention`): without it the VAE is all
# convolutions, linear in the frame size. One layer per block keeps the temporal decoder cheap.
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    block_out_channels=(64, 64),
    layers_per_block=1,
    latent_channels=12,
    sample_size=64,
    scaling_factor=0.18215,  # refitted by the recipe
)

ENCODE_MODES = ("mode", "sample", "mean")


def mid_attentions(vae: AutoencoderKLTemporalDecoder) -> list[nn.Module]:
    """The self-attention layers of the encoder's and the temporal decoder's mid blocks."""
    return [*vae.encoder.mid_block.attentions, *vae.decoder.mid_block.attentions]


class PassThroughAttnProcessor:
    """A mid-block attention whose output projection is zero adds nothing to its residual: return the
    residual without computing the attention (quadratic in the frame size). Exactly the same output."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        return hidden_states / attn.rescale_output_factor


def switch_off_mid_attention(vae: AutoencoderKLTemporalDecoder) -> None:
    """Zero and freeze the mid blocks' attention output projections (a VAE trained so never uses them) and
    skip their computation. diffusers builds these layers unconditionally, so the weights stay in the file
    (and a plain diffusers load computes the same output, only slower)."""
    for attn in mid_attentions(vae):
        for p in attn.to_out[0].parameters():
            p.data.zero_()
            p.requires_grad_(False)
        attn.set_processor(PassThroughAttnProcessor())


def skip_unused_mid_attention(vae: AutoencoderKLTemporalDecoder) -> bool:
    """Install the pass-through where a loaded VAE's mid-block attention has a zero output projection."""
    layers = mid_attentions(vae)
    unused = all(not any(p.any() for p in attn.to_out[0].parameters()) for attn in layers)
    if unused:
        for attn in layers:
            attn.set_processor(PassThroughAttnProcessor())
    return unused


class FrozenVideoVAE(nn.Module):
    """Video in [-1, 1] [B, T, 3, H, W] <-> latents [B, T, c, H/d, W/d] (SVD: c 4, d 8; the tiny default: c 12, d 2)."""

    def __init__(self, vae: AutoencoderKLTemporalDecoder, encode_chunk_size: int = 16, decode_chunk_size: int | None = None):
        super().__init__()
        if encode_chunk_size < 1 or (decode_chunk_size is not None and decode_chunk_size < 1):
            raise ModelError(f"vae chunk sizes must be >= 1, got {encode_chunk_size}, {decode_chunk_size}")
        self.vae = vae
        skip_unused_mid_attention(vae)
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
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # --- encode ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(
        self, video: torch.Tensor, mode: str = "mode", scale: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """video [B, T, 3, H, W] in [-1, 1] -> latents [B, T, c, H/d, W/d], in chunks of frames.

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
        z = torch.cat(latents).to(video.dtype)  # [B*T, c, h, w]
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
        """Scaled latents [B, T, c, h, w] -> video [B, T, 3, d h, d w] (about [-1, 1]).

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
                part = z[b, i : i + chunk]  # [t, c, h, w]
                parts.append(self.vae.decode(part, num_frames=part.shape[0]).sample)
            clips.append(torch.cat(parts))  # [T, 3, H, W]
        return torch.stack(clips).to(latents.dtype)
