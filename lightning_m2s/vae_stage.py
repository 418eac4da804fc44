"""The embedded default's tiny video VAE: trained once on the bundled synthetic scenes, cached on disk.

The frozen decoder of the embedded default must be a real autoencoder (a random one would make the
end-to-end loss and every decoded metric meaningless). This stage trains the tiny
``AutoencoderKLTemporalDecoder`` (``models.vae.TINY_VAE_CONFIG``) on clips of the synthetic source's
TRAINING scenes (seed 0; left and right views are just images here, the disparity is unused) and caches
the result keyed by everything that changes it. It never sees the real Middlebury pair (the
real-content test set): that pair only serves the held-out report.

Cache layout (root: ``$M2S_CACHE_DIR`` or ``~/.cache/lightning_m2s``, or the stage's ``cache_dir``)::

    <root>/vae/tiny-<key>/
        lock             fcntl lock held while training (concurrent sweep workers, DDP ranks wait)
        stage.json       what the key hashes (for people)
        checkpoint.pt    resumable state every `checkpoint_every` steps (model, optimiser, step, RNGs)
        metrics.json     held-out reconstruction PSNR, loss, timings
        model/           the trained VAE (save_pretrained; FrozenVideoVAE.from_pretrained(p, subfolder=None))

Every file is written to a temporary name and renamed into place; ``model/`` appears last, so its
presence (with metrics.json) means "finished". A killed stage resumes from its last checkpoint.
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

# Bump when the training procedure or the cache layout changes: every cached VAE is rebuilt.
FORMAT_VERSION = 1
CACHE_ENV = "M2S_CACHE_DIR"  # the same root as lightning_m2s.lpips_weights

# Stage settings (the `vae_stage:` section; a short reason beside each). Measured on the project's
# 2-core CPU: see the README's "tiny VAE stage" section.
VAE_STAGE_DEFAULTS: dict = {
    "enabled": True,  # False: runs build the tiny VAE with random weights (tests of plumbing only)
    "steps": 300,  # optimiser steps: about 1 s each on 2 quiet CPU cores, so the stage takes ~5-6 minutes
    "lr": 1e-3,  # Adam (warm-up + cosine decay to 5%); 1e-3 beat 3e-3 and 1e-2 on this model
    "batch_size": 4,  # clips per step
    "frames": 4,  # frames per training clip: enough for the temporal decoder's 3-tap time convs
    "size": 32,  # training crop side (multiple of 8): convolutional, so small crops make steps cheap
    "kl_weight": 1e-6,  # SD-VAE style: a tiny KL keeps the latent bounded without blurring
    "lpips_weight": 0.0,  # > 0 adds LPIPS(alex, real weights) on the frames; costly on CPU, off by default
    "seed": 0,  # initialisation, clip sampling and posterior noise
    "num_train_videos": 32,  # training scenes (synthetic seed 0, among those the UNet trains on); ~5 s to render
    "cache_dir": None,  # None: $M2S_CACHE_DIR or ~/.cache/lightning_m2s (not part of the key)
    "log_every": 50,  # steps between log lines (not part of the key)
    "checkpoint_every": 100,  # steps between resumable checkpoints (not part of the key)
    "eval_clips": 4,  # held-out clips per source for the report (synthetic seed 10000, real pair)
    "eval_frames": 16,  # frames per held-out clip (the paper's evaluation length), decoded at once
    "eval_size": 128,  # centre crop side of held-out clips (the embedded default's eval_size)
    "fit_scaling_factor": True,  # set scaling_factor = 1 / std of training latents (SD's recipe: unit-variance latents for EDM)
    "progress": True,  # tqdm bar (not part of the key)
}
# Settings that do not change the trained weights: excluded from the cache key.
NOT_IN_KEY = ("enabled", "cache_dir", "log_every", "checkpoint_every", "progress")

# Data options (part of the key). Training clips: random `frames`-frame windows of a per-video pool
# of POOL_FRAMES rendered frames (both views, random stride = 5-30 fps), random `size` crops at the
# native scale of the 128 px renders (the scale the embedded default sees). Held-out: the
# datamodule's evaluation protocol (16 frames at 5 fps from frame 0, centre crop, resize).
DATA = {
    "train": {"name": "synthetic", "size": [128, 128], "num_frames": 150, "fps": 30, "seed": 0},
    "pool_frames": 24,
    "strides": [1, 6],
    "heldout_synthetic": {"name": "synthetic", "size": [128, 128], "num_frames": 150, "fps": 30, "seed": 10_000},
    "heldout_real": {"name": "image_pairs", "seed": 2},
    "eval_fps": 5.0,
}
WARMUP_FRACTION, MIN_LR_FRACTION, GRAD_CLIP = 0.05, 0.05, 1.0
# Initial posterior log-variance (bias of quant_conv's logvar half). diffusers' init gives logvar ~ 0,
# i.e. noise of std 1 on latent means of std ~0.2: the decoder sees noise and a short run barely beats
# predicting grey (measured: L1 0.36 after 125 steps). Starting at std e^-4 ~ 0.02 lets a
# minutes-long run learn; the KL term and the reconstruction then move it where they want.
LOGVAR_INIT = -8.0

_INT_KEYS = ("steps", "batch_size", "frames", "size", "seed", "num_train_videos", "log_every",
             "checkpoint_every", "eval_clips", "eval_frames", "eval_size")


# ------------------------------------------------------------------------------------------------
# config, key, cache folder
# ------------------------------------------------------------------------------------------------


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """The project's cache root: ``root``, else ``$M2S_CACHE_DIR``, else ``~/.cache/lightning_m2s``
    (the rule of lightning_m2s.lpips_weights.cache_dir, whose function appends its own subfolder)."""
    if root is None:
        root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lightning_m2s"
    return Path(root).expanduser()


def resolve_stage(stage: dict | None) -> dict:
    """VAE_STAGE_DEFAULTS updated by ``stage``, validated. Accepts the flat form ({steps: ..., ...}) and
    base.yaml's form ({enabled: ..., settings: {...}}). Unknown keys or bad values raise ConfigError."""
    stage = dict(stage or {})
    prefix = "vae_stage"
    if "settings" in stage:  # experiments/base.yaml: vae_stage: {enabled, settings: {overrides}}
        settings = stage.pop("settings") or {}
        if not isinstance(settings, dict):
            raise ConfigError(f"vae_stage.settings must be a mapping, got {type(settings).__name__}")
        extra = sorted(set(stage) - {"enabled"})
        if extra:
            raise ConfigError(f"unknown key(s) {['vae_stage.' + k for k in extra]}; put stage settings under vae_stage.settings")
        if "enabled" in settings and "enabled" in stage and settings["enabled"] != stage["enabled"]:
            raise ConfigError("vae_stage.enabled and vae_stage.settings.enabled disagree")
        stage = {**settings, **stage}
        prefix = "vae_stage.settings"
    unknown = sorted(set(stage) - set(VAE_STAGE_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[f'{prefix}.{k}' for k in unknown]}; allowed: {sorted(VAE_STAGE_DEFAULTS)}"
        )
    s = {**VAE_STAGE_DEFAULTS, **stage}
    for k in _INT_KEYS:
        v = s[k]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) and not (isinstance(v, float) and v.is_integer()):
            raise ConfigError(f"vae_stage.{k} must be an integer, got {v!r}")
        s[k] = int(v)
    for k in ("lr", "kl_weight", "lpips_weight"):
        try:
            s[k] = float(s[k])
        except (TypeError, ValueError):
            raise ConfigError(f"vae_stage.{k} must be a number, got {s[k]!r}") from None
    for k in ("steps", "batch_size", "frames", "num_train_videos", "log_every", "checkpoint_every", "eval_clips", "eval_frames"):
        if s[k] < 1:
            raise ConfigError(f"vae_stage.{k} must be >= 1, got {s[k]}")
    if not s["lr"] > 0 or s["kl_weight"] < 0 or s["lpips_weight"] < 0:
        raise ConfigError(f"vae_stage: need lr > 0, kl_weight >= 0, lpips_weight >= 0; got {s['lr']}, {s['kl_weight']}, {s['lpips_weight']}")
    render = min(DATA["train"]["size"])
    for k in ("size", "eval_size"):
        if s[k] < 8 or s[k] % 8:
            raise ConfigError(f"vae_stage.{k} must be a multiple of 8 (the VAE's downscale), got {s[k]}")
    if s["size"] > render:
        raise ConfigError(f"vae_stage.size must be <= {render} (the training renders' side), got {s['size']}")
    if s["frames"] > DATA["pool_frames"]:
        raise ConfigError(f"vae_stage.frames must be <= {DATA['pool_frames']} (frames rendered per training video), got {s['frames']}")
    if s["lpips_weight"] > 0 and s["size"] < 32:
        raise ConfigError(f"vae_stage.lpips_weight > 0 needs vae_stage.size >= 32 (LPIPS' AlexNet), got {s['size']}")
    for k in ("enabled", "progress", "fit_scaling_factor"):
        if not isinstance(s[k], bool):
            raise ConfigError(f"vae_stage.{k} must be true or false, got {s[k]!r}")
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
    blob = json.dumps(key_payload(stage, vae_config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_dir(stage: dict, vae_config: dict | None = None) -> Path:
    """The cache folder of this stage config (it may not exist yet)."""
    s = resolve_stage(stage)
    return cache_root(s["cache_dir"]) / "vae" / f"tiny-{cache_key(s, vae_config)}"


def is_finished(folder: Path) -> bool:
    return (folder / "model" / "config.json").is_file() and (folder / "metrics.json").is_file()


def read_metrics(path: str | os.PathLike) -> dict:
    """metrics.json of a finished stage; ``path`` is the model dir ensure_tiny_vae returns or its cache folder."""
    p = Path(path)
    for cand in (p / "metrics.json", p.parent / "metrics.json"):
        if cand.is_file():
            return json.loads(cand.read_text())
    raise ModelError(f"{p}: no metrics.json of a finished VAE stage next to it")


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _atomic_torch_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(folder: Path):
    """Exclusive fcntl lock on folder/lock (released when the process dies, so a kill never wedges it)."""
    with open(folder / "lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("VAE stage %s: another process is training it; waiting for it", folder)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------
# public entry points
# ------------------------------------------------------------------------------------------------

StepCallback = Callable[[int, float], None]


def ensure_tiny_vae(stage: dict | None = None, vae_config: dict | None = None, on_step: StepCallback | None = None) -> Path:
    """The directory of the trained tiny AutoencoderKLTemporalDecoder for this stage config (training it
    first if the cache lacks it; resuming a killed run). Load it with
    ``FrozenVideoVAE.from_pretrained(path, subfolder=None)``; ``read_metrics(path)`` gives its report.

    stage: VAE_STAGE_DEFAULTS overrides (flat, or base.yaml's {enabled, settings}); vae_config:
    TINY_VAE_CONFIG overrides. on_step(step, loss) is called after every optimiser step (1-based);
    an exception it raises stops the stage like a kill would (the last checkpoint stays)."""
    s = resolve_stage(stage)
    if not s["enabled"]:
        raise ConfigError("vae_stage.enabled is false: there is no trained tiny VAE to return (use build_frozen_vae)")
    folder = stage_dir(s, vae_config)
    if is_finished(folder):
        return folder / "model"
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        if is_finished(folder):  # another process finished it while we waited
            log.info("VAE stage %s: finished by another process", folder)
            return folder / "model"
        _atomic_write_text(folder / "stage.json", json.dumps(key_payload(s, vae_config), indent=2, default=str))
        _run_stage(s, vae_config, folder, on_step)
    return folder / "model"


def build_frozen_vae(stage: dict | None = None, vae_config: dict | None = None, **kwargs):
    """A FrozenVideoVAE: the cached trained tiny VAE, or (vae_stage.enabled false) a random one."""
    from lightning_m2s.models.vae import FrozenVideoVAE

    s = resolve_stage(stage)
    if not s["enabled"]:
        return FrozenVideoVAE.from_config(vae_config, seed=s["seed"], **kwargs)
    return FrozenVideoVAE.from_pretrained(ensure_tiny_vae(s, vae_config), subfolder=None, **kwargs)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def _source(entry: dict, **extra):
    from lightning_m2s.data.sources import build_source

    opts = {k: v for k, v in entry.items() if k != "name"}
    return build_source(entry["name"], **opts, **extra)


def render_train_pool(num_videos: int, seed: int) -> torch.Tensor:
    """uint8 [2 * num_videos, POOL_FRAMES, 3, H, W]: both views of POOL_FRAMES frames of every training
    scene at a random stride (start and stride drawn from ``seed``; deterministic)."""
    src = _source(DATA["train"], num_videos=num_videos, cache_scenes=1)
    P, (lo, hi) = DATA["pool_frames"], DATA["strides"]
    rng = np.random.default_rng([seed, 7])
    clips = []
    for i in range(num_videos):
        stride = int(rng.integers(lo, hi + 1))
        start = int(rng.integers(0, src.num_frames - (P - 1) * stride))
        left, right, _ = src.read(i, start + stride * np.arange(P))
        for view in (left, right):
            clips.append(torch.from_numpy(view).permute(0, 3, 1, 2))  # [P, 3, H, W]
    return torch.stack(clips)


class ClipSampler:
    """Random training batches from the pool: [B, frames, 3, size, size] in [-1, 1]. Its state is one
    numpy Generator (saved in checkpoints, so a resumed run draws the same batches)."""

    def __init__(self, pool: torch.Tensor, batch_size: int, frames: int, size: int, seed: int):
        self.pool, self.batch_size, self.frames, self.size = pool, batch_size, frames, size
        self.rng = np.random.default_rng([seed, 11])

    def __call__(self) -> torch.Tensor:
        N, P, _, H, W = self.pool.shape
        T, S = self.frames, self.size
        out = []
        for _ in range(self.batch_size):
            n, t0 = int(self.rng.integers(N)), int(self.rng.integers(P - T + 1))
            y, x = int(self.rng.integers(H - S + 1)), int(self.rng.integers(W - S + 1))
            clip = self.pool[n, t0 : t0 + T, :, y : y + S, x : x + S]
            if self.rng.random() < 0.5:
                clip = clip.flip(0)  # time reversal: the decoder sees motion both ways
            out.append(clip)
        return torch.stack(out).float().div_(127.5).sub_(1.0)


def heldout_clips(stage: dict) -> dict[str, torch.Tensor]:
    """Held-out evaluation clips per source: {"synthetic": [N, T, 3, S, S], "real": ...} in [-1, 1],
    the datamodule's evaluation protocol (eval_frames at 5 fps from frame 0, centre crop, resize)."""
    from lightning_m2s.data.transforms import center_crop_box, crop_resize, sample_frame_indices

    s = resolve_stage(stage)
    size = (s["eval_size"], s["eval_size"])
    out = {}
    for name, entry in (("synthetic", DATA["heldout_synthetic"]), ("real", DATA["heldout_real"])):
        count = {"num_videos": s["eval_clips"]} if entry["name"] == "synthetic" else {"num_clips": s["eval_clips"]}
        src = _source(entry, **count)
        clips = []
        for i in range(len(src)):
            info = src.info(i)
            idx, _ = sample_frame_indices(info.num_frames, info.fps, s["eval_frames"], DATA["eval_fps"], name=src.describe(i))
            left, right, disp = src.read(i, idx)
            box = center_crop_box(left.shape[1], left.shape[2], *size)
            clips.append(crop_resize(left, right, disp, box, size)[0])  # the left view [T, 3, S, S]
        out[name] = torch.stack(clips)
    return out


@torch.no_grad()
def evaluate_psnr(vae, clips: torch.Tensor) -> list[float]:
    """Per-clip reconstruction PSNR (dB) through the frozen wrapper's own path: posterior mode,
    scaled latents, whole-clip temporal decode."""
    from lightning_m2s.metrics import to_unit, video_psnr
    from lightning_m2s.models.vae import FrozenVideoVAE

    frozen = vae if isinstance(vae, FrozenVideoVAE) else FrozenVideoVAE(copy.deepcopy(vae))
    out = []
    for clip in clips:
        rec = frozen.decode(frozen.encode(clip[None], mode="mode", scale=True))
        out.append(float(video_psnr(to_unit(rec), to_unit(clip[None]))[0]))
    return out


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over WARMUP_FRACTION of the steps, then cosine decay to MIN_LR_FRACTION * lr (step 0-based)."""
    warm = max(1, int(round(WARMUP_FRACTION * steps)))
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _optimizer(params, lr: float) -> torch.optim.Optimizer:
    try:  # fused Adam: about 10x faster than the per-tensor loop on this CPU for ~250 small tensors
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr)


@torch.no_grad()
def _latent_std(vae, pool: torch.Tensor, s: dict, clips: int = 32) -> float:
    """Std of posterior samples over (up to) `clips` whole training frames at 128 px: SD's scale statistic."""
    idx = torch.linspace(0, pool.shape[0] - 1, min(clips, pool.shape[0])).long()
    frames = pool[idx, 0].float().div(127.5).sub(1.0)  # [n, 3, H, W]
    gen = torch.Generator().manual_seed(s["seed"] + 2)
    z = vae.encode(frames).latent_dist.sample(generator=gen)
    return float(z.std())


def _run_stage(s: dict, vae_config: dict | None, folder: Path, on_step: StepCallback | None) -> None:
    from diffusers import AutoencoderKLTemporalDecoder

    t_start = time.perf_counter()
    cfg = _vae_config(vae_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s["seed"])
        try:
            vae = AutoencoderKLTemporalDecoder(**cfg)
        except (TypeError, ValueError) as err:
            raise ModelError(f"vae config {cfg}: {err}") from err
    with torch.no_grad():
        vae.quant_conv.bias[cfg["latent_channels"]:] += LOGVAR_INIT
    opt = _optimizer(vae.parameters(), s["lr"])
    lpips = None
    if s["lpips_weight"] > 0:
        from lightning_m2s.metrics import lpips_network

        lpips = lpips_network("alex")

    t0 = time.perf_counter()
    pool = render_train_pool(s["num_train_videos"], s["seed"])
    log.info("VAE stage: rendered %d training clips x %d frames in %.1f s", pool.shape[0], pool.shape[1], time.perf_counter() - t0)
    sampler = ClipSampler(pool, s["batch_size"], s["frames"], s["size"], s["seed"])
    noise = torch.Generator().manual_seed(s["seed"] + 1)

    ckpt_path = folder / "checkpoint.pt"
    step, history, train_s = 0, [], 0.0
    if ckpt_path.is_file():
        try:
            state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            vae.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sampler.rng.bit_generator.state = state["sampler_rng"]
            noise.set_state(state["noise_rng"])
            step, history, train_s = int(state["step"]), list(state["history"]), float(state.get("train_s", 0.0))
            log.info("VAE stage: resuming %s at step %d of %d", folder, step, s["steps"])
        except Exception as err:  # noqa: BLE001 - a torn or stale checkpoint: start over, loudly
            log.warning("VAE stage: cannot resume from %s (%s); training from scratch", ckpt_path, err)

    def save_checkpoint() -> None:
        _atomic_torch_save({
            "model": vae.state_dict(), "optimizer": opt.state_dict(), "step": step,
            "sampler_rng": sampler.rng.bit_generator.state, "noise_rng": noise.get_state(),
            "history": history, "train_s": train_s,
        }, ckpt_path)

    bar = None
    if s["progress"]:
        from tqdm.auto import tqdm

        bar = tqdm(total=s["steps"], initial=step, desc="tiny VAE", unit="step", dynamic_ncols=True)
    vae.train()
    T = s["frames"]
    window: list[float] = []
    try:
        while step < s["steps"]:
            t_step = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, s["steps"], s["lr"])
            x = sampler().flatten(0, 1)  # [B*T, 3, S, S]
            post = vae.encode(x).latent_dist
            z = post.sample(generator=noise)  # [B*T, 4, S/8, S/8]
            y = vae.decode(z, num_frames=T).sample
            rec = (y - x).abs().mean()
            # SD-VAE convention: weight x KL summed per image, against the reconstruction summed per
            # image; both divided by the image's numel here (rec is a mean)
            loss = rec + s["kl_weight"] * post.kl().mean() / x[0].numel()
            if lpips is not None:
                loss = loss + s["lpips_weight"] * lpips(y.clamp(-1, 1), x).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"VAE stage: non-finite loss {float(loss)} at step {step + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), GRAD_CLIP)
            opt.step()
            step += 1
            train_s += time.perf_counter() - t_step
            value = float(rec.detach())
            window.append(value)
            history.append(value)
            if bar is not None:
                bar.set_postfix(l1=f"{value:.4f}", lr=f"{opt.param_groups[0]['lr']:.1e}", refresh=False)
                bar.update(1)
            if step % s["log_every"] == 0 or step == s["steps"]:
                log.info("VAE stage step %d/%d: L1 %.4f (mean of last %d), %.2f s/step", step, s["steps"],
                         sum(window) / len(window), len(window), train_s / max(1, step))
                window = []
            if step % s["checkpoint_every"] == 0 and step < s["steps"]:
                save_checkpoint()
            if on_step is not None:
                on_step(step, value)
    finally:
        if bar is not None:
            bar.close()

    # held-out report, then the model: metrics.json first, model/ renamed into place last (the commit)
    vae.eval()
    latent_std = _latent_std(vae, pool, s)
    if s["fit_scaling_factor"]:
        vae.register_to_config(scaling_factor=float(1.0 / latent_std))
    t_eval = time.perf_counter()
    clips = heldout_clips(s)
    psnr = {name: evaluate_psnr(vae, c) for name, c in clips.items()}
    eval_s = time.perf_counter() - t_eval
    tail = history[-max(1, len(history) // 10):]
    metrics = {
        "psnr_heldout_synthetic": float(np.mean(psnr["synthetic"])),
        "psnr_heldout_real": float(np.mean(psnr["real"])),
        "psnr_per_clip": psnr,
        "eval": {"clips_per_source": s["eval_clips"], "frames": s["eval_frames"], "size": s["eval_size"],
                 "synthetic": DATA["heldout_synthetic"], "real": DATA["heldout_real"]},
        "train_l1_first": float(np.mean(history[: max(1, len(history) // 10)])),
        "train_l1_last": float(np.mean(tail)),
        "steps": step,
        "train_s": train_s,
        "step_s": train_s / max(1, step),
        "eval_s": eval_s,
        "stage_wall_s_this_process": time.perf_counter() - t_start,
        "latent_std": latent_std,
        "scaling_factor": float(vae.config.scaling_factor),
        "key": folder.name,
        "torch": torch.__version__,
    }
    _atomic_write_text(folder / "metrics.json", json.dumps(metrics, indent=2))
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".model."))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700, as above
        vae.save_pretrained(tmp)
        if (folder / "model").exists():  # a half-finished earlier attempt (never a finished one: we hold the lock)
            shutil.rmtree(folder / "model")
        os.replace(tmp, folder / "model")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with contextlib.suppress(FileNotFoundError):
        ckpt_path.unlink()
    log.info("VAE stage done in %.0f s: held-out PSNR synthetic %.2f dB, real pair %.2f dB -> %s",
             time.perf_counter() - t_start, metrics["psnr_heldout_synthetic"], metrics["psnr_heldout_real"], folder / "model")


def main(argv: list[str] | None = None) -> int:
    """`python -m lightning_m2s.vae_stage [key=value ...]`: build (or find) the default stage, print its PSNR."""
    import argparse

    import yaml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="stage settings as key=value (YAML values), e.g. steps=100")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    stage = {}
    for item in args.overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must be key=value")
        k, v = item.split("=", 1)
        stage[k] = yaml.safe_load(v)
    t0 = time.perf_counter()
    path = ensure_tiny_vae(stage)
    m = read_metrics(path)
    print(f"tiny VAE: {path}")
    print(f"held-out reconstruction PSNR: synthetic {m['psnr_heldout_synthetic']:.2f} dB, "
          f"real pair {m['psnr_heldout_real']:.2f} dB ({m['steps']} steps, {m['step_s']:.2f} s/step; "
          f"this call {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
