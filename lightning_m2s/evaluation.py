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

from lightning_m2s import tags
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
    return {k: float(v) for k, v in (results[0] if results else {}).items()}, module.recorder.per_clip


def logged_metrics(cfg: DictConfig) -> set[str]:
    """The metric keys `train(cfg)` returns (`val/...` of a training variant's last validation, `test/...`),
    known from the config alone: what a sweep's objective may name."""
    from lightning_m2s.data.datamodule import DEFAULT_TEST, DEFAULT_VAL
    from lightning_m2s.metrics import metric_keys
    from lightning_m2s.modules import module_class
    from lightning_m2s.modules.base import dataset_name, eval_steps

    trains = module_class(cfg.module.variant).trains
    steps = eval_steps(to_container(cfg.module.eval)["steps"])
    names = metric_keys(cfg.module.eval.lpips_net is not None)
    sources = {"val": cfg.data.val_sources, "test": cfg.data.test_sources}
    defaults = {"val": DEFAULT_VAL, "test": DEFAULT_TEST}
    keys = {"val/loss"} if trains else set()
    for stage in ("val", "test") if trains else ("test",):
        entries = defaults[stage] if sources[stage] is None else to_container(sources[stage])
        counts = steps if stage == "test" and trains else steps[:1]  # as the module's step_counts
        keys |= {f"{stage}/steps", f"{stage}/latency_s"}
        for dataset in {dataset_name({"source": e["name"]}) for e in entries}:
            keys |= {f"{stage}/{dataset}/{name}" for name in names}
            if len(counts) > 1:
                keys |= {f"{stage}/{dataset}/steps{n}/{name}" for n in counts for name in names}
        if len(counts) > 1:
            keys |= {f"{stage}/steps{n}/latency_s" for n in counts}
    return keys


def evaluation_setup(cfg: DictConfig) -> dict:
    """What a floor's numbers depend on."""
    data = to_container(cfg.data)
    setup = {"format": FORMAT, "data": {k: data[k] for k in EVAL_DATA_KEYS}, "lpips_net": cfg.module.eval.lpips_net}
    # the warp and the MS-SSIM mode count where they differ from their defaults (earlier caches stay valid)
    for key, value, default in (("splat", data["splat"], "nearest"), ("ms_ssim", cfg.module.eval.ms_ssim, "per_frame")):
        if value != default:
            setup[key] = value
    return setup


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


def evaluate_checkpoint(checkpoint: str | Path, cfg: DictConfig, with_floors: bool = True) -> dict:
    """`m2s evaluate`: a trained checkpoint scored like a sweep trial's test stage (the same metrics,
    floors and per-clip rows) on cfg's test clips, logged to MLflow as a run of its own. The model comes
    from the checkpoint (or a model directory, e.g. the authors' model imported by m2s import-release);
    the test data and evaluation settings from cfg."""
    import time

    from mlflow.entities import Metric

    from lightning_m2s import tracking
    from lightning_m2s.config import work_root
    from lightning_m2s.modules import StereoModule, load_trained_weights, read_checkpoint

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir() and ((checkpoint / "latest").is_file() or (checkpoint / "checkpoint").is_dir()):
        read_checkpoint(str(checkpoint))  # a DeepSpeed folder: the error says how to convert it
    if checkpoint.is_dir():  # a model directory (m2s import-release): run as its record says; cfg chooses how
        from lightning_m2s.models.released import RUNTIME_KEYS, model_settings

        model = {**{k: cfg.model[k] for k in RUNTIME_KEYS if k in cfg.model}, **model_settings(checkpoint)}
        module = StereoModule(model=model, eval=to_container(cfg.module.eval))
    else:
        ckpt = read_checkpoint(str(checkpoint))  # weights only; ModelError naming the file
        module = StereoModule(model=ckpt["hyper_parameters"]["model"], eval=to_container(cfg.module.eval))
        load_trained_weights(module.model, ckpt["state_dict"], str(checkpoint))

    client = tracking.client(cfg.tracking.uri)
    exp_id = tracking.experiment_id(client, cfg.tracking.experiment, cfg.tracking.artifact_root)
    run_tags = {tags.KIND: tags.EVALUATE, tags.CHECKPOINT: str(checkpoint.resolve()), **tracking.metric_tags(cfg)}
    run_id = client.create_run(exp_id, run_name=f"evaluate-{checkpoint.stem}", tags=run_tags).info.run_id
    try:
        tracking.log_config(client, run_id, cfg)
        metrics, per_clip = test_module(module, cfg)
        floor_results = floors(cfg, work_root() / "outputs" / "floors") if with_floors else {}
        now = int(time.time() * 1000)
        logged = [Metric(k, v, now, 0) for k, v in metrics.items() if v == v]  # NaN: no clips of that kind
        logged += [Metric(f"floor/{variant}/{k}", v, now, 0) for variant, r in floor_results.items()
                   for k, v in r["metrics"].items() if k.startswith("test/") and v == v]
        for i in range(0, len(logged), 500):  # MLflow's batch limit
            client.log_batch(run_id, metrics=logged[i : i + 500])
        rows = {"rows": per_clip, "floors": {variant: r["per_clip"] for variant, r in floor_results.items()}}
        if module.recorder.per_clip_by_steps:
            rows["by_steps"] = {str(n): r for n, r in module.recorder.per_clip_by_steps.items()}
        out = work_root() / "outputs" / "evaluate" / f"{checkpoint.stem}-{run_id[:8]}"
        write_json(out / "test_per_clip.json", rows)
        client.log_artifact(run_id, str(out / "test_per_clip.json"), "metrics")
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return {"run_id": run_id, "metrics": metrics, "per_clip": str(out / "test_per_clip.json"),
            "floors": {variant: r["metrics"] for variant, r in floor_results.items()}}
