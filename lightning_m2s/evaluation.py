"""Test-only evaluation outside training: the training-free floors of a grid, cached per evaluation setup.

Every grid carries its floors: warp-only (holes black) and classical fill (background-side row fill),
scored by the same test loop and metrics as the trained arms, on exactly the grid's test clips. They
depend only on the evaluation setup (test sources, clip count, size, frames, fps, mask closing, LPIPS
backbone), so they are computed once per setup and cached in `<outputs>/floors/<key>.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from lightning_m2s.config import to_container
from lightning_m2s.data.datamodule import StereoDataModule
from lightning_m2s.files import write_json

log = logging.getLogger(__name__)

FLOORS = ("warp_only", "classical_fill")
FORMAT = 1  # bump when the metrics change: every cached floor is recomputed
EVAL_DATA_KEYS = ("test_sources", "test_clips", "eval_frames", "eval_size", "eval_fps", "close_kernel")


def test_module(module, cfg: DictConfig) -> tuple[dict[str, float], list[dict]]:
    """Run the test loop of `module` on the config's test clips: (metrics, per-clip rows)."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator=cfg.trainer.accelerator, devices=1,
                        enable_progress_bar=cfg.trainer.enable_progress_bar, enable_model_summary=False,
                        limit_test_batches=cfg.trainer.limit_test_batches)
    results = trainer.test(module, datamodule=StereoDataModule(**to_container(cfg.data)), verbose=False)
    return {k: float(v) for k, v in (results[0] if results else {}).items()}, module.per_clip


def evaluation_setup(cfg: DictConfig) -> dict:
    """What a floor's numbers depend on."""
    data = to_container(cfg.data)
    return {"format": FORMAT, "data": {k: data[k] for k in EVAL_DATA_KEYS}, "lpips_net": cfg.module.eval.lpips_net}


def floor_key(cfg: DictConfig) -> str:
    return hashlib.sha256(json.dumps(evaluation_setup(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def floors(cfg: DictConfig, cache_dir: str | Path) -> dict[str, dict]:
    """{variant: {"metrics": {...}, "per_clip": [...]}} for warp_only and classical_fill on cfg's test clips."""
    from lightning_m2s.modules import module_class

    path = Path(cache_dir) / f"{floor_key(cfg)}.json"
    if path.is_file():
        return json.loads(path.read_text())["floors"]
    out = {}
    for variant in FLOORS:
        log.info("floor %s on the grid's test clips", variant)
        module = module_class(variant)(eval=to_container(cfg.module.eval))
        metrics, per_clip = test_module(module, cfg)
        out[variant] = {"metrics": metrics, "per_clip": per_clip}
    write_json(path, {"setup": evaluation_setup(cfg), "floors": out})
    return out
