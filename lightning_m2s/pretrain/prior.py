"""Recipe 2 of the embedded weights: the tiny SVD UNet pretrained with SVD's image-to-video objective.

`m2s pretrain prior --vae DIR/vae [--out DIR] [key=value ...]` trains the 8-channel UNet
(models.unet.TINY_UNET_CONFIG) as SVD was trained, on monocular clips (pretrain.data):

1. target z = E(video) x scaling_factor: [B, T, 4, h, w] (posterior sample, as the stereo fine-tune);
2. the first frame, noise-augmented in pixel space by cond_aug = exp(-3 + 0.5 N) (SVD's range), encoded
   to its unscaled posterior mode and repeated over the T frames: the image latent [B, T, 4, h, w];
3. EDM training: sigma ~ exp(p_mean + p_std N), x = z + sigma n, the v-prediction UNet sees
   [c_in x | image latent] (8 channels), c_noise = ln(sigma) / 4, the first frame's embedding (the
   frozen pooled stand-in for CLIP) as its cross-attention context, and added_time_ids
   [fps, motion bucket 127, cond_aug]; loss (s^2 + 1) / s^2 ||D(x, sigma) - z||^2 (objective.Denoiser).
   A share of the clips (`sigma_max_share`) is drawn at sigma_max instead: the regime of M2SVid's
   one-step prediction (Eq. 4), which the log-normal all but never reaches (ln 700 is 3.5 std above
   p_mean), where the UNet sees nothing but its conditioning and must copy and move the first frame.

Resumable from `DIR/checkpoint.pt`; writes DIR/unet/ (save_pretrained) and DIR/metrics.json (the
held-out denoising loss at fixed sigmas, before and after, and timings).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from lightning_m2s.errors import ModelError
from lightning_m2s.models.embedding import PooledFrameEmbedding, added_time_ids
from lightning_m2s.models.unet import build_tiny_unet
from lightning_m2s.models.vae import FrozenVideoVAE
from lightning_m2s.objective import Denoiser, sample_sigma
from lightning_m2s.pretrain import common
from lightning_m2s.pretrain.data import HELDOUT_SCENES, ClipSampler, render_pool

log = logging.getLogger(__name__)

PRIOR_RECIPE = {
    "steps": 2500,  # about 1.1 s each on 2 quiet cores
    "lr": 5e-4,  # AdamW peak: warm-up, cosine decay to 5%
    "weight_decay": 0.01,
    "batch_size": 2,
    # clip shapes (frames, side) drawn uniformly per step: the stereo fine-tune's buckets
    "buckets": [[4, 64], [8, 48], [12, 32]],
    "p_mean": 1.0,  # EDM log-normal sigma (SVD / Hi3D's fine-tuning range)
    "p_std": 1.6,
    "sigma_max_share": 0.5,  # clips at sigma_max (see the module docstring)
    "cond_aug_log_mean": -3.0,  # SVD's noise augmentation of the conditioning frame
    "cond_aug_log_std": 0.5,
    "motion_bucket_id": 127,
    "fps": [5, 30],  # the clips' sampling rates (pool strides 1-6 of 30 fps)
    "num_synthetic": 64,
    "num_pans": 128,
    "pool_frames": 25,
    "seed": 0,
    "embedding_seed": 0,  # the frozen frame embedding's projection (shipped with the weights)
    "eval_clips": 8,  # held-out clips (another pool seed) for the denoising-loss report
    "eval_sigmas": [0.1, 1.0, 10.0, 700.0],
    "checkpoint_every": 100,
}


class ImageToVideoPrior(torch.nn.Module):
    """The UNet with SVD's image-to-video conditioning, wrapped by the EDM denoiser."""

    def __init__(self, unet, vae: FrozenVideoVAE, embedding: PooledFrameEmbedding, settings: dict):
        super().__init__()
        self.unet, self.vae, self.embedding, self.s = unet, vae, embedding, settings
        self.denoiser = Denoiser(self._network)

    def _network(self, x_in, c_noise, cond):
        image_latent, context, time_ids = cond
        sample = torch.cat([x_in, image_latent], dim=2)  # [B, T, 8, h, w]
        return self.unet(sample, c_noise, encoder_hidden_states=context, added_time_ids=time_ids, return_dict=False)[0]

    def conditioning(self, video: torch.Tensor, fps: torch.Tensor, generator: torch.Generator):
        """video [B, T, 3, H, W] in [-1, 1] -> (image latent [B, T, 4, h, w], context [B, 1, D], time ids [B, 3])."""
        B, T = video.shape[:2]
        s = self.s
        cond_aug = (s["cond_aug_log_mean"] + s["cond_aug_log_std"] * torch.randn(B, generator=generator)).exp()
        first = video[:, :1]  # [B, 1, 3, H, W]
        noisy = first + cond_aug.view(B, 1, 1, 1, 1) * torch.randn(first.shape, generator=generator)
        image_latent = self.vae.encode_condition(noisy).expand(-1, T, -1, -1, -1)  # [B, T, 4, h, w]
        context = self.embedding(first)  # [B, 1, D]
        time_ids = added_time_ids(fps, s["motion_bucket_id"], cond_aug, B)
        return image_latent, context, time_ids

    def training_sigma(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """[B] log-normal sigmas, `sigma_max_share` of them replaced by sigma_max."""
        sigma = sample_sigma(batch_size, self.s["p_mean"], self.s["p_std"], generator=generator)
        at_max = torch.rand(batch_size, generator=generator) < self.s["sigma_max_share"]
        return torch.where(at_max, torch.full_like(sigma, self.denoiser.sigma_max), sigma)

    def loss(self, video, fps, generator, sigma=None):
        """SVD's EDM loss per clip [B]; sigma [B] fixed, or drawn log-normal."""
        B = video.shape[0]
        target = self.vae.encode_target(video, generator=generator)  # [B, T, 4, h, w]
        cond = self.conditioning(video, fps, generator)
        if sigma is None:
            sigma = self.training_sigma(B, generator)
        noise = torch.randn(target.shape, generator=generator)
        return self.denoiser.diffusion_loss(target, cond, sigma, noise=noise)


def _batch(sampler: ClipSampler, s: dict, generator_np: np.random.Generator):
    frames, side = s["buckets"][int(generator_np.integers(len(s["buckets"])))]
    crop = int(generator_np.integers(side // 2, 128 // 2 + 1)) * 2  # a crop of side..128 px, resized to side
    video = sampler(s["batch_size"], frames, crop, side)
    fps = torch.from_numpy(generator_np.integers(s["fps"][0], s["fps"][1] + 1, s["batch_size"])).float()
    return video, fps


@torch.no_grad()
def heldout_loss(prior: ImageToVideoPrior, clips: torch.Tensor, sigmas: list[float]) -> dict[str, float]:
    """Mean denoising loss of 16-frame 64 px held-out clips at each fixed sigma (seeded noise)."""
    prior.eval()
    out = {}
    for sigma in sigmas:
        g = torch.Generator().manual_seed(1234)
        losses = [float(prior.loss(c[None], torch.tensor([5.0]), g, sigma=torch.tensor([sigma]))[0]) for c in clips]
        out[f"sigma_{sigma:g}"] = float(np.mean(losses))
    prior.train()
    return out


def train_prior(vae_dir: str | Path, out: str | Path, settings: dict | None = None, on_step=None, progress: bool = True) -> dict:
    """Run (or resume, or find finished) the recipe into `out` with the trained VAE at `vae_dir`."""
    s = common.resolve_settings(PRIOR_RECIPE, settings, "prior")
    out = Path(out)
    if (out / "unet" / "config.json").is_file() and (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    if not (Path(vae_dir) / "config.json").is_file():
        raise ModelError(f"pretrain prior: {vae_dir} is not a trained VAE (no config.json); run `m2s pretrain vae` first")
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "settings.json", {**s, "vae": str(vae_dir)})
    t_start = time.perf_counter()
    vae = FrozenVideoVAE.from_pretrained(vae_dir, subfolder=None)
    unet = build_tiny_unet(seed=s["seed"])
    embedding = PooledFrameEmbedding(dim=unet.config.cross_attention_dim, seed=s["embedding_seed"])
    prior = ImageToVideoPrior(unet, vae, embedding, s)
    opt = torch.optim.AdamW(unet.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    pool = render_pool(s["num_synthetic"], s["num_pans"], s["pool_frames"], seed=s["seed"])
    sampler = ClipSampler(pool, s["seed"])
    rng = np.random.default_rng([s["seed"], 13])
    noise = torch.Generator().manual_seed(s["seed"] + 1)
    heldout = ClipSampler(render_pool(s["eval_clips"] // 2, s["eval_clips"] - s["eval_clips"] // 2, 16,
                                      seed=s["seed"] + 1000, scene_seed=HELDOUT_SCENES), s["seed"] + 1000)
    heldout_clips = torch.cat([heldout(1, 16, 128, 64) for _ in range(s["eval_clips"])])
    log.info("pretrain prior: %d clips rendered in %.1f s", len(pool), time.perf_counter() - t_start)

    ckpt = out / "checkpoint.pt"
    steps, before = common.StepLog(s["steps"], "pretrain prior", s["checkpoint_every"], progress, on_step), None
    state = common.load_checkpoint(ckpt, s)
    if state is not None:
        unet.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sampler.rng.bit_generator.state = state["sampler_rng"]
        rng.bit_generator.state = state["batch_rng"]
        noise.set_state(state["noise_rng"])
        steps.restore(state)
        before = state["before"]
        log.info("pretrain prior: resuming %s at step %d of %d", out, steps.step, s["steps"])
    if before is None:
        before = heldout_loss(prior, heldout_clips, s["eval_sigmas"])

    def checkpoint():
        common.save_checkpoint(ckpt, {
            "model": unet.state_dict(), "optimizer": opt.state_dict(), "settings": s, "before": before,
            "sampler_rng": sampler.rng.bit_generator.state, "batch_rng": rng.bit_generator.state,
            "noise_rng": noise.get_state(), **steps.state(),
        })

    prior.train()
    vae.eval()
    with steps:
        while steps.step < s["steps"]:
            t_step = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = common.lr_at(steps.step, s["steps"], s["lr"])
            video, fps = _batch(sampler, s, rng)
            loss = prior.loss(video, fps, noise).mean()
            common.optimizer_step(loss, opt, unet.parameters(), "prior", steps.step)
            steps.record(loss, t_step, checkpoint)

    t_eval = time.perf_counter()
    after = heldout_loss(prior, heldout_clips, s["eval_sigmas"])
    metrics = {
        "heldout_loss_init": before,
        "heldout_loss": after,
        "heldout_clips": s["eval_clips"],
        **steps.summary(),
        "eval_s": time.perf_counter() - t_eval,
        "params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "torch": torch.__version__,
    }
    common.write_json(out / "metrics.json", metrics)
    with common.temporary(out / "unet", directory=True) as tmp:
        unet.save_pretrained(tmp)
    with common.temporary(out / "frame_embedding", directory=True) as tmp:
        embedding.save_pretrained(tmp)
    ckpt.unlink(missing_ok=True)
    log.info("pretrain prior done in %.0f s: held-out loss %s (init %s)", time.perf_counter() - t_start, after, before)
    return metrics
