"""Recipe 1 of the embedded weights: the tiny video VAE (SVD's AutoencoderKLTemporalDecoder at tiny width).

`m2s pretrain vae [--out DIR] [key=value ...]` trains it on monocular clips (pretrain.data: synthetic
training scenes and photograph pans), resumable from `DIR/checkpoint.pt`, and writes

    DIR/vae/            save_pretrained (safetensors), scaling_factor fitted to unit-variance latents
    DIR/metrics.json    held-out reconstruction PSNR per test set (the grid's test clips), losses, timings

Why 2x down with 12 latent channels (models.vae.TINY_VAE_CONFIG): the round trip has to cost little next
to the floors of the evaluation sets (the row fill's error on the real clips is about 23 dB): with 4 channels
at 2x (3x fewer numbers than pixels) the shipped VAE stopped at 27 dB real, which a model can never pass;
12 channels hold as many numbers as pixel values, and the UNet's grid (so its cost) stays that of 2x.
The mid blocks' attention is switched off (linear time in the frame size: models.vae).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lightning_m2s.errors import ModelError
from lightning_m2s.models.vae import TINY_VAE_CONFIG, mid_attentions, skip_unused_mid_attention, switch_off_mid_attention
from lightning_m2s.pretrain import common
from lightning_m2s.pretrain.data import ClipSampler, render_pool

# Every setting of the recipe (the manifest records them). Step times are for 2 quiet CPU cores.
VAE_RECIPE = {
    "steps": 2400,  # main phase on `size` crops
    "lr": 4e-3,  # Adam peak: warm-up, cosine decay to 5%
    "batch_size": 4,  # clips per step (kept in pixels when the crop size changes)
    "frames": 4,  # frames per clip: the temporal decoder's 3-tap time convolutions see interior frames
    "size": 32,  # crop side of the main phase: small crops make steps cheap
    # Then `final_steps` on crops of every side in `final_sizes` at `final_lr`: the VAE does not carry
    # over between sizes by itself (GroupNorm statistics).
    "final_steps": 400,
    "final_sizes": [32, 64, 128],
    "final_lr": 5e-4,
    "kl_weight": 1e-6,  # SD-VAE style: a tiny KL keeps the latent bounded without blurring
    "num_synthetic": 48,  # training scenes (both views each)
    "num_pans": 96,  # photograph pans
    "pool_frames": 24,
    "seed": 0,
    "latent_channels": TINY_VAE_CONFIG["latent_channels"],
    "eval_size": 64,  # the embedded default's evaluation clips: 16 frames, 64 px
    "eval_frames": 16,
    "eval_clips": None,  # a cap on the held-out clips (None: every test clip of the embedded default)
    "checkpoint_every": 200,
}
# diffusers initialises the posterior log-variance near 0 (noise of std 1 on means of std ~0.3): the
# decoder would see mostly noise. Start at std e^-4; the KL term and reconstruction move it.
LOGVAR_INIT = -8.0


def new_vae(seed: int, latent_channels: int = TINY_VAE_CONFIG["latent_channels"]):
    """A fresh tiny AutoencoderKLTemporalDecoder with its mid-block attention off, initialised to learn
    fast (see the two comments)."""
    from diffusers import AutoencoderKLTemporalDecoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLTemporalDecoder(**{**TINY_VAE_CONFIG, "latent_channels": latent_channels})
    switch_off_mid_attention(vae)
    with torch.no_grad():
        vae.quant_conv.bias[latent_channels:] += LOGVAR_INIT
        # the decoder ends in a 3-tap Conv3d over time on the RGB output; randomly initialised it mixes
        # neighbouring frames' colours and the run spends its first minutes undoing that: start at identity
        w = vae.decoder.time_conv_out.weight  # [3, 3, 3, 1, 1]
        w.zero_()
        w[:, :, 1, 0, 0] = torch.eye(w.shape[0])
        vae.decoder.time_conv_out.bias.zero_()
    return vae


def heldout_views(eval_size: int, eval_frames: int, clips: int | None = None) -> dict[str, torch.Tensor]:
    """The embedded default's test clips (right views), per test set: {"synthetic": [N, T, 3, S, S], ...}."""
    from lightning_m2s.data.datamodule import StereoDataModule
    from lightning_m2s.modules.base import dataset_name

    ds = StereoDataModule(eval_size=eval_size, eval_frames=eval_frames, test_clips=clips).dataset("test")
    out: dict[str, list] = {}
    for i in range(len(ds)):
        clip = ds[i]
        out.setdefault(dataset_name(clip.meta), []).append(clip.right)
    return {k: torch.stack(v) for k, v in out.items()}


@torch.no_grad()
def heldout_metrics(vae, views: dict[str, torch.Tensor]) -> dict:
    """Round-trip PSNR and LPIPS (AlexNet) per test set, per clip and averaged, through the grids' path
    (FrozenVideoVAE: posterior mode, scaled latents, whole-clip decode). Leaves `vae` as it found it."""
    from lightning_m2s.metrics import lpips_network, to_unit, video_psnr
    from lightning_m2s.models.vae import FrozenVideoVAE

    flags, mode = [p.requires_grad for p in vae.parameters()], vae.training
    frozen, net = FrozenVideoVAE(vae), lpips_network("alex")  # FrozenVideoVAE freezes: restored below
    psnr, lpips = {}, {}
    for name, clips in views.items():
        recs = [frozen.decode(frozen.encode(c[None], scale=True)) for c in clips]  # [1, T, 3, H, W] each
        psnr[name] = [float(video_psnr(to_unit(r), to_unit(c[None]))[0]) for r, c in zip(recs, clips)]
        lpips[name] = [float(net(r[0].clamp(-1, 1), c).mean()) for r, c in zip(recs, clips)]
    for p, flag in zip(vae.parameters(), flags):
        p.requires_grad_(flag)
    vae.train(mode)
    T, _, S = next(iter(views.values())).shape[1:4]
    return {"psnr_heldout": {k: float(np.mean(v)) for k, v in psnr.items()},
            "lpips_heldout": {k: float(np.mean(v)) for k, v in lpips.items()},
            "psnr_per_clip": psnr, "eval": {"frames": T, "size": S, "clips": {k: len(v) for k, v in psnr.items()}}}


class VAERecipe(common.Recipe):
    """The VAE from scratch: L1 + MSE + a tiny KL on posterior samples, small crops first, then every size."""

    name, defaults, result = "vae", VAE_RECIPE, "vae"

    @property
    def total_steps(self) -> int:
        return self.s["steps"] + self.s["final_steps"]

    def setup(self, out: Path) -> None:
        s = self.s
        self.vae = new_vae(s["seed"], s["latent_channels"])
        self.trained = [p for p in self.vae.parameters() if p.requires_grad]  # not the switched-off attention
        self.opt = common.adam(self.trained, s["lr"])
        self.pool = render_pool(s["num_synthetic"], s["num_pans"], s["pool_frames"], seed=s["seed"])
        self.sampler = ClipSampler(self.pool, s["seed"])
        self.noise = torch.Generator().manual_seed(s["seed"] + 1)
        self.vae.train()

    def trained_parameters(self) -> list:
        return self.trained

    def lr(self, step: int) -> float:
        s = self.s
        return s["final_lr"] if step >= s["steps"] else common.lr_at(step, s["steps"], s["lr"])

    def loss(self, step: int) -> torch.Tensor:
        s = self.s
        size = s["size"]
        if step >= s["steps"]:  # the final phase: every size
            size = s["final_sizes"][int(self.sampler.rng.integers(len(s["final_sizes"])))]
        batch = max(1, round(s["batch_size"] * (s["size"] / size) ** 2))  # the same pixels per step
        x = self.sampler(batch, s["frames"], size).flatten(0, 1)  # [B*T, 3, S, S]
        post = self.vae.encode(x).latent_dist
        err = self.vae.decode(post.sample(generator=self.noise), num_frames=s["frames"]).sample - x
        # L1 for sharpness plus MSE (what PSNR measures); SD-VAE's KL convention: summed per image
        return err.abs().mean() + err.square().mean() + s["kl_weight"] * post.kl().mean() / x[0].numel()

    def state(self) -> dict:
        return {"model": self.vae.state_dict(), "sampler_rng": self.sampler.rng.bit_generator.state,
                "noise_rng": self.noise.get_state()}

    def load_state(self, state: dict) -> None:
        self.vae.load_state_dict(state["model"])
        self.sampler.rng.bit_generator.state = state["sampler_rng"]
        self.noise.set_state(state["noise_rng"])

    @torch.no_grad()
    def evaluate(self) -> dict:
        s, vae = self.s, self.vae.eval()
        # SD's recipe: scaling_factor = 1 / std of posterior samples of whole frames
        frames = self.pool[torch.linspace(0, len(self.pool) - 1, min(32, len(self.pool))).long(), 0].float().div(127.5).sub(1.0)
        latent_std = float(vae.encode(frames).latent_dist.sample(generator=torch.Generator().manual_seed(s["seed"] + 2)).std())
        vae.register_to_config(scaling_factor=1.0 / latent_std)
        metrics = heldout_metrics(vae, heldout_views(s["eval_size"], s["eval_frames"], s["eval_clips"]))
        if not all(np.isfinite(v) for v in metrics["psnr_heldout"].values()):
            raise ModelError(f"pretrain vae: non-finite held-out PSNR {metrics['psnr_heldout']}")
        return {**metrics, "latent_std": latent_std, "scaling_factor": float(vae.config.scaling_factor)}

    def save(self, out: Path) -> None:
        with common.temporary(out / "vae", directory=True) as tmp:
            self.vae.save_pretrained(tmp)


def train_vae(out: str | Path, settings: dict | None = None, on_step=None, progress: bool = True) -> dict:
    """Run (or resume, or find finished) the VAE recipe into `out`; returns its metrics."""
    return common.run(VAERecipe(settings), out, on_step, progress)


# Phase 2: the decoder alone, with a perceptual loss, on a frozen encoder (SVD's own recipe: its temporal
# decoder was fine-tuned on a frozen encoder). The latent space does not move, so the prior (which only
# ever sees encoder outputs) can be trained at the same time.
DECODER_RECIPE = {
    "steps": 600,
    "lr": 3e-4,  # Adam, warm-up and cosine decay
    "batch_size": 2,
    "frames": 4,
    "size": 64,  # the evaluation size: what the LPIPS of the metrics sees
    "lpips_weight": 1.0,  # LPIPS (AlexNet, the metric's backbone) next to L1 + MSE
    "num_synthetic": 48,
    "num_pans": 96,
    "pool_frames": 24,
    "seed": 1,
    "eval_size": 64,
    "eval_frames": 16,
    "eval_clips": None,
    "checkpoint_every": 100,
}


class DecoderRecipe(common.RecipeOnVAE):
    """The decoder of a trained VAE, with LPIPS beside L1 + MSE, on its frozen encoder."""

    name, defaults, result = "decoder", DECODER_RECIPE, "vae"

    def setup(self, out: Path) -> None:
        from diffusers import AutoencoderKLTemporalDecoder

        from lightning_m2s.metrics import lpips_network

        self.check_vae()
        s = self.s
        self.vae = AutoencoderKLTemporalDecoder.from_pretrained(self.vae_dir)
        off = {id(p) for a in mid_attentions(self.vae) for p in a.parameters()} if skip_unused_mid_attention(self.vae) else set()
        self.trained = [p for p in self.vae.decoder.parameters() if id(p) not in off]  # the temporal decoder: no post_quant_conv
        self.vae.requires_grad_(False)
        for p in self.trained:
            p.requires_grad_(True)
        self.opt = common.adam(self.trained, s["lr"])
        self.lpips = lpips_network("alex")
        self.sampler = ClipSampler(render_pool(s["num_synthetic"], s["num_pans"], s["pool_frames"], seed=s["seed"]), s["seed"])
        self.noise = torch.Generator().manual_seed(s["seed"] + 1)
        self.views = heldout_views(s["eval_size"], s["eval_frames"], s["eval_clips"])
        self.vae.train()
        self.vae.encoder.eval()

    def trained_parameters(self) -> list:
        return self.trained

    def start(self) -> dict:
        m = heldout_metrics(self.vae, self.views)
        self.vae.train()
        self.vae.encoder.eval()
        return {"before": {"psnr": m["psnr_heldout"], "lpips": m["lpips_heldout"]}}

    def loss(self, step: int) -> torch.Tensor:
        s = self.s
        x = self.sampler(s["batch_size"], s["frames"], s["size"]).flatten(0, 1)  # [B*T, 3, S, S]
        with torch.no_grad():
            z = self.vae.encode(x).latent_dist.sample(generator=self.noise)
        y = self.vae.decode(z, num_frames=s["frames"]).sample
        err = y - x
        return err.abs().mean() + err.square().mean() + s["lpips_weight"] * self.lpips(y, x).mean()

    state = VAERecipe.state
    load_state = VAERecipe.load_state

    def evaluate(self) -> dict:
        return {**heldout_metrics(self.vae.eval(), self.views), "scaling_factor": float(self.vae.config.scaling_factor)}

    save = VAERecipe.save


def refine_decoder(vae_dir: str | Path, out: str | Path, settings: dict | None = None, on_step=None,
                   progress: bool = True) -> dict:
    """Fine-tune the decoder of the VAE at `vae_dir` (encoder frozen) into `out`/vae; returns its metrics."""
    return common.run(DecoderRecipe(vae_dir, settings), out, on_step, progress)
