"""StereoRefiner: the M2SVid model (SVD UNet + frozen VAE + frame embedding + disocclusion attention).

Training modules use it as:
    model = build_refiner(**cfg.model)                       # plain keys, see experiments/base.yaml
    cond = model.build_conditioning(left, warped, mask)      # [B,T,3,H,W] in [-1,1], mask bool [B,T,1,H,W]
    z = model.encode_target(right)                           # [B,T,c,H/d,W/d], sampled x scaling factor
    z_hat = model.predict_one_step(cond)                     # Eq. 4
    video = model.decode(z_hat)                              # gradients flow to z_hat
    loss = model.denoiser.diffusion_loss(z, cond, sigma)     # standard diffusion (Eq. 1)
    optimizer = AdamW(model.trainable_parameters())          # only the UNet trains
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_m2s.config import with_defaults
from lightning_m2s.errors import ConfigError, ModelError
from lightning_m2s.geometry import dilate_mask
from lightning_m2s.models import unet as unet_lib
from lightning_m2s.models.attention import KV_SOURCES, POLICIES, install_attention_processors
from lightning_m2s.models.embedded import resolve_pretrained
from lightning_m2s.models.embedding import POOLED_SUBFOLDER, CLIPFrameEmbedding, PooledFrameEmbedding, added_time_ids
from lightning_m2s.models.pretrained import check_svd_directory
from lightning_m2s.models.vae import TINY_VAE_CONFIG, FrozenVideoVAE
from lightning_m2s.objective import Denoiser

AUTOCAST_DTYPES = {None: None, "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
MASK_RESIZE = ("bilinear", "area", "max")


@dataclass
class StereoCondition:
    """Everything the UNet is conditioned on, for one batch."""

    latents: torch.Tensor  # [B, T, 2c + 1 | c + 1, h, w]: E(V_l) (if on), E(V_warp), mask (+1 hole / -1 known)
    context: torch.Tensor  # [B, T, D]: one embedding per left frame
    added_time_ids: torch.Tensor  # [B, 3]: fps_id, motion_bucket_id, cond_aug
    hole_mask: torch.Tensor | None  # [B, T, H, W] float hole mask at pixel resolution (attention), or None
    latent_channels: int  # c: the VAE's (4 for SVD)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The shape of the latent being denoised: [B, T, c, h, w]."""
        B, T, _, h, w = self.latents.shape
        return (B, T, self.latent_channels, h, w)


class StereoRefiner(nn.Module):
    def __init__(
        self,
        unet,
        vae: FrozenVideoVAE,
        embedding: nn.Module,
        *,  # the `model:` settings: experiments/base.yaml says what each is, and its default
        left_condition: bool,
        full_attention: bool,
        attention_policy: str,
        attention_threshold: float,
        attention_max_tokens_per_frame: int | None,
        attention_kv: str,
        mask_dilation: int,
        mask_resize: str,
        motion_bucket_id: float,
        cond_aug_log_mean: float,
        cond_aug_log_std: float,
        cond_aug_eval: float,
        sigma_min: float,
        sigma_max: float,
        gradient_checkpointing: bool,
        autocast_dtype: str | None,
    ):
        super().__init__()
        # 1. Validate early
        if mask_dilation < 0 or (mask_dilation > 1 and mask_dilation % 2 == 0):
            raise ConfigError(f"model.mask_dilation must be odd (or 0/1 for none), got {mask_dilation}")
        if mask_resize not in MASK_RESIZE:
            raise ConfigError(f"model.mask_resize {mask_resize!r}: choose from {MASK_RESIZE}")
        if attention_kv not in KV_SOURCES:
            raise ConfigError(f"model.attention_kv {attention_kv!r}: choose from {KV_SOURCES}")
        if attention_policy not in POLICIES:
            raise ConfigError(f"model.attention_policy {attention_policy!r}: choose from {POLICIES}")
        if autocast_dtype not in AUTOCAST_DTYPES:
            raise ConfigError(f"model.autocast_dtype {autocast_dtype!r}: choose from {list(AUTOCAST_DTYPES)}")
        if unet.config.out_channels != vae.latent_channels:
            raise ModelError(f"unet out_channels {unet.config.out_channels} != the VAE's {vae.latent_channels} latent channels")
        if embedding.dim != unet.config.cross_attention_dim:
            raise ModelError(
                f"frame embedding width {embedding.dim} != unet cross_attention_dim {unet.config.cross_attention_dim}"
            )
        # 2. Modules: the UNet is widened in place; VAE and embedding are frozen
        self.unet = unet_lib.widen_conv_in(unet, left_condition)
        self.vae = vae
        self.embedding = embedding
        self.left_condition = left_condition
        self.mask_dilation, self.mask_resize = mask_dilation, mask_resize
        self.motion_bucket_id = motion_bucket_id
        self.cond_aug_log_mean, self.cond_aug_log_std = cond_aug_log_mean, cond_aug_log_std
        self.cond_aug_eval = cond_aug_eval
        self.autocast_dtype = AUTOCAST_DTYPES[autocast_dtype]
        # 3. Attention processors (through diffusers' set_attn_processor; the controller carries the mask)
        self.attention = install_attention_processors(
            self.unet, full_attention, attention_policy, attention_threshold, attention_max_tokens_per_frame,
            kv_source=attention_kv,
        )
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        # 4. Objective: all EDM scalings live in the denoiser
        self.denoiser = Denoiser(self._network, sigma_min, sigma_max)

    # --- what trains ------------------------------------------------------------------------------
    def trainable_parameters(self):
        """Only the UNet trains (VAE and frame embedding are frozen)."""
        return self.unet.parameters()

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    # --- conditioning -----------------------------------------------------------------------------
    def sample_cond_aug(self, batch_size: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise-augmentation level per clip: exp(-3 + 0.5 N) in training, 0.02 in eval (released)."""
        if self.training:
            n = torch.randn(batch_size, generator=generator).to(device)
            return (self.cond_aug_log_mean + self.cond_aug_log_std * n).exp()
        return torch.full((batch_size,), self.cond_aug_eval, device=device)

    def mask_to_latent(self, mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """bool [B, T, 1, H, W] -> [B, T, 1, h, w], +1 hole / -1 known resized to the latent grid."""
        B, T = mask.shape[:2]
        signed = mask.flatten(0, 1).float() * 2 - 1  # [B*T, 1, H, W]
        if self.mask_resize == "bilinear":  # released: bilinear, align_corners False, no antialias
            out = F.interpolate(signed, size=latent_hw, mode="bilinear", align_corners=False)
        elif self.mask_resize == "area":
            out = F.adaptive_avg_pool2d(signed, latent_hw)
        else:  # "max": any hole pixel marks the latent cell
            out = F.adaptive_max_pool2d(signed, latent_hw)
        return out.unflatten(0, (B, T))

    def build_conditioning(
        self,
        left: torch.Tensor,
        warped: torch.Tensor,
        mask: torch.Tensor,
        fps_id: float | torch.Tensor = 5,
        cond_aug: float | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> StereoCondition:
        """left, warped: [B, T, 3, H, W] in [-1, 1]; mask: bool [B, T, 1, H, W] (True = hole, closed).

        The model sees the mask dilated by `mask_dilation` (conditioning channel and attention tokens);
        the metrics keep the undilated one, as the released code."""
        if left.shape != warped.shape or left.ndim != 5 or left.shape[2] != 3:
            raise ValueError(f"left {tuple(left.shape)} and warped {tuple(warped.shape)} must be equal [B, T, 3, H, W]")
        B, T, _, H, W = left.shape
        if mask.shape != (B, T, 1, H, W):
            raise ValueError(f"mask must be [B, T, 1, H, W] = {(B, T, 1, H, W)}, got {tuple(mask.shape)}")
        device = left.device
        latent_hw = (H // self.vae.downscale, W // self.vae.downscale)
        mask = dilate_mask(mask, self.mask_dilation)

        # 1. Noise augmentation in pixel space (not on the mask): [B]
        if cond_aug is None:
            cond_aug = self.sample_cond_aug(B, device, generator)
        cond_aug = torch.as_tensor(cond_aug, dtype=left.dtype, device=device).expand(B)
        sigma = cond_aug.view(B, 1, 1, 1, 1)
        warped_aug = warped + sigma * torch.randn(warped.shape, generator=generator).to(warped)

        with self._autocast(device):
            # 2. Condition latents: posterior mode, unscaled: [B, T, c, h, w] each
            parts = []
            if self.left_condition:
                left_aug = left + sigma * torch.randn(left.shape, generator=generator).to(left)
                parts.append(self.vae.encode_condition(left_aug))
            parts.append(self.vae.encode_condition(warped_aug))
            # 3. Mask on the latent grid: [B, T, 1, h, w]
            parts.append(self.mask_to_latent(mask, latent_hw).to(parts[0]))
            # 4. Cross-attention context, one token per left frame: [B*T, 1, D] -> [B, T, D]
            context = self.embedding(left).reshape(B, T, -1)
        latents = torch.cat([p.float() for p in parts], dim=2)  # [B, T, 2c + 1 | c + 1, h, w]
        time_ids = added_time_ids(fps_id, self.motion_bucket_id, cond_aug, B, device=device)
        hole = mask[:, :, 0].float() if self.attention is not None else None
        return StereoCondition(latents, context.float(), time_ids, hole, self.vae.latent_channels)

    # --- the network and the objective -----------------------------------------------------------
    def _network(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: StereoCondition) -> torch.Tensor:
        """F(c_in * x, c_noise): the UNet's v-prediction. x_in [B, T, c, h, w] -> [B, T, c, h, w]."""
        sample = torch.cat([x_in, cond.latents.to(x_in)], dim=2)  # [B, T, 3c + 1 | 2c + 1, h, w]
        if self.attention is not None:
            # Stays set until the next call, so checkpoint recomputation in backward sees it.
            self.attention.cap_enabled = self.training
            self.attention.set_mask(cond.hole_mask, latent_hw=tuple(sample.shape[-2:]))
        with self._autocast(sample.device):
            out = self.unet(
                sample, c_noise.to(sample.device), encoder_hidden_states=cond.context.to(sample),
                added_time_ids=cond.added_time_ids.to(sample), return_dict=False,
            )[0]
        return out.to(x_in.dtype)

    def predict_one_step(self, cond: StereoCondition) -> torch.Tensor:
        """Paper Eq. 4: the clean latent from a zero latent at sigma_max, [B, T, c, h, w] (scaled space)."""
        return self.denoiser.predict_one_step(cond.latent_shape, cond, device=cond.latents.device)

    def sample(self, cond: StereoCondition, steps: int, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Euler EDM sampling with `steps` steps from `noise` [B, T, c, h, w], or from noise drawn with
        `generator` (never from zeros; see Denoiser.sample)."""
        return self.denoiser.sample(cond.latent_shape, cond, steps, noise=noise, device=cond.latents.device,
                                    generator=generator)

    def generate(self, cond: StereoCondition, steps: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """The right view's latent [B, T, c, h, w]: Eq. 4 for one step, else `steps` Euler steps from noise.

        The one noise source of every caller (evaluation, convert, benchmarks): `generator`, the same
        generator that drew the condition's augmentation in `build_conditioning`, continued; so a clip, a
        seed and a step count give the same output wherever they run."""
        if steps == 1:
            return self.predict_one_step(cond)
        noise = torch.randn(cond.latent_shape, generator=generator).to(cond.latents.device)
        return self.sample(cond, steps, noise=noise)

    # --- VAE ----------------------------------------------------------------------------------------
    def encode_target(self, right: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """Right view [B, T, 3, H, W] -> target latent (sampled posterior x scaling_factor, released)."""
        with self._autocast(right.device):
            return self.vae.encode_target(right, sample=sample, generator=generator).float()

    def decode(self, latent: torch.Tensor, decode_chunk_size: int | None = None) -> torch.Tensor:
        """Scaled latent [B, T, c, h, w] -> video [B, T, 3, H, W]; gradients flow to the latent."""
        with self._autocast(latent.device):
            return self.vae.decode(latent, decode_chunk_size).float()

    @torch.no_grad()
    def predict(self, left, warped, mask, fps_id=5, steps: int = 1, seed: int = 0) -> torch.Tensor:
        """Inference: right view [B, T, 3, H, W] from left, warped and mask (eval cond_aug); all its noise
        (the condition's augmentation, the start of several steps) comes from `seed` (see `generate`)."""
        generator = torch.Generator().manual_seed(seed)
        cond = self.build_conditioning(left, warped, mask, fps_id=fps_id, cond_aug=self.cond_aug_eval, generator=generator)
        return self.decode(self.generate(cond, steps, generator))


def build_refiner(**kwargs) -> StereoRefiner:
    """Build the refiner from the `model:` config section; keys not given take base.yaml's defaults."""
    cfg = with_defaults("model", kwargs)
    pretrained = cfg["pretrained"]
    if pretrained is not None:  # "embedded": the shipped tiny SVD, hash-checked; else a local directory
        pretrained = resolve_pretrained(pretrained)
    pooled_dir = pretrained / POOLED_SUBFOLDER if pretrained is not None else None
    has_pooled = pooled_dir is not None and pooled_dir.is_dir()
    embedding_kind = cfg["embedding"] or ("clip" if pretrained is not None and not has_pooled else "pooled")
    if embedding_kind not in ("clip", "pooled"):
        raise ConfigError(f"model.embedding {embedding_kind!r}: choose from ['clip', 'pooled']")
    vae_kwargs = dict(encode_chunk_size=cfg["encode_chunk_size"], decode_chunk_size=cfg["decode_chunk_size"])

    # 1. UNet (SVD's 8 input channels; widened by StereoRefiner)
    if pretrained is not None:
        if cfg["unet"] or cfg["vae"]:
            raise ConfigError("model.unet / model.vae (tiny config overrides) cannot be combined with model.pretrained")
        components = ["unet"] + ([] if cfg["vae_path"] else ["vae"])
        components += ["image_encoder", "feature_extractor"] if embedding_kind == "clip" else []
        check_svd_directory(pretrained, components=tuple(components))
        unet = unet_lib.load_unet(pretrained, variant=cfg["variant"], torch_dtype=torch.float32)
    else:
        if embedding_kind == "clip":
            raise ConfigError("model.embedding 'clip' needs model.pretrained (an SVD directory with image_encoder/)")
        c = {**TINY_VAE_CONFIG, **(cfg["vae"] or {})}["latent_channels"]  # the UNet follows the VAE
        unet = unet_lib.build_tiny_unet(seed=cfg["seed"], **{"in_channels": 2 * c, "out_channels": c, **(cfg["unet"] or {})})

    # 2. Frozen VAE
    if cfg["vae_path"] is not None:
        vae = FrozenVideoVAE.from_pretrained(cfg["vae_path"], subfolder=None, **vae_kwargs)
    elif pretrained is not None:
        vae = FrozenVideoVAE.from_pretrained(pretrained, variant=cfg["variant"], **vae_kwargs)
    else:
        vae = FrozenVideoVAE.from_config(cfg["vae"], seed=cfg["seed"], **vae_kwargs)

    # 3. Frame embedding
    if embedding_kind == "clip":
        embedding = CLIPFrameEmbedding.from_pretrained(pretrained, variant=cfg["variant"])
    elif has_pooled:
        embedding = PooledFrameEmbedding.from_pretrained(pooled_dir)
    else:
        embedding = PooledFrameEmbedding(dim=unet.config.cross_attention_dim, seed=cfg["seed"])

    settings = [p.name for p in inspect.signature(StereoRefiner).parameters.values() if p.kind == p.KEYWORD_ONLY]
    return StereoRefiner(unet, vae, embedding, **{k: cfg[k] for k in settings})  # the rest built the parts
