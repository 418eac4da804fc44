"""Recipe 1 of the embedded weights: the tiny video VAE (SVD's AutoencoderKLTemporalDecoder at tiny width).

`m2s pretrain vae [--out DIR] [key=value ...]` trains it on monocular clips (pretrain.data: synthetic
training scenes and photograph pans), resumable from `DIR/checkpoint.pt`, and writes

    DIR/vae/            save_pretrained (safetensors), scaling_factor fitted to unit-variance latents
    DIR/metrics.json    held-out reconstruction PSNR per test set (the grid's test clips), losses, timings

Why 2x down and 4 latent channels (models.vae.TINY_VAE_CONFIG): the latent must keep 4 channels (the
UNet's conditioning layout, App. C.1), and the decoder must reconstruct well above the classical-fill
floor of the evaluation sets (about 28 dB synthetic, 24 dB real at 64 px): at 4x down (12x fewer
numbers than pixels) a tiny VAE stops near 21 dB; at 2x (3x fewer) it passes 31 dB.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from lightning_m2s.errors import ModelError
from lightning_m2s.models.vae import TINY_VAE_CONFIG
from lightning_m2s.pretrain import common
from lightning_m2s.pretrain.data import ClipSampler, render_pool

log = logging.getLogger(__name__)

# Every setting of the recipe (the manifest records them). Step times are for 2 quiet CPU cores.
VAE_RECIPE = {
    "steps": 3000,  # main phase on `size` crops
    "lr": 4e-3,  # Adam peak: warm-up, cosine decay to 5%
    "batch_size": 4,  # clips per step (kept in pixels when the crop size changes)
    "frames": 4,  # frames per clip: the temporal decoder's 3-tap time convolutions see interior frames
    "size": 32,  # crop side of the main phase: small crops make steps cheap
    # Then `final_steps` on crops of every side in `final_sizes` at `final_lr`: the VAE does not carry
    # over between sizes by itself (GroupNorm statistics, the mid-block attention).
    "final_steps": 600,
    "final_sizes": [32, 64, 128],
    "final_lr": 5e-4,
    "kl_weight": 1e-6,  # SD-VAE style: a tiny KL keeps the latent bounded without blurring
    "num_synthetic": 48,  # training scenes (both views each)
    "num_pans": 96,  # photograph pans
    "pool_frames": 24,
    "seed": 0,
    "eval_size": 64,  # the embedded default's evaluation clips: 16 frames, 64 px
    "eval_frames": 16,
    "eval_clips": None,  # a cap on the held-out clips (None: every test clip of the embedded default)
    "checkpoint_every": 200,
}
# diffusers initialises the posterior log-variance near 0 (noise of std 1 on means of std ~0.3): the
# decoder would see mostly noise. Start at std e^-4; the KL term and reconstruction move it.
LOGVAR_INIT = -8.0


def _checkpoint(path: Path, vae, opt, settings: dict, sampler, noise: torch.Generator, steps: common.StepLog) -> None:
    """What a VAE recipe's checkpoint holds to resume exactly: weights, optimiser, every RNG, the step log."""
    common.save_checkpoint(path, {"model": vae.state_dict(), "optimizer": opt.state_dict(), "settings": settings,
                                  "sampler_rng": sampler.rng.bit_generator.state, "noise_rng": noise.get_state(),
                                  **steps.state()})


def _resume(state: dict, vae, opt, sampler, noise: torch.Generator, steps: common.StepLog) -> None:
    """Restore what `_checkpoint` saved."""
    vae.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sampler.rng.bit_generator.state = state["sampler_rng"]
    noise.set_state(state["noise_rng"])
    steps.restore(state)


def new_vae(seed: int):
    """A fresh tiny AutoencoderKLTemporalDecoder, initialised to learn fast (see the two comments)."""
    from diffusers import AutoencoderKLTemporalDecoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLTemporalDecoder(**TINY_VAE_CONFIG)
    with torch.no_grad():
        vae.quant_conv.bias[TINY_VAE_CONFIG["latent_channels"]:] += LOGVAR_INIT
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
def reconstruction_psnr(vae, clips: torch.Tensor) -> list[float]:
    """Per-clip PSNR (dB) through the frozen wrapper's path: posterior mode, scaled latents, whole-clip decode."""
    from lightning_m2s.metrics import to_unit, video_psnr
    from lightning_m2s.models.vae import FrozenVideoVAE

    frozen = FrozenVideoVAE(vae)
    return [float(video_psnr(to_unit(frozen.decode(frozen.encode(c[None], scale=True))), to_unit(c[None]))[0]) for c in clips]


def train_vae(out: str | Path, settings: dict | None = None, on_step=None, progress: bool = True) -> dict:
    """Run (or resume, or find finished) the recipe into `out`; returns its metrics.

    on_step(step, loss) runs after every optimiser step; an exception it raises stops the run like a
    kill (the last checkpoint stays)."""
    s = common.resolve_settings(VAE_RECIPE, settings, "vae")
    out = Path(out)
    if (out / "vae" / "config.json").is_file() and (out / "metrics.json").is_file():
        import json

        return json.loads((out / "metrics.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "settings.json", s)
    t_start = time.perf_counter()
    vae = new_vae(s["seed"])
    opt = common.adam(vae.parameters(), s["lr"])
    pool = render_pool(s["num_synthetic"], s["num_pans"], s["pool_frames"], seed=s["seed"])
    sampler = ClipSampler(pool, s["seed"])
    noise = torch.Generator().manual_seed(s["seed"] + 1)
    log.info("pretrain vae: %d clips x %d frames rendered in %.1f s", *pool.shape[:2], time.perf_counter() - t_start)

    ckpt = out / "checkpoint.pt"
    total = s["steps"] + s["final_steps"]
    steps = common.StepLog(total, "pretrain vae", s["checkpoint_every"], progress, on_step)
    state = common.load_checkpoint(ckpt, s)
    if state is not None:
        _resume(state, vae, opt, sampler, noise, steps)
        log.info("pretrain vae: resuming %s at step %d of %d", out, steps.step, total)

    vae.train()
    with steps:
        while steps.step < total:
            t_step = time.perf_counter()
            final = steps.step >= s["steps"]
            size = s["size"]
            if final:
                size = s["final_sizes"][int(sampler.rng.integers(len(s["final_sizes"])))]
            batch = max(1, round(s["batch_size"] * (s["size"] / size) ** 2))
            for group in opt.param_groups:
                group["lr"] = s["final_lr"] if final else common.lr_at(steps.step, s["steps"], s["lr"])
            x = sampler(batch, s["frames"], size).flatten(0, 1)  # [B*T, 3, S, S]
            post = vae.encode(x).latent_dist
            y = vae.decode(post.sample(generator=noise), num_frames=s["frames"]).sample
            err = y - x
            l1 = err.abs().mean()
            # L1 for sharpness plus MSE (what PSNR measures); SD-VAE's KL convention: summed per image
            loss = l1 + err.square().mean() + s["kl_weight"] * post.kl().mean() / x[0].numel()
            common.optimizer_step(loss, opt, vae.parameters(), "vae", steps.step)
            steps.record(l1, t_step, lambda: _checkpoint(ckpt, vae, opt, s, sampler, noise, steps))

    vae.eval()
    with torch.no_grad():  # SD's recipe: scaling_factor = 1 / std of posterior samples of whole frames
        frames = pool[torch.linspace(0, len(pool) - 1, min(32, len(pool))).long(), 0].float().div(127.5).sub(1.0)
        latent_std = float(vae.encode(frames).latent_dist.sample(generator=torch.Generator().manual_seed(s["seed"] + 2)).std())
    vae.register_to_config(scaling_factor=1.0 / latent_std)
    t_eval = time.perf_counter()
    psnr = {name: reconstruction_psnr(vae, clips) for name, clips in heldout_views(s["eval_size"], s["eval_frames"], s["eval_clips"]).items()}
    metrics = {
        "psnr_heldout": {name: float(np.mean(v)) for name, v in psnr.items()},
        "psnr_per_clip": psnr,
        "eval": {"frames": s["eval_frames"], "size": s["eval_size"], "clips": {k: len(v) for k, v in psnr.items()}},
        **steps.summary("train_l1"),
        "eval_s": time.perf_counter() - t_eval,
        "latent_std": latent_std,
        "scaling_factor": float(vae.config.scaling_factor),
        "torch": torch.__version__,
    }
    if not all(np.isfinite(v) for v in metrics["psnr_heldout"].values()):
        raise ModelError(f"pretrain vae: non-finite held-out PSNR {metrics['psnr_heldout']}")
    common.write_json(out / "metrics.json", metrics)
    with common.temporary(out / "vae", directory=True) as tmp:
        vae.save_pretrained(tmp)
    ckpt.unlink(missing_ok=True)
    log.info("pretrain vae done in %.0f s: held-out PSNR %s -> %s", time.perf_counter() - t_start,
             {k: round(v, 2) for k, v in metrics["psnr_heldout"].items()}, out / "vae")
    return metrics


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


@torch.no_grad()
def reconstruction_lpips(vae, clips: torch.Tensor) -> list[float]:
    """Per-clip LPIPS (AlexNet) of the reconstruction, as the metrics compute it (frames in [-1, 1])."""
    from lightning_m2s.metrics import lpips_network
    from lightning_m2s.models.vae import FrozenVideoVAE

    frozen, net = FrozenVideoVAE(vae), lpips_network("alex")
    return [float(net(frozen.decode(frozen.encode(c[None], scale=True))[0].clamp(-1, 1), c).mean()) for c in clips]


def refine_decoder(vae_dir: str | Path, out: str | Path, settings: dict | None = None, on_step=None,
                   progress: bool = True) -> dict:
    """Fine-tune the decoder of the VAE at `vae_dir` (encoder frozen) into `out`/vae; returns its metrics."""
    import json

    from diffusers import AutoencoderKLTemporalDecoder

    from lightning_m2s.metrics import lpips_network

    s = common.resolve_settings(DECODER_RECIPE, settings, "decoder")
    out = Path(out)
    if (out / "vae" / "config.json").is_file() and (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "settings.json", {**s, "vae": str(vae_dir)})
    vae = AutoencoderKLTemporalDecoder.from_pretrained(vae_dir)
    trained = list(vae.decoder.parameters())  # the temporal decoder has no post_quant_conv
    opt = common.adam(trained, s["lr"])
    lpips = lpips_network("alex")
    pool = render_pool(s["num_synthetic"], s["num_pans"], s["pool_frames"], seed=s["seed"])
    sampler = ClipSampler(pool, s["seed"])
    noise = torch.Generator().manual_seed(s["seed"] + 1)
    views = heldout_views(s["eval_size"], s["eval_frames"], s["eval_clips"])
    before = {"psnr": {k: float(np.mean(reconstruction_psnr(vae, v))) for k, v in views.items()},
              "lpips": {k: float(np.mean(reconstruction_lpips(vae, v))) for k, v in views.items()}}
    ckpt = out / "checkpoint.pt"
    steps = common.StepLog(s["steps"], "pretrain decoder", s["checkpoint_every"], progress, on_step)
    state = common.load_checkpoint(ckpt, s)
    if state is not None:
        _resume(state, vae, opt, sampler, noise, steps)
    vae.requires_grad_(False)  # after the evaluations above, which freeze the whole VAE
    for p in trained:
        p.requires_grad_(True)
    vae.train()
    vae.encoder.eval()
    with steps:
        while steps.step < s["steps"]:
            t_step = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = common.lr_at(steps.step, s["steps"], s["lr"])
            x = sampler(s["batch_size"], s["frames"], s["size"]).flatten(0, 1)  # [B*T, 3, S, S]
            with torch.no_grad():
                z = vae.encode(x).latent_dist.sample(generator=noise)
            y = vae.decode(z, num_frames=s["frames"]).sample
            err = y - x
            l1 = err.abs().mean()
            loss = l1 + err.square().mean() + s["lpips_weight"] * lpips(y, x).mean()
            common.optimizer_step(loss, opt, trained, "decoder", steps.step)
            steps.record(loss, t_step, lambda: _checkpoint(ckpt, vae, opt, s, sampler, noise, steps))
    vae.eval()
    psnr = {k: reconstruction_psnr(vae, v) for k, v in views.items()}
    metrics = {
        "psnr_heldout": {k: float(np.mean(v)) for k, v in psnr.items()},
        "lpips_heldout": {k: float(np.mean(reconstruction_lpips(vae, v))) for k, v in views.items()},
        "psnr_per_clip": psnr,
        "before": before,
        "eval": {"frames": s["eval_frames"], "size": s["eval_size"], "clips": {k: len(v) for k, v in psnr.items()}},
        **steps.summary(),
        "scaling_factor": float(vae.config.scaling_factor), "torch": torch.__version__,
    }
    common.write_json(out / "metrics.json", metrics)
    with common.temporary(out / "vae", directory=True) as tmp:
        vae.save_pretrained(tmp)
    ckpt.unlink(missing_ok=True)
    log.info("pretrain decoder done: held-out PSNR %s, LPIPS %s (before %s)", metrics["psnr_heldout"],
             metrics["lpips_heldout"], before)
    return metrics
