"""Recipe 2 of the embedded weights: the tiny SVD UNet pretrained with SVD's objective, following per-frame conditions.

`m2s pretrain prior --vae DIR/vae [--out DIR] [key=value ...]` trains the 2c-channel UNet
(models.unet.TINY_UNET_CONFIG, c = the VAE's latent channels) on monocular clips (pretrain.data):

1. target z = E(video) x scaling_factor: [B, T, c, h, w] (posterior sample, as the stereo fine-tune);
2. the condition, per clip: `per_frame_share` of the clips are conditioned on the whole clip degraded
   as a depth warp degrades a view (pretrain.degrade: holes black and closed, resampling blur, flying
   pixels, disparity scale errors), the rest on SVD's image-to-video condition (the first frame repeated
   over the T frames). Noise-augmented in pixel space by cond_aug = exp(-3 + 0.5 N) (SVD's range, as the
   stereo fine-tune augments its condition videos), encoded to the unscaled posterior mode: [B, T, c, h, w];
3. EDM training: sigma ~ exp(p_mean + p_std N), x = z + sigma n, the v-prediction UNet sees
   [c_in x | condition latent] (2c channels), c_noise = ln(sigma) / 4, the first frame's embedding (the
   frozen pooled stand-in for CLIP) as its cross-attention context, and added_time_ids
   [fps, motion bucket 127, cond_aug]; loss (s^2 + 1) / s^2 ||D(x, sigma) - z||^2 (objective.Denoiser).
   A share of the clips (`sigma_max_share`) is drawn at sigma_max instead: the regime of M2SVid's
   one-step prediction (Eq. 4), which the log-normal all but never reaches (ln 700 is 3.5 std above
   p_mean), where the UNet sees nothing but its conditioning and must copy what is known and fill the rest.

So the prior brings to the stereo fine-tune what img2vid-xt brings at scale: it already copies a
per-frame condition where it is known and fills its holes. Never a second view, never a test clip.

Resumable from `DIR/checkpoint.pt`; writes DIR/unet/ (save_pretrained), DIR/frame_embedding/ and
DIR/metrics.json: the held-out denoising loss at fixed sigmas (before and after) and the one-step report
on held-out degraded clips (known pixels against the VAE's round trip, holes against classical fill).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lightning_m2s.models.embedding import PooledFrameEmbedding, added_time_ids
from lightning_m2s.models.unet import build_tiny_unet
from lightning_m2s.models.vae import FrozenVideoVAE
from lightning_m2s.objective import Denoiser, sample_sigma
from lightning_m2s.pretrain import common
from lightning_m2s.pretrain.data import HELDOUT_SCENES, ClipSampler, render_pool
from lightning_m2s.pretrain.degrade import warp_degrade

PRIOR_RECIPE = {
    "steps": 2500,  # about 1.2 s each on 2 quiet cores
    "lr": 5e-4,  # AdamW peak: warm-up, cosine decay to 5%
    "weight_decay": 0.01,
    "batch_size": 2,
    # clip shapes (frames, side) drawn uniformly per step: the stereo fine-tune's buckets
    "buckets": [[4, 64], [8, 48], [12, 32]],
    "p_mean": 1.0,  # EDM log-normal sigma (SVD / Hi3D's fine-tuning range)
    "p_std": 1.6,
    "sigma_max_share": 0.5,  # clips at sigma_max (see the module docstring)
    "per_frame_share": 0.75,  # clips conditioned on their own degraded frames; the rest image-to-video
    "close_kernel": 11,  # the pipeline's hole closing (App. C.1)
    "cond_aug_log_mean": -3.0,  # SVD's noise augmentation of the condition
    "cond_aug_log_std": 0.5,
    "motion_bucket_id": 127,
    "fps": [5, 30],  # the clips' sampling rates (pool strides 1-6 of 30 fps)
    "num_synthetic": 64,
    "num_pans": 128,
    "pool_frames": 25,
    "seed": 0,
    "embedding_seed": 0,  # the frozen frame embedding's projection (shipped with the weights)
    "eval_clips": 8,  # held-out clips (another pool seed) for the report
    "eval_sigmas": [0.1, 1.0, 10.0, 700.0],
    "checkpoint_every": 100,
}


class ImageToVideoPrior(torch.nn.Module):
    """The UNet with SVD's conditioning slot (image-to-video or per-frame), wrapped by the EDM denoiser."""

    def __init__(self, unet, vae: FrozenVideoVAE, embedding: PooledFrameEmbedding, settings: dict):
        super().__init__()
        self.unet, self.vae, self.embedding, self.s = unet, vae, embedding, settings
        self.denoiser = Denoiser(self._network)

    def _network(self, x_in, c_noise, cond):
        latent, context, time_ids = cond
        sample = torch.cat([x_in, latent], dim=2)  # [B, T, 2c, h, w]
        return self.unet(sample, c_noise, encoder_hidden_states=context, added_time_ids=time_ids, return_dict=False)[0]

    def condition_video(self, video: torch.Tensor, per_frame: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """video [B, T, 3, H, W] -> the condition video: each clip warp-degraded where per_frame [B] is True,
        else its first frame repeated (image-to-video)."""
        return torch.stack([warp_degrade(v, rng, self.s["close_kernel"])[0] if pf else v[:1].expand_as(v)
                            for v, pf in zip(video, per_frame.tolist())])

    def conditioning(self, cond_video: torch.Tensor, first: torch.Tensor, fps: torch.Tensor, generator: torch.Generator,
                     cond_aug: torch.Tensor | None = None):
        """-> (condition latent [B, T, c, h, w], context [B, 1, D] of the clean first frame [B, 1, 3, H, W], time ids [B, 3])."""
        B, s = cond_video.shape[0], self.s
        if cond_aug is None:
            cond_aug = (s["cond_aug_log_mean"] + s["cond_aug_log_std"] * torch.randn(B, generator=generator)).exp()
        # one noise draw per clip broadcast over time where the condition is one repeated frame (SVD)
        noise = torch.randn(cond_video[:, :1].shape, generator=generator).expand_as(cond_video).clone()
        varies = (cond_video != cond_video[:, :1]).flatten(1).any(1)  # [B] per-frame conditions
        if varies.any():
            noise[varies] = torch.randn(noise[varies].shape, generator=generator)
        latent = self.vae.encode_condition(cond_video + cond_aug.view(B, 1, 1, 1, 1) * noise)  # [B, T, c, h, w]
        time_ids = added_time_ids(fps, s["motion_bucket_id"], cond_aug, B)
        return latent, self.embedding(first), time_ids

    def training_sigma(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """[B] log-normal sigmas, `sigma_max_share` of them replaced by sigma_max."""
        sigma = sample_sigma(batch_size, self.s["p_mean"], self.s["p_std"], generator=generator)
        at_max = torch.rand(batch_size, generator=generator) < self.s["sigma_max_share"]
        return torch.where(at_max, torch.full_like(sigma, self.denoiser.sigma_max), sigma)

    def loss(self, video, cond_video, fps, generator, sigma=None):
        """SVD's EDM loss per clip [B] of the clean `video` given `cond_video`; sigma [B] fixed, or drawn."""
        B = video.shape[0]
        target = self.vae.encode_target(video, generator=generator)  # [B, T, c, h, w]
        cond = self.conditioning(cond_video, video[:, :1], fps, generator)
        if sigma is None:
            sigma = self.training_sigma(B, generator)
        noise = torch.randn(target.shape, generator=generator)
        return self.denoiser.diffusion_loss(target, cond, sigma, noise=noise)


def heldout_set(s: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The report's clips: 16-frame 64 px monocular clips of scenes and pans no training draw sees, and their
    warp degradation: (clean [N, 16, 3, 64, 64], degraded [N, ...], closed hole mask bool [N, 16, 1, 64, 64])."""
    n = s["eval_clips"]
    sampler = ClipSampler(render_pool(n // 2, n - n // 2, 16, seed=s["seed"] + 1000, scene_seed=HELDOUT_SCENES), s["seed"] + 1000)
    clean = torch.cat([sampler(1, 16, 128, 64) for _ in range(n)])
    rng = np.random.default_rng([s["seed"], 1000])
    degraded, masks = zip(*(warp_degrade(c, rng, s["close_kernel"]) for c in clean))
    return clean, torch.stack(degraded), torch.stack(masks)[:, :, None]


@torch.no_grad()
def heldout_report(prior: ImageToVideoPrior, clean: torch.Tensor, degraded: torch.Tensor, mask: torch.Tensor) -> dict:
    """The held-out denoising loss at fixed sigmas (per-frame conditions) and, at sigma_max in one step
    (Eq. 4), PSNR (dB) where the condition is known (against the VAE's own round trip) and in its holes
    (against classical fill), as the metrics compute them (App. D.2: the other pixels white)."""
    from lightning_m2s.metrics import restrict, to_unit, video_psnr
    from lightning_m2s.modules.baselines import background_side_fill

    prior.eval()
    fps = torch.full((len(clean),), 5.0)
    losses = {}
    for sigma in prior.s["eval_sigmas"]:
        g = torch.Generator().manual_seed(1234)
        losses[f"sigma_{sigma:g}"] = float(prior.loss(clean, degraded, fps, g, sigma=torch.full((len(clean),), sigma)).mean())
    cond = prior.conditioning(degraded, clean[:, :1], fps, torch.Generator().manual_seed(0), cond_aug=torch.full((len(clean),), 0.02))
    target = prior.vae.encode_target(clean, sample=False)
    outputs = {"one_step": prior.vae.decode(prior.denoiser.predict_one_step(target.shape, cond)),
               "vae_round_trip": prior.vae.decode(target), "classical_fill": background_side_fill(degraded, mask)}
    report = {}
    for name, video in outputs.items():
        for region in ("outside", "inside", "full"):
            pred, true = restrict(to_unit(video), to_unit(clean), mask.expand_as(clean), region)
            report[f"{name}/psnr_{region}"] = float(video_psnr(pred, true).mean())
    prior.train()
    return {"heldout_loss": losses, "one_step": report, "hole_fraction": float(mask.float().mean())}


class PriorRecipe(common.RecipeOnVAE):
    name, defaults, result = "prior", PRIOR_RECIPE, "unet"

    def setup(self, out: Path) -> None:
        self.check_vae()
        s = self.s
        vae = FrozenVideoVAE.from_pretrained(self.vae_dir, subfolder=None)
        c = vae.latent_channels
        self.unet = build_tiny_unet(seed=s["seed"], in_channels=2 * c, out_channels=c)
        self.embedding = PooledFrameEmbedding(dim=self.unet.config.cross_attention_dim, seed=s["embedding_seed"])
        self.prior = ImageToVideoPrior(self.unet, vae, self.embedding, s).train()
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
        self.sampler = ClipSampler(render_pool(s["num_synthetic"], s["num_pans"], s["pool_frames"], seed=s["seed"]), s["seed"])
        self.rng = np.random.default_rng([s["seed"], 13])
        self.noise = torch.Generator().manual_seed(s["seed"] + 1)
        self.heldout = heldout_set(s)

    def trained_parameters(self) -> list:
        return list(self.unet.parameters())

    def loss(self, step: int) -> torch.Tensor:
        s, rng = self.s, self.rng
        frames, side = s["buckets"][int(rng.integers(len(s["buckets"])))]
        crop = int(rng.integers(side // 2, 128 // 2 + 1)) * 2  # a crop of side..128 px, resized to side
        video = self.sampler(s["batch_size"], frames, crop, side)
        fps = torch.from_numpy(rng.integers(s["fps"][0], s["fps"][1] + 1, s["batch_size"])).float()
        per_frame = torch.from_numpy(rng.random(s["batch_size"]) < s["per_frame_share"])
        cond_video = self.prior.condition_video(video, per_frame, rng)
        return self.prior.loss(video, cond_video, fps, self.noise).mean()

    def state(self) -> dict:
        return {"model": self.unet.state_dict(), "sampler_rng": self.sampler.rng.bit_generator.state,
                "batch_rng": self.rng.bit_generator.state, "noise_rng": self.noise.get_state()}

    def load_state(self, state: dict) -> None:
        self.unet.load_state_dict(state["model"])
        self.sampler.rng.bit_generator.state = state["sampler_rng"]
        self.rng.bit_generator.state = state["batch_rng"]
        self.noise.set_state(state["noise_rng"])

    def start(self) -> dict:
        report = heldout_report(self.prior, *self.heldout)
        return {"heldout_loss_init": report["heldout_loss"], "one_step_init": report["one_step"]}

    def evaluate(self) -> dict:
        return {**heldout_report(self.prior, *self.heldout), "heldout_clips": self.s["eval_clips"],
                "params_m": sum(p.numel() for p in self.unet.parameters()) / 1e6}

    def save(self, out: Path) -> None:
        with common.temporary(out / "frame_embedding", directory=True) as tmp:
            self.embedding.save_pretrained(tmp)
        with common.temporary(out / "unet", directory=True) as tmp:
            self.unet.save_pretrained(tmp)


def train_prior(vae_dir: str | Path, out: str | Path, settings: dict | None = None, on_step=None, progress: bool = True) -> dict:
    """Run (or resume, or find finished) the recipe into `out` with the trained VAE at `vae_dir`."""
    return common.run(PriorRecipe(vae_dir, settings), out, on_step, progress)
