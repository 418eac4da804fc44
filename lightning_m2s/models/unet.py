"""SVD's UNetSpatioTemporalConditionModel from a pretrained SVD directory or a tiny config; conv_in widening.

conv_in channel layout after widening (paper App. C.1, released code), c = the VAE's latent channels
(the UNet's out_channels: 4 for img2vid-xt, 12 for the embedded default):
    left_condition=True  (3c + 1; 13 for SVD): [latent c | E(V_l) c | E(V_warp) c | mask 1]
    left_condition=False (2c + 1;  9 for SVD): [latent c | E(V_warp) c | mask 1]
SVD's image-condition weights (its channels c..2c) are copied into both image slots and halved
(3c + 1) or copied unchanged (2c + 1); the mask weights start at zero; bias unchanged. So at
initialisation the widened conv on [x, a, a, m] (or [x, a, m]) equals SVD's conv on [x, a].
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNetSpatioTemporalConditionModel
from torch import nn

from lightning_m2s.errors import ModelError
from lightning_m2s.models.pretrained import check_svd_directory
from lightning_m2s.models.vae import TINY_VAE_CONFIG

# The embedded default's architecture (its weights: pretrain.prior, shipped in weights/): SVD's UNet at
# tiny width, 8.7 M parameters. Three levels over the 2x VAE's latents, with attention (and so the
# disocclusion full attention) on the two coarser ones only: a 32x32 latent grid per 64 px frame would
# make full-resolution attention the whole cost on a CPU. The first level is 64 wide, not 32: diffusers
# fixes GroupNorm at 32 groups, so 32 channels would be normalised one by one per frame, and a prior
# built so copies its conditioning frame poorly (at sigma_max after 200 steps: MSE 0.016 at 32 wide,
# 0.007 at 64). in_channels is SVD's 2c (noisy + image latent): widening to 3c + 1 / 2c + 1 is the same
# step as for img2vid-xt.
TINY_UNET_CONFIG = dict(
    sample_size=32,  # latent side of the 64 px evaluation clips; metadata only
    in_channels=2 * TINY_VAE_CONFIG["latent_channels"],
    out_channels=TINY_VAE_CONFIG["latent_channels"],
    down_block_types=("DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal"),
    up_block_types=("CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"),
    block_out_channels=(64, 64, 128),
    addition_time_embed_dim=32,  # 3 x 32 = projection_class_embeddings_input_dim
    projection_class_embeddings_input_dim=96,
    layers_per_block=1,
    cross_attention_dim=64,  # the frame-embedding width
    transformer_layers_per_block=1,
    num_attention_heads=(2, 2, 4),  # 32 channels per head
    num_frames=25,  # the longest bucket; metadata only
)


def conditioning_channels(latent_channels: int, left_condition: bool = True) -> int:
    """conv_in input channels after widening: 3c + 1 with the left view, 2c + 1 without (13 / 9 for SVD)."""
    return (3 if left_condition else 2) * latent_channels + 1


def build_tiny_unet(seed: int | None = 0, **overrides) -> UNetSpatioTemporalConditionModel:
    """A randomly initialised SVD-architecture UNet (2c input channels, not yet widened)."""
    config = {**TINY_UNET_CONFIG, **overrides}
    n_added = config["projection_class_embeddings_input_dim"]
    if n_added != 3 * config["addition_time_embed_dim"]:
        raise ModelError(
            f"unet config: projection_class_embeddings_input_dim ({n_added}) must be 3 x "
            f"addition_time_embed_dim ({config['addition_time_embed_dim']}): fps, motion bucket, cond_aug"
        )
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return UNetSpatioTemporalConditionModel(**config)
    return UNetSpatioTemporalConditionModel(**config)


def load_unet(path: str | Path, variant: str | None = None, torch_dtype=None) -> UNetSpatioTemporalConditionModel:
    """The UNet of an SVD directory in diffusers format (`unet/` subfolder), e.g. img2vid-xt."""
    root = check_svd_directory(path, components=("unet",))
    try:
        return UNetSpatioTemporalConditionModel.from_pretrained(
            root, subfolder="unet", variant=variant, torch_dtype=torch_dtype
        )
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelError(f"{root / 'unet'}: cannot load UNetSpatioTemporalConditionModel: {err}") from err


@torch.no_grad()
def widen_conv_in(unet: UNetSpatioTemporalConditionModel, left_condition: bool = True) -> UNetSpatioTemporalConditionModel:
    """Widen SVD's 8-channel conv_in in place (see the module docstring) and update the config.

    A UNet that already has the target width (a saved M2SVid checkpoint) is returned unchanged."""
    c = unet.config.out_channels  # latent channels
    target = conditioning_channels(c, left_condition)
    old = unet.conv_in
    if old.in_channels == target:
        return unet
    if old.in_channels != 2 * c:
        raise ModelError(
            f"conv_in has {old.in_channels} input channels; expected SVD's 2 x {c} latent channels (to widen) "
            f"or {target} (already widened for left_condition={left_condition})"
        )
    new = nn.Conv2d(
        target, old.out_channels, old.kernel_size, old.stride, old.padding,
        bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype,
    )
    w_old = old.weight  # [C_out, 2c, k, k]
    w = torch.zeros_like(new.weight)  # [C_out, target, k, k]; mask channel (the last) stays 0
    w[:, :c] = w_old[:, :c]  # noisy latent
    if left_condition:
        w[:, c : 2 * c] = w_old[:, c:] / 2  # E(V_l)
        w[:, 2 * c : 3 * c] = w_old[:, c:] / 2  # E(V_warp)
    else:
        w[:, c : 2 * c] = w_old[:, c:]  # E(V_warp)
    new.weight.copy_(w)
    if old.bias is not None:
        new.bias.copy_(old.bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    unet.conv_in = new
    unet.register_to_config(in_channels=target)
    return unet
