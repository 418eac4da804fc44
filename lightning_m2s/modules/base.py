"""The LightningModule every training variant shares: model, shared step, optimiser, evaluation.

A variant only says how its loss is computed (`compute_loss`); it predicts at evaluation with the
refiner's `generate`; the loop, metrics, long-video augmentation and NaN checks live here once.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from lightning_m2s.data.clip import StereoClip
from lightning_m2s.errors import ConfigError, M2SError
from lightning_m2s.metrics import StereoMetrics
from lightning_m2s.models.refiner import StereoRefiner, build_refiner

# Evaluation dataset names in metric keys (`test/<dataset>/<metric>`): sources by what they are.
DATASET_NAMES = {"image_pairs": "real"}
OPTIM_DEFAULTS = dict(lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999))
LONG_VIDEO_DEFAULTS = dict(probability=0.0, distribution="uniform", positions="first")
LONG_VIDEO_POSITIONS = ("first", "random", "either")
# steps: one count or a list, all evaluated on the same trained model at test (validation uses the first).
EVAL_DEFAULTS = dict(steps=1, lpips_net="alex", ms_ssim="per_frame", preview_clips=2)
# One set of loss settings for all variants; each uses its own: standard_diffusion the sigma sampling
# (EDM log-normal, Hi3D's), end_to_end the Eq. 5 weights (released: each 1.0, LPIPS with VGG16).
LOSS_DEFAULTS = dict(p_mean=1.0, p_std=1.6, latent_weight=1.0, l1_weight=1.0, lpips_weight=1.0, lpips_net="vgg")


class NonFiniteLossError(M2SError, FloatingPointError):
    """The training loss became NaN or inf."""


def dataset_name(meta: dict) -> str:
    return DATASET_NAMES.get(meta.get("source", "unknown"), meta.get("source", "unknown"))


def clip_id(meta: dict) -> str:
    """A test clip's identity, the key that pairs clips across runs: video and first frame."""
    return f"{meta.get('video')}@{meta.get('start_frame')}"


def eval_steps(steps, key: str = "module.eval.steps") -> list[int]:
    """module.eval.steps (an int or a list of them) -> the distinct step counts, in the given order."""
    counts = list(steps) if isinstance(steps, (list, tuple)) else [steps]
    if not counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
        raise ConfigError(f"{key} must be a step count >= 1 or a non-empty list of them, got {steps!r}")
    if len(set(counts)) != len(counts):
        raise ConfigError(f"{key} lists a step count twice: {steps!r}")
    return counts


def replace_frames_with_truth(batch: StereoClip, known: torch.Tensor) -> StereoClip:
    """Long-video conditioning (App. E): frames where `known` [B, T] is True get the ground-truth right
    frame as their warped input and an empty mask, as generated frames do at long-video inference."""
    k = known[:, :, None, None, None]  # [B, T, 1, 1, 1]
    return StereoClip(
        left=batch.left, right=batch.right, disparity=batch.disparity, holes=batch.holes & ~k,
        warped=torch.where(k, batch.right, batch.warped), mask=batch.mask & ~k, meta=batch.meta,
    )


class StereoModule(L.LightningModule):
    """Base of the variants. `model` is the `model:` config section (see models.refiner.REFINER_DEFAULTS)."""

    trains = True  # baselines without parameters set False: train() skips fitting them

    def __init__(
        self,
        model: dict | None = None,
        optim: dict | None = None,
        loss: dict | None = None,
        eval: dict | None = None,
        long_video: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)  # kept in checkpoints; MLflow gets the whole config once (tracking.log_config)
        self.optim = _with_defaults(OPTIM_DEFAULTS, optim, "optim")
        self.loss_cfg = _with_defaults(LOSS_DEFAULTS, loss, "module.loss")
        self.eval_cfg = _with_defaults(EVAL_DEFAULTS, eval, "module.eval")
        self.eval_steps = eval_steps(self.eval_cfg["steps"])
        self.long_video = _with_defaults(LONG_VIDEO_DEFAULTS, long_video, "module.long_video")
        if self.long_video["distribution"] not in ("uniform", "exponential"):
            raise ConfigError("module.long_video.distribution must be uniform or exponential")
        if self.long_video["positions"] not in LONG_VIDEO_POSITIONS:
            raise ConfigError(f"module.long_video.positions must be one of {LONG_VIDEO_POSITIONS}")
        self.model: StereoRefiner | None = build_refiner(**(model or {})) if self.trains else None
        # Checkpoints may omit frozen weights that the config reloads (see on_save_checkpoint).
        self.strict_loading = False
        self.metrics: dict[tuple, StereoMetrics] = {}  # (stage, dataset, steps) -> metric, made on first use
        self.latencies: dict[int, list[float]] = {}  # steps -> seconds per 16-frame clip
        self.previews: list[dict[str, Any]] = []  # first clips per dataset of the last evaluation (media callback)
        self.clip_ids: dict[tuple, list[str]] = {}  # (stage, dataset, steps) -> clip ids in metric-update order
        self.per_clip: list[dict[str, Any]] = []  # the last test pass at the first step count: one row per clip
        self.per_clip_by_steps: dict[int, list[dict[str, Any]]] = {}  # every step count's rows (several only)

    # --- what a variant defines ----------------------------------------------------------------
    def compute_loss(self, batch: StereoClip) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss, parts to log) for one training or validation batch."""
        raise NotImplementedError

    # --- shared pieces ------------------------------------------------------------------------
    def conditioning(self, batch: StereoClip, eval_mode: bool = False, generator: torch.Generator | None = None):
        fps = torch.tensor([m.get("fps", 5.0) for m in batch.meta], device=self.device)
        cond_aug = self.model.cond_aug_eval if eval_mode else None
        return self.model.build_conditioning(batch.left, batch.warped, batch.mask, fps_id=fps, cond_aug=cond_aug,
                                             generator=generator)

    def predict_video(self, batch: StereoClip, seed: int = 0, steps: int | None = None) -> torch.Tensor:
        """The right view [B, T, 3, H, W] in [-1, 1] for an evaluation batch at `steps` (default: the
        first of eval.steps). Its noise (the condition augmentation, multi-step sampling) comes from
        `seed` alone, never the global RNG: the same weights score the same before and after a resume,
        and every step count sees the same condition."""
        generator = torch.Generator().manual_seed(seed)
        cond = self.conditioning(batch, eval_mode=True, generator=generator)
        steps = self.eval_steps[0] if steps is None else steps
        return self.model.decode(self.model.generate(cond, steps, generator)).clamp(-1, 1)

    def _long_video_augment(self, batch: StereoClip) -> StereoClip:
        """With `probability` per batch, n frames of every clip become known (one n per batch, as the
        released code): the first n (as chunks hand over at inference), or n at random positions."""
        cfg = self.long_video
        if cfg["probability"] <= 0 or torch.rand(()) >= cfg["probability"]:
            return batch
        B, T = batch.left.shape[:2]
        if cfg["distribution"] == "uniform":  # n in [0, T]
            n = int(torch.randint(0, T + 1, ()))
        else:  # released: round(Exponential(1)) frames
            n = min(int(torch.distributions.Exponential(1.0).sample().round()), T)
        first = cfg["positions"] == "first" or (cfg["positions"] == "either" and torch.rand(()) < 0.5)
        order = torch.arange(T).expand(B, T) if first else torch.rand(B, T).argsort(dim=1)  # frame ranks
        known = order.argsort(dim=1) < n  # [B, T]: the n frames ranked first
        return replace_frames_with_truth(batch, known.to(batch.left.device))

    def _stage_steps(self, stage: str) -> list[int]:
        """The step counts a pass evaluates: all of eval.steps at test, the first at validation (the
        checkpoint's selection needs one), one pass for the training-free baselines."""
        return self.eval_steps if stage == "test" and self.trains else self.eval_steps[:1]

    def _metric_names(self, stage: str, dataset: str, steps: int) -> list[str]:
        """Prefixes of one pass's metrics: `<stage>/<dataset>` for the first step count (what sweeps'
        objectives and every older consumer read) and, with several, `<stage>/<dataset>/steps<N>` each."""
        names = [f"{stage}/{dataset}"] if steps == self.eval_steps[0] else []
        if len(self._stage_steps(stage)) > 1:
            names.append(f"{stage}/{dataset}/steps{steps}")
        return names

    def _metric(self, stage: str, dataset: str, steps: int) -> StereoMetrics:
        key = (stage, dataset, steps)
        if key not in self.metrics:
            self.metrics[key] = StereoMetrics(lpips_net=self.eval_cfg["lpips_net"],
                                              ms_ssim_mode=self.eval_cfg["ms_ssim"]).to(self.device)
        return self.metrics[key]

    def _dataset_names(self, stage: str) -> list[str]:
        """The evaluation datasets of the split, known before any batch, in one order on every rank:
        each metric's compute() is a collective under DDP, so all ranks must call them alike."""
        datamodule = getattr(self.trainer, "datamodule", None)
        entries = getattr(datamodule, f"{stage}_sources", None) or []
        return sorted({dataset_name({"source": e["name"]}) for e in entries})

    # --- Lightning hooks --------------------------------------------------------------------------
    def training_step(self, batch: StereoClip, batch_idx: int) -> torch.Tensor:
        batch = self._long_video_augment(batch)
        loss, parts = self.compute_loss(batch)
        if not torch.isfinite(loss):
            videos = [f"{m.get('source')}:{m.get('video')}@{m.get('start_frame')}" for m in batch.meta]
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at global step {self.global_step}, batch {batch_idx} "
                f"(clips {videos}); try a lower optim.lr or trainer.gradient_clip_val"
            )
        B = batch.left.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=B)
        # Pixels without a disparity (Stereo4D's flow outliers, warped as holes): counted per epoch
        outliers = sum(m.get("disparity_outliers", 0) for m in batch.meta)
        pixels = sum(m.get("disparity_pixels", 0) for m in batch.meta)
        self.log("train/disparity_outliers", float(outliers), on_step=False, on_epoch=True, reduce_fx="sum",
                 batch_size=B, sync_dist=True)
        self.log("train/disparity_outlier_fraction", outliers / max(pixels, 1), on_step=False, on_epoch=True,
                 batch_size=B, sync_dist=True)
        return loss

    def _evaluate(self, batch: StereoClip, batch_idx: int, stage: str) -> None:
        for steps in self._stage_steps(stage):  # one trained model, every step count on the same clips
            _synchronize(self.device)
            start = time.perf_counter()
            pred = self.predict_video(batch, seed=batch_idx, steps=steps)
            _synchronize(self.device)  # GPU kernels run asynchronously: time their completion
            seconds = time.perf_counter() - start
            T = batch.left.shape[1]
            self.latencies.setdefault(steps, []).append(seconds / batch.left.shape[0] * 16 / T)  # per 16-frame clip
            self._score(batch, pred, stage, steps, previews=steps == self.eval_steps[0])

    def _score(self, batch: StereoClip, pred: torch.Tensor, stage: str, steps: int, previews: bool) -> None:
        for i, meta in enumerate(batch.meta):
            if meta.get("padding"):  # a DDP rank's filler: scored on the rank that owns the clip
                continue
            dataset = dataset_name(meta)
            self._metric(stage, dataset, steps).update(pred[i : i + 1], batch.right[i : i + 1], batch.mask[i : i + 1])
            self.clip_ids.setdefault((stage, dataset, steps), []).append(clip_id(meta))
            if previews and sum(p["dataset"] == dataset for p in self.previews) < self.eval_cfg["preview_clips"]:
                self.previews.append({
                    "dataset": dataset, "left": batch.left[i].cpu(), "warped": batch.warped[i].cpu(),
                    "mask": batch.mask[i].cpu(), "output": pred[i].cpu(), "right": batch.right[i].cpu(),
                })

    def _start_evaluation(self, stage: str) -> None:
        self.metrics.clear()
        self.clip_ids.clear()
        for name in self._dataset_names(stage):
            for steps in self._stage_steps(stage):
                self._metric(stage, name, steps)
        self.latencies.clear()
        self.previews.clear()

    def _end_evaluation(self, stage: str) -> None:
        logs = {}
        for (_, dataset, steps), metric in sorted(self.metrics.items()):
            if metric.update_count == 0 and not torch.distributed.is_initialized():
                continue  # a dataset this pass never reached (e.g. limit_test_batches): nothing to report
            values = metric.compute()  # gathered over DDP ranks
            if values["n_videos"] == 0:
                continue
            for prefix in self._metric_names(stage, dataset, steps):
                logs.update({f"{prefix}/{name}": float(v) for name, v in values.items()
                             if not name.startswith("n_videos")})
        if stage == "test":
            by_steps = {steps: self._per_clip_rows(steps) for steps in self._stage_steps(stage)}
            self.per_clip = by_steps[self.eval_steps[0]]
            self.per_clip_by_steps = by_steps if len(by_steps) > 1 else {}
        logs[f"{stage}/steps"] = float(self.eval_steps[0]) if self.trains else 0.0
        self.log_dict(logs)  # already reduced over ranks by the metrics; every rank logs the same values
        several = len(self.latencies) > 1
        for steps, seconds in self.latencies.items():
            mean = sum(seconds) / len(seconds)
            if steps == self.eval_steps[0]:
                self.log(f"{stage}/latency_s", mean, sync_dist=True)
            if several:
                self.log(f"{stage}/steps{steps}/latency_s", mean, sync_dist=True)

    def _per_clip_rows(self, steps: int) -> list[dict[str, Any]]:
        """One row per scored test clip at `steps`: {dataset, clip, <metric>: value}, gathered over DDP
        ranks, sorted."""
        rows = []
        for key, metric in sorted(self.metrics.items()):
            if key[2] != steps:
                continue
            values = metric.per_video()  # this rank's videos, in update order
            for j, cid in enumerate(self.clip_ids.get(key, [])):
                rows.append({"dataset": key[1], "clip": cid, **{name: v[j] for name, v in values.items()}})
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        return sorted(rows, key=lambda r: (r["dataset"], r["clip"]))

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation("val")

    def validation_step(self, batch: StereoClip, batch_idx: int) -> None:
        if self.trains:
            # the same sigma / noise every validation (comparable losses); manual_seed also seeds the
            # GPU, so its generator is forked too, or training would repeat its draws after each validation
            gpu = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=gpu):
                torch.manual_seed(batch_idx)
                loss, _ = self.compute_loss(batch)
            self.log("val/loss", loss, batch_size=batch.left.shape[0], sync_dist=True)
        self._evaluate(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._end_evaluation("val")

    def on_test_epoch_start(self) -> None:
        self._start_evaluation("test")

    def test_step(self, batch: StereoClip, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._end_evaluation("test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Leave out the frozen weights that `model.pretrained` provides again on load (img2vid-xt's
        CLIP image encoder and VAE: ~3 GB per checkpoint in fp32). The tiny default's VAE is kept: its
        cache can be retrained."""
        model_cfg = self.hparams.get("model") or {}
        if not self.trains or model_cfg.get("pretrained") is None:
            return
        frozen = ("model.embedding.",) if model_cfg.get("vae_path") else ("model.embedding.", "model.vae.")
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(frozen)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Loading is not strict (frozen weights may be absent), so check the trained ones are all there."""
        state = checkpoint.get("state_dict")  # DeepSpeed keeps weights outside this dict
        if not self.trains or state is None:
            return
        missing = [k for k in self.state_dict() if k.startswith("model.unet.") and k not in state]
        if missing:
            raise M2SError(f"checkpoint lacks trained UNet weights, e.g. {missing[:3]}")

    def configure_optimizers(self):
        o = self.optim
        return torch.optim.AdamW(self.model.trainable_parameters(), lr=o["lr"], weight_decay=o["weight_decay"],
                                 betas=tuple(o["betas"]))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _with_defaults(defaults: dict, given: dict | None, section: str) -> dict:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}
