"""The LightningModules: `Evaluator` scores a `predict_video` on validation and test clips; `StereoModule`,
the base of every training variant, adds the model, the shared training step and the optimiser.

A variant only says how its loss is computed (`compute_loss`); it predicts at evaluation with the
refiner's `generate`; the loop, long-video augmentation and NaN checks live here once, the evaluation's
bookkeeping in `recorder.EvaluationRecorder`. The training-free floors are Evaluators that only predict.
"""

from __future__ import annotations

import time

import lightning as L
import torch

from lightning_m2s.config import with_defaults
from lightning_m2s.data.clip import StereoClip
from lightning_m2s.errors import ConfigError, M2SError
from lightning_m2s.models.refiner import StereoRefiner, build_refiner
from lightning_m2s.modules.recorder import EvaluationRecorder, dataset_name

LONG_VIDEO_POSITIONS = ("first", "random", "either")


class NonFiniteLossError(M2SError, FloatingPointError):
    """The training loss became NaN or inf."""


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


class Evaluator(L.LightningModule):
    """Scores `predict_video` on the validation and test clips through an EvaluationRecorder, once per
    step count of `step_counts(stage)`. Subclasses define `predict_video`."""

    trains = False  # train() fits only modules that train; an Evaluator is only tested

    def __init__(self, eval: dict | None = None):
        super().__init__()
        self.eval_cfg = with_defaults("module.eval", eval)
        self.eval_steps = eval_steps(self.eval_cfg["steps"])
        self.recorder = EvaluationRecorder(self.eval_cfg["lpips_net"], self.eval_cfg["ms_ssim"],
                                           self.eval_cfg["preview_clips"])

    def predict_video(self, batch: StereoClip, seed: int = 0, steps: int | None = None) -> torch.Tensor:
        """The right view [B, T, 3, H, W] in [-1, 1] of an evaluation batch."""
        raise NotImplementedError

    def step_counts(self, stage: str) -> list[int]:
        """The step counts a pass evaluates (a prediction without steps: one pass)."""
        return self.eval_steps[:1]

    def _start(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        entries = getattr(datamodule, f"{stage}_sources", None) or []
        datasets = sorted({dataset_name({"source": e["name"]}) for e in entries})  # known before any batch
        self.recorder.start(stage, datasets, self.step_counts(stage), self.device)

    def _evaluate(self, batch: StereoClip, batch_idx: int) -> None:
        for steps in self.recorder.step_counts:  # one model, every step count on the same clips
            _synchronize(self.device)
            start = time.perf_counter()
            pred = self.predict_video(batch, seed=batch_idx, steps=steps)
            _synchronize(self.device)  # GPU kernels run asynchronously: time their completion
            self.recorder.record(batch, pred, steps, time.perf_counter() - start)

    def _end(self, stage: str) -> None:
        values, latencies = self.recorder.finish()
        values[f"{stage}/steps"] = float(self.eval_steps[0]) if self.trains else 0.0
        self.log_dict(values)  # already reduced over ranks by the metrics; every rank logs the same values
        for key, seconds in latencies.items():
            self.log(key, seconds, sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        self._start("val")

    def validation_step(self, batch: StereoClip, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._end("val")

    def on_test_epoch_start(self) -> None:
        self._start("test")

    def test_step(self, batch: StereoClip, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._end("test")


class StereoModule(Evaluator):
    """Base of the training variants. `model` is the `model:` config section (experiments/base.yaml)."""

    trains = True

    def __init__(
        self,
        model: dict | None = None,
        optim: dict | None = None,
        loss: dict | None = None,
        eval: dict | None = None,
        long_video: dict | None = None,
    ):
        super().__init__(eval)
        self.save_hyperparameters(logger=False)  # kept in checkpoints; MLflow gets the whole config once (tracking.log_config)
        self.optim = with_defaults("optim", optim)
        self.loss_cfg = with_defaults("module.loss", loss)
        self.long_video = with_defaults("module.long_video", long_video)
        if self.long_video["distribution"] not in ("uniform", "exponential"):
            raise ConfigError("module.long_video.distribution must be uniform or exponential")
        if self.long_video["positions"] not in LONG_VIDEO_POSITIONS:
            raise ConfigError(f"module.long_video.positions must be one of {LONG_VIDEO_POSITIONS}")
        self.model: StereoRefiner = build_refiner(**(model or {}))
        # Checkpoints may omit frozen weights that the config reloads (see on_save_checkpoint).
        self.strict_loading = False

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

    def step_counts(self, stage: str) -> list[int]:
        """All of eval.steps at test (Table 10: one trained model), the first at validation (the
        checkpoint's selection needs one)."""
        return self.eval_steps if stage == "test" else self.eval_steps[:1]

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

    def validation_step(self, batch: StereoClip, batch_idx: int) -> None:
        # the same sigma / noise every validation (comparable losses); manual_seed also seeds the
        # GPU, so its generator is forked too, or training would repeat its draws after each validation
        gpu = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=gpu):
            torch.manual_seed(batch_idx)
            loss, _ = self.compute_loss(batch)
        self.log("val/loss", loss, batch_size=batch.left.shape[0], sync_dist=True)
        self._evaluate(batch, batch_idx)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Leave out the frozen weights that `model.pretrained` provides again on load (img2vid-xt's
        CLIP image encoder and VAE: ~3 GB per checkpoint in fp32). The tiny default's VAE is kept: its
        cache can be retrained."""
        model_cfg = self.hparams.get("model") or {}
        if model_cfg.get("pretrained") is None:
            return
        frozen = ("model.embedding.",) if model_cfg.get("vae_path") else ("model.embedding.", "model.vae.")
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(frozen)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Loading is not strict (frozen weights may be absent), so check the trained ones are all there."""
        state = checkpoint.get("state_dict")  # DeepSpeed keeps weights outside this dict
        if state is None:
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
