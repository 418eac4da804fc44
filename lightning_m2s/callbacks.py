"""Rank-zero callbacks: preview media of evaluation clips logged as MLflow artifacts.

For the first clips of each validation and test pass: a side-by-side GIF (left | output | ground
truth), a red-cyan anaglyph GIF of (left, output), and for test a `qualitative/<dataset>_clip<k>.npz`
with the middle frame's left, warped, mask, output and right (the notebook's qualitative grids).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import imageio.v3 as iio
import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from lightning_m2s.stereo_formats import anaglyph


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[T, 3, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def write_previews(previews: list[dict], folder: Path, stage: str, step: int) -> list[tuple[Path, str]]:
    """Write the media files; returns (file, artifact folder) pairs."""
    written, seen = [], {}
    for p in previews:
        k = seen[p["dataset"]] = seen.get(p["dataset"], -1) + 1  # clip number within its dataset
        left, output, right, warped = (to_uint8(p[name]) for name in ("left", "output", "right", "warped"))
        name = f"{p['dataset']}_clip{k}"
        sbs = folder / f"{name}_step{step}.gif" if stage == "val" else folder / f"{name}.gif"
        iio.imwrite(sbs, np.concatenate([left, warped, output, right], axis=2), duration=200, loop=0)
        written.append((sbs, f"previews/{stage}"))
        ana = folder / f"{name}_anaglyph{'_step%d' % step if stage == 'val' else ''}.gif"
        iio.imwrite(ana, anaglyph(torch.from_numpy(left), torch.from_numpy(output)).numpy(), duration=200, loop=0)
        written.append((ana, f"previews/{stage}"))
        if stage == "test":
            mid = left.shape[0] // 2
            npz = folder / f"{name}.npz"
            mask = p["mask"][mid, 0].numpy().astype(np.uint8) * 255
            np.savez_compressed(npz, left=left[mid], warped=warped[mid], mask=mask, output=output[mid], right=right[mid])
            written.append((npz, "qualitative"))
    return written


class MediaLogger(L.Callback):
    """Logs the module's previews (its recorder fills them during evaluation) to the run's artifacts."""

    @rank_zero_only
    def _log(self, trainer: L.Trainer, module, stage: str) -> None:
        logger = trainer.logger
        if logger is None or not module.recorder.previews or trainer.sanity_checking:
            return
        with tempfile.TemporaryDirectory() as tmp:
            for path, artifact_dir in write_previews(module.recorder.previews, Path(tmp), stage, trainer.global_step):
                logger.experiment.log_artifact(logger.run_id, str(path), artifact_dir)

    def on_validation_epoch_end(self, trainer, module) -> None:
        self._log(trainer, module, "val")

    def on_test_epoch_end(self, trainer, module) -> None:
        self._log(trainer, module, "test")
