"""The embedded default's tiny video VAE: trained once on the bundled synthetic scenes, cached on disk.

The frozen decoder of the embedded default must be a real autoencoder (a random one makes the
end-to-end loss and every decoded metric meaningless). This stage trains the tiny
``AutoencoderKLTemporalDecoder`` (``models.vae.TINY_VAE_CONFIG``) on crops of the synthetic source's
TRAINING scenes (seed 0; both views, the disparity unused) and caches it under a key of everything
that changes it. The real Middlebury pair (the real-content test set) only serves the held-out report.

Cache layout (root: the stage's ``cache_dir``, else ``$M2S_CACHE_DIR``, else ``~/.cache/lightning_m2s``)::

    <root>/vae/tiny-<key>/
        lock             fcntl lock held while training (concurrent sweep workers and DDP ranks wait)
        stage.json       what the key hashes (for people)
        checkpoint.pt    resumable state every `checkpoint_every` steps (model, optimiser, step, RNGs)
        metrics.json     held-out reconstruction PSNR, losses, timings
        model/           the trained VAE: FrozenVideoVAE.from_pretrained(model, subfolder=None)

Files are written under temporary names and renamed into place, ``model/`` last: model/ plus
metrics.json means "finished". A killed stage resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lightning_m2s.errors import ConfigError, ModelError
from lightning_m2s.models.vae import TINY_VAE_CONFIG

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the procedure or the layout changes: every cached VAE is rebuilt
CACHE_ENV = "M2S_CACHE_DIR"  # the same root as lightning_m2s.lpips_weights

# The `vae_stage.settings` section. Measured on 2 quiet CPU cores (README, "tiny VAE stage").
VAE_STAGE_DEFAULTS: dict = {
    "enabled": True,  # False: runs build the tiny VAE with random weights (plumbing tests only)
    "steps": 1200,  # 0.14 s each on 2 quiet cores (0.7-1.3 s when shared): 3-6 minutes
    "lr": 5e-3,  # Adam peak (warm-up, cosine decay to 5%); after 150 steps 19.3 dB against 17.4 for 1e-2
    "batch_size": 4,  # clips per step
    "frames": 4,  # frames per clip: the temporal decoder's 3-tap time convs see interior frames
    "size": 32,  # crop side of the main phase: small crops make steps cheap
    # Then `final_steps` steps on crops of every side in `final_sizes` (one drawn per step, the batch
    # shrunk to keep about batch_size x size^2 pixels per frame), at a constant `final_lr`: the VAE does
    # not carry over between sizes (GroupNorm statistics, mid-block attention). Trained on 32 px crops
    # only it reconstructs 32 px tiles at 24 dB but whole 128 px frames of the same content at 15 dB;
    # with these 300 steps held-out 128 px clips reach 20.9 dB (synthetic) instead of 18.5 dB.
    "final_steps": 300,
    "final_sizes": [32, 64, 128],
    "final_lr": 1e-3,
    "kl_weight": 1e-6,  # SD-VAE style: a tiny KL keeps the latent bounded without blurring
    "seed": 0,  # initialisation, crop sampling, posterior noise
    "num_train_videos": 32,  # training scenes (synthetic seed 0, as the UNet's); ~5 s to render
    "cache_dir": None,  # None: $M2S_CACHE_DIR or ~/.cache/lightning_m2s
    "log_every": 100,
    "checkpoint_every": 200,
    "eval_clips": 4,  # held-out clips per source (synthetic seed 10000; the real pair)
    "eval_frames": 16,  # the paper's evaluation length, decoded at once
    "eval_size": 128,  # the embedded default's eval_size
    "fit_scaling_factor": True,  # scaling_factor = 1 / latent std (SD's recipe: unit-variance latents for EDM)
    "progress": True,  # tqdm bar
}
NOT_IN_KEY = ("enabled", "cache_dir", "log_every", "checkpoint_every", "progress")  # don't change the weights
_MAY_BE_ZERO = ("seed", "kl_weight", "final_steps")

# Training crops: random `frames`-frame windows of POOL_FRAMES frames rendered per view and scene
# (random stride: 5-30 fps), random `size` crops of the 128 px renders (the embedded default's scale).
# Held-out: the datamodule's evaluation protocol (16 frames at 5 fps from frame 0, centre crop).
DATA = {
    "train": {"name": "synthetic", "size": [128, 128], "num_frames": 150, "fps": 30, "seed": 0},
    "pool_frames": 24,
    "strides": [1, 6],
    "heldout_synthetic": {"name": "synthetic", "size": [128, 128], "num_frames": 150, "fps": 30, "seed": 10_000},
    "heldout_real": {"name": "image_pairs", "seed": 2},
    "eval_fps": 5.0,
}
WARMUP_FRACTION, MIN_LR_FRACTION, GRAD_CLIP = 0.05, 0.05, 1.0
# diffusers initialises the posterior log-variance near 0 (noise of std 1 on means of std ~0.3): the
# decoder would see mostly noise. Start at std e^-4; the KL term and reconstruction move it.
LOGVAR_INIT = -8.0


# --- config, key, cache folder --------------------------------------------------------------------


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$M2S_CACHE_DIR``, else ``~/.cache/lightning_m2s`` (lightning_m2s.lpips_weights' rule)."""
    return Path(root or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lightning_m2s").expanduser()


def resolve_stage(stage: dict | None) -> dict:
    """VAE_STAGE_DEFAULTS updated by ``stage`` (flat, or base.yaml's {enabled, settings: {...}}), validated."""
    stage, prefix = dict(stage or {}), "vae_stage"
    if "settings" in stage:
        settings = stage.pop("settings") or {}
        if not isinstance(settings, dict):
            raise ConfigError(f"vae_stage.settings must be a mapping, got {type(settings).__name__}")
        if set(stage) - {"enabled"}:
            raise ConfigError(f"unknown key(s) {sorted(set(stage) - {'enabled'})} in vae_stage; put settings under vae_stage.settings")
        if stage.get("enabled", settings.get("enabled")) != settings.get("enabled", stage.get("enabled")):
            raise ConfigError("vae_stage.enabled and vae_stage.settings.enabled disagree")
        stage, prefix = {**settings, **stage}, "vae_stage.settings"
    unknown = sorted(set(stage) - set(VAE_STAGE_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown key(s) {[f'{prefix}.{k}' for k in unknown]}; allowed: {sorted(VAE_STAGE_DEFAULTS)}")
    s = {**VAE_STAGE_DEFAULTS, **stage}
    for k, default in VAE_STAGE_DEFAULTS.items():
        v = s[k]
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise ConfigError(f"vae_stage.{k} must be true or false, got {v!r}")
        elif isinstance(default, (int, float)):
            number = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            if not number or isinstance(default, int) and not float(v).is_integer():
                raise ConfigError(f"vae_stage.{k} must be {'an integer' if isinstance(default, int) else 'a number'}, got {v!r}")
            s[k] = type(default)(v)
            if s[k] < 0 or s[k] == 0 and k not in _MAY_BE_ZERO:
                raise ConfigError(f"vae_stage.{k} must be {'>= 0' if k in _MAY_BE_ZERO else '> 0'}, got {v!r}")
    sizes = s["final_sizes"]
    if not isinstance(sizes, (list, tuple)) or not sizes or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in sizes):
        raise ConfigError(f"vae_stage.final_sizes must be a list of positive integers, got {sizes!r}")
    s["final_sizes"] = sorted(int(v) for v in sizes)
    for v in (s["size"], *s["final_sizes"], s["eval_size"]):
        if v % 8:
            raise ConfigError(f"vae_stage: size, final_sizes and eval_size must be multiples of 8 (covers any tiny "
                              f"VAE up to 8x down), got {v}")
    if max(s["size"], *s["final_sizes"]) > min(DATA["train"]["size"]) or s["frames"] > DATA["pool_frames"]:
        raise ConfigError(f"vae_stage: crop sides <= {min(DATA['train']['size'])} and frames <= {DATA['pool_frames']} "
                          f"(the training renders), got {s['size']}, {s['final_sizes']}, {s['frames']}")
    return s


def _vae_config(vae_config: dict | None) -> dict:
    cfg = {**TINY_VAE_CONFIG, **(vae_config or {})}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def key_payload(stage: dict, vae_config: dict | None = None) -> dict:
    """Everything that changes the trained VAE (what the cache key hashes)."""
    s = resolve_stage(stage)
    return {
        "format": FORMAT_VERSION,
        "stage": {k: v for k, v in sorted(s.items()) if k not in NOT_IN_KEY},
        "vae": _vae_config(vae_config),
        "data": DATA,
        "schedule": {"warmup": WARMUP_FRACTION, "min_lr": MIN_LR_FRACTION, "grad_clip": GRAD_CLIP, "logvar_init": LOGVAR_INIT},
    }


def cache_key(stage: dict, vae_config: dict | None = None) -> str:
    return hashlib.sha256(json.dumps(key_payload(stage, vae_config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_dir(stage: dict, vae_config: dict | None = None) -> Path:
    """The cache folder of this stage config (it may not exist yet)."""
    s = resolve_stage(stage)
    return cache_root(s["cache_dir"]) / "vae" / f"tiny-{cache_key(s, vae_config)}"


def is_finished(folder: Path) -> bool:
    return (folder / "model" / "config.json").is_file() and (folder / "metrics.json").is_file()


def read_metrics(path: str | os.PathLike) -> dict:
    """metrics.json of a finished stage; ``path`` is the model dir ensure_tiny_vae returns or its cache folder."""
    for cand in (Path(path) / "metrics.json", Path(path).parent / "metrics.json"):
        if cand.is_file():
            return json.loads(cand.read_text())
    raise ModelError(f"{path}: no metrics.json of a finished VAE stage next to it")


@contextlib.contextmanager
def _temporary(path: Path, directory: bool = False):
    """A temporary sibling of ``path`` (0644 / 0755, not mkstemp's private modes: the cache may be
    shared), renamed onto ``path`` when the block succeeds and removed when it fails."""
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
    try:
        os.chmod(tmp, 0o755 if directory else 0o644)
        yield tmp
        if directory and path.exists():  # a half-finished earlier attempt (we hold the lock)
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if directory else tmp.unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    with _temporary(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def _locked(folder: Path):
    """Exclusive fcntl lock on folder/lock (the OS drops it when the process dies: a kill never wedges it)."""
    with open(folder / "lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("VAE stage %s: another process is training it; waiting", folder)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield  # closing the file releases the lock


# --- entry point ----------------------------------------------------------------------------------

StepCallback = Callable[[int, float], None]


def ensure_tiny_vae(stage: dict | None = None, vae_config: dict | None = None, on_step: StepCallback | None = None) -> Path:
    """The directory of the trained tiny AutoencoderKLTemporalDecoder of this stage config, training it
    first when the cache lacks it (resuming a killed run). Load it with
    ``FrozenVideoVAE.from_pretrained(path, subfolder=None)``; ``read_metrics(path)`` gives its report.

    stage: VAE_STAGE_DEFAULTS overrides (flat, or base.yaml's {enabled, settings}); vae_config:
    TINY_VAE_CONFIG overrides. on_step(step, loss) runs after every optimiser step (1-based); an
    exception it raises stops the stage like a kill (the last checkpoint stays)."""
    s = resolve_stage(stage)
    if not s["enabled"]:
        raise ConfigError("vae_stage.enabled is false: there is no trained tiny VAE to return")
    folder = stage_dir(s, vae_config)
    if not is_finished(folder):
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder):
            if not is_finished(folder):  # else another process finished it while we waited
                _write_text(folder / "stage.json", json.dumps(key_payload(s, vae_config), indent=2, default=str))
                _run_stage(s, _vae_config(vae_config), folder, on_step)
    return folder / "model"


# --- data -----------------------------------------------------------------------------------------


def _source(entry: dict, **extra):
    from lightning_m2s.data.sources import build_source

    return build_source(entry["name"], **{k: v for k, v in entry.items() if k != "name"}, **extra)


def render_train_pool(num_videos: int, seed: int) -> torch.Tensor:
    """uint8 [2 * num_videos, pool_frames, 3, H, W]: both views of every training scene, each at a
    random start and stride (drawn from ``seed``)."""
    src = _source(DATA["train"], num_videos=num_videos, cache_scenes=1)
    P, (lo, hi) = DATA["pool_frames"], DATA["strides"]
    rng = np.random.default_rng([seed, 7])
    views = []
    for i in range(num_videos):
        stride = int(rng.integers(lo, hi + 1))
        start = int(rng.integers(0, src.num_frames - (P - 1) * stride))
        left, right, _ = src.read(i, start + stride * np.arange(P))
        views += [torch.from_numpy(v).permute(0, 3, 1, 2) for v in (left, right)]
    return torch.stack(views)


class ClipSampler:
    """Random batches [B, frames, 3, S, S] in [-1, 1] from the pool: S drawn from `sizes`, B =
    batch_size * (size / S)^2 (at least 1), so a batch holds about batch_size crops of `size` worth of
    pixels. Its one numpy Generator is checkpointed, so a resumed run draws the same batches."""

    def __init__(self, pool: torch.Tensor, batch_size: int, frames: int, size: int, seed: int):
        self.pool, self.batch_size, self.frames, self.size = pool, batch_size, frames, size
        self.rng = np.random.default_rng([seed, 11])

    def __call__(self, sizes: list[int] | None = None) -> torch.Tensor:
        N, P, _, H, W = self.pool.shape
        r, T = self.rng, self.frames
        S = int(sizes[int(r.integers(len(sizes)))]) if sizes else self.size
        clips = []
        for _ in range(max(1, round(self.batch_size * (self.size / S) ** 2))):
            n, t, y, x = (int(r.integers(m)) for m in (N, P - T + 1, H - S + 1, W - S + 1))
            clip = self.pool[n, t : t + T, :, y : y + S, x : x + S]
            clips.append(clip.flip(0) if r.random() < 0.5 else clip)  # time reversal: motion both ways
        return torch.stack(clips).float().div_(127.5).sub_(1.0)


def heldout_clips(stage: dict) -> dict[str, torch.Tensor]:
    """{"synthetic": [N, T, 3, S, S], "real": ...} in [-1, 1]: left views under the datamodule's
    evaluation protocol (eval_frames at 5 fps from frame 0, centre crop, resize)."""
    from lightning_m2s.data.transforms import center_crop_box, crop_resize, sample_frame_indices

    s = resolve_stage(stage)
    size = (s["eval_size"], s["eval_size"])
    out = {}
    for name, entry in (("synthetic", DATA["heldout_synthetic"]), ("real", DATA["heldout_real"])):
        src = _source(entry, **{"num_videos" if name == "synthetic" else "num_clips": s["eval_clips"]})
        clips = []
        for i in range(len(src)):
            info = src.info(i)
            idx, _ = sample_frame_indices(info.num_frames, info.fps, s["eval_frames"], DATA["eval_fps"], name=src.describe(i))
            left, right, disp = src.read(i, idx)
            clips.append(crop_resize(left, right, disp, center_crop_box(left.shape[1], left.shape[2], *size), size)[0])
        out[name] = torch.stack(clips)
    return out


@torch.no_grad()
def evaluate_psnr(vae, clips: torch.Tensor) -> list[float]:
    """Per-clip reconstruction PSNR (dB) through the frozen wrapper's path: posterior mode, scaled
    latents, whole-clip temporal decode."""
    from lightning_m2s.metrics import to_unit, video_psnr
    from lightning_m2s.models.vae import FrozenVideoVAE

    frozen = vae if isinstance(vae, FrozenVideoVAE) else FrozenVideoVAE(copy.deepcopy(vae))
    return [float(video_psnr(to_unit(frozen.decode(frozen.encode(c[None], scale=True))), to_unit(c[None]))[0]) for c in clips]


# --- training -------------------------------------------------------------------------------------


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over WARMUP_FRACTION of the steps, then cosine decay to MIN_LR_FRACTION * lr (step 0-based)."""
    warm = max(1, round(WARMUP_FRACTION * steps))
    if step < warm:
        return lr * (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, steps - warm))
    return lr * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * t)))


def new_vae(cfg: dict, seed: int):
    """A fresh AutoencoderKLTemporalDecoder initialised to learn fast (see the two comments)."""
    from diffusers import AutoencoderKLTemporalDecoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            vae = AutoencoderKLTemporalDecoder(**cfg)
        except (TypeError, ValueError) as err:
            raise ModelError(f"vae config {cfg}: {err}") from err
    with torch.no_grad():
        vae.quant_conv.bias[cfg["latent_channels"]:] += LOGVAR_INIT
        # the decoder ends in a 3-tap Conv3d over time on the RGB output; randomly initialised it mixes
        # neighbouring frames' colours and the run spends its first minutes undoing that: start at identity
        w = vae.decoder.time_conv_out.weight  # [3, 3, 3, 1, 1]
        w.zero_()
        w[:, :, 1, 0, 0] = torch.eye(w.shape[0])
        vae.decoder.time_conv_out.bias.zero_()
    return vae


def _optimizer(params, lr: float) -> torch.optim.Optimizer:
    try:  # fused Adam: ~10x faster than the per-tensor loop on this CPU for ~200 small tensors
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr)


@torch.no_grad()
def _latent_std(vae, pool: torch.Tensor, seed: int, clips: int = 32) -> float:
    """Std of posterior samples of (up to) `clips` whole 128 px training frames: SD's scale statistic."""
    idx = torch.linspace(0, pool.shape[0] - 1, min(clips, pool.shape[0])).long()
    frames = pool[idx, 0].float().div(127.5).sub(1.0)
    return float(vae.encode(frames).latent_dist.sample(generator=torch.Generator().manual_seed(seed + 2)).std())


def _run_stage(s: dict, cfg: dict, folder: Path, on_step: StepCallback | None) -> None:
    t_start = time.perf_counter()
    vae = new_vae(cfg, s["seed"])
    opt = _optimizer(vae.parameters(), s["lr"])
    pool = render_train_pool(s["num_train_videos"], s["seed"])
    log.info("VAE stage: %d training views x %d frames rendered in %.1f s", *pool.shape[:2], time.perf_counter() - t_start)
    sampler = ClipSampler(pool, s["batch_size"], s["frames"], s["size"], s["seed"])
    noise = torch.Generator().manual_seed(s["seed"] + 1)

    ckpt = folder / "checkpoint.pt"
    total = s["steps"] + s["final_steps"]
    step, history, train_s = 0, [], 0.0
    if ckpt.is_file():
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            vae.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sampler.rng.bit_generator.state = state["sampler_rng"]
            noise.set_state(state["noise_rng"])
            step, history, train_s = state["step"], state["history"], state["train_s"]
            log.info("VAE stage: resuming %s at step %d of %d", folder, step, total)
        except Exception as err:  # noqa: BLE001 - a torn or stale checkpoint: start over, loudly
            log.warning("VAE stage: cannot resume from %s (%s); training from scratch", ckpt, err)

    bar = None
    if s["progress"]:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc="tiny VAE", unit="step", dynamic_ncols=True)
    vae.train()
    try:
        while step < total:
            t_step = time.perf_counter()
            final = step >= s["steps"]  # the multi-size phase
            for group in opt.param_groups:
                group["lr"] = s["final_lr"] if final else lr_at(step, s["steps"], s["lr"])
            x = sampler(s["final_sizes"] if final else None).flatten(0, 1)  # [B*T, 3, S, S]
            post = vae.encode(x).latent_dist
            y = vae.decode(post.sample(generator=noise), num_frames=s["frames"]).sample  # [B*T, 3, S, S]
            err = y - x
            l1 = err.abs().mean()
            # L1 for sharpness plus MSE, whose large-error gradients speed the first minutes up (it
            # is also what PSNR measures); SD-VAE's KL convention: summed per image over its numel
            loss = l1 + err.square().mean() + s["kl_weight"] * post.kl().mean() / x[0].numel()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"VAE stage: non-finite loss {float(loss)} at step {step + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), GRAD_CLIP)
            opt.step()
            step += 1
            train_s += time.perf_counter() - t_step
            history.append(float(l1.detach()))
            if bar is not None:
                bar.set_postfix(l1=f"{history[-1]:.4f}", refresh=False)
                bar.update(1)
            if step % s["log_every"] == 0 or step == total:
                log.info("VAE stage step %d/%d: L1 %.4f (last %d steps), %.2f s/step", step, total,
                         np.mean(history[-s["log_every"]:]), min(step, s["log_every"]), train_s / step)
            if step % s["checkpoint_every"] == 0 and step < total:
                with _temporary(ckpt) as tmp:
                    torch.save({"model": vae.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                "sampler_rng": sampler.rng.bit_generator.state, "noise_rng": noise.get_state(),
                                "history": history, "train_s": train_s}, tmp)
            if on_step is not None:
                on_step(step, history[-1])
    finally:
        if bar is not None:
            bar.close()

    # the report, then the model: metrics.json first, model/ renamed into place last (the commit)
    vae.eval()
    latent_std = _latent_std(vae, pool, s["seed"])
    if s["fit_scaling_factor"]:
        vae.register_to_config(scaling_factor=1.0 / latent_std)
    t_eval = time.perf_counter()
    psnr = {name: evaluate_psnr(vae, clips) for name, clips in heldout_clips(s).items()}
    tenth = max(1, len(history) // 10)
    metrics = {
        "psnr_heldout_synthetic": float(np.mean(psnr["synthetic"])),
        "psnr_heldout_real": float(np.mean(psnr["real"])),
        "psnr_per_clip": psnr,
        "eval": {"clips_per_source": s["eval_clips"], "frames": s["eval_frames"], "size": s["eval_size"]},
        "train_l1_first": float(np.mean(history[:tenth])),
        "train_l1_last": float(np.mean(history[-tenth:])),
        "steps": step,
        "train_s": train_s,
        "step_s": train_s / max(1, step),
        "eval_s": time.perf_counter() - t_eval,
        "stage_wall_s_this_process": time.perf_counter() - t_start,
        "latent_std": latent_std,
        "scaling_factor": float(vae.config.scaling_factor),
        "downscale": 2 ** (len(cfg["block_out_channels"]) - 1),
        "key": folder.name,
        "torch": torch.__version__,
    }
    _write_text(folder / "metrics.json", json.dumps(metrics, indent=2))
    with _temporary(folder / "model", directory=True) as tmp:
        vae.save_pretrained(tmp)
    ckpt.unlink(missing_ok=True)
    log.info("VAE stage done in %.0f s: held-out PSNR synthetic %.2f dB, real pair %.2f dB -> %s",
             time.perf_counter() - t_start, metrics["psnr_heldout_synthetic"], metrics["psnr_heldout_real"], folder / "model")


def main(argv: list[str] | None = None) -> int:
    """`python -m lightning_m2s.vae_stage [key=value ...]`: build (or find) the stage, print its PSNR."""
    import argparse

    import yaml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="stage settings as key=value (YAML values), e.g. steps=100")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if any("=" not in item for item in args.overrides):
        raise ConfigError(f"overrides must be key=value, got {args.overrides}")
    stage = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.overrides)}
    t0 = time.perf_counter()
    path = ensure_tiny_vae(stage)
    m = read_metrics(path)
    print(f"tiny VAE: {path}\nheld-out reconstruction PSNR: synthetic {m['psnr_heldout_synthetic']:.2f} dB, "
          f"real pair {m['psnr_heldout_real']:.2f} dB ({m['steps']} steps, {m['step_s']:.2f} s/step; "
          f"this call {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
