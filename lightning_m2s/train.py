"""train(cfg) -> metrics: fit one variant, test it, log everything to MLflow (`m2s train` calls it).

An interrupted run started again with the same output folder resumes from its last checkpoint into
the same MLflow run (the run id is kept beside the checkpoints).
"""

from __future__ import annotations

import json
import logging
import signal
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from lightning_m2s import tags, tracking
from lightning_m2s.callbacks import MediaLogger
from lightning_m2s.checkpoints import (AtomicCheckpointIO, LastCheckpoint, SignalLog, interrupt_signal, remove_temporaries,
                                       resumable_checkpoint)
from lightning_m2s.config import to_container, work_root
from lightning_m2s.data.datamodule import StereoDataModule
from lightning_m2s.errors import ConfigError, Interrupted, M2SError
from lightning_m2s.files import write_json
from lightning_m2s.metrics import RELEASED_MS_SSIM_MIN_SIDE
from lightning_m2s.modules import load_trained_weights, module_class, read_checkpoint

log = logging.getLogger(__name__)
PER_CLIP_FILE = "test_per_clip.json"
# The frozen VAE and frame embedding stay in eval mode on purpose.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
# Evaluation metrics are gathered over ranks by torchmetrics before they are logged.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val|test)/")


def output_dir(cfg: DictConfig) -> Path:
    if cfg.meta.output_dir:
        return Path(cfg.meta.output_dir)
    return work_root() / "outputs" / cfg.meta.experiment / (cfg.meta.run_name or "default")


def build_module(cfg: DictConfig):
    """The variant's LightningModule from the resolved config."""
    if cfg.module.eval.ms_ssim == "released" and cfg.data.eval_size <= RELEASED_MS_SSIM_MIN_SIDE:
        raise ConfigError(f"module.eval.ms_ssim=released needs data.eval_size > {RELEASED_MS_SSIM_MIN_SIDE} "
                          f"(pytorch_msssim's bound), got {cfg.data.eval_size}; use per_frame")
    cls = module_class(cfg.module.variant)
    if not cls.trains:  # a floor: it only predicts
        return cls(eval=to_container(cfg.module.eval))
    return cls(
        model=to_container(cfg.model), optim=to_container(cfg.optim), loss=to_container(cfg.module.loss),
        eval=to_container(cfg.module.eval), long_video=to_container(cfg.module.long_video),
    )


class PatientMLFlowLogger(MLFlowLogger):
    """MLFlowLogger that waits out a locked local store: MLflow gives a sqlite lock 20 s (its busy timeout),
    and another process's long write (a dashboard, a sweep worker, a sqlite shell) can hold it longer;
    the training run then waits instead of stopping."""

    def log_metrics(self, metrics, step=None) -> None:
        tracking.wait_out_lock(lambda: super(PatientMLFlowLogger, self).log_metrics(metrics, step))

    def log_hyperparams(self, params) -> None:
        tracking.wait_out_lock(lambda: super(PatientMLFlowLogger, self).log_hyperparams(params))


def _logger(cfg: DictConfig, out: Path) -> MLFlowLogger:
    """The MLflow logger; the run id is remembered in the output folder so a restart resumes its run."""
    uri = tracking.resolve_uri(cfg.tracking.uri)
    run_id = cfg.tracking.run_id
    id_file = out / "mlflow_run_id"
    if not run_id and cfg.checkpoint.resume and id_file.exists():
        run_id = id_file.read_text().strip()
    client = tracking.client(uri)
    exp_id = tracking.experiment_id(client, cfg.tracking.experiment, cfg.tracking.artifact_root)
    if run_id and not tracking.run_exists(client, run_id):
        if cfg.tracking.run_id:
            raise M2SError(f"tracking.run_id {run_id}: no such run in {uri}")
        log.warning("%s names run %s, which %s does not have (another store?): starting a new run", id_file, run_id, uri)
        run_id = None
    if not run_id:
        run = client.create_run(exp_id, run_name=cfg.meta.run_name or cfg.meta.experiment, tags={
            tags.KIND: tags.TRAIN, tags.EXPERIMENT: cfg.meta.experiment, tags.GIT_COMMIT: tracking.git_commit(),
        })
        run_id = run.info.run_id
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id)
    tracking.log_config(client, run_id, cfg)
    client.set_tag(run_id, tags.VARIANT, cfg.module.variant)
    for key, value in tracking.metric_tags(cfg).items():
        client.set_tag(run_id, key, value)
    return PatientMLFlowLogger(experiment_name=cfg.tracking.experiment, tracking_uri=uri, run_id=run_id,
                               log_model=False)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (unless the variant is a training-free baseline), test, and return the metrics: `test/...` of
    the best checkpoint, and `val/...` of the last validation."""
    uri = tracking.resolve_uri(cfg.tracking.uri)
    tracking.check_server(uri)  # before any work: MLflow's client retries a dead server for minutes
    try:
        return _train(cfg)
    except Exception as err:  # a tracking store that fails mid-run: one line naming it, not MLflow's tracebacks
        failure = tracking.store_failure(err, uri)
        if failure is None:
            raise
        last = output_dir(cfg) / "checkpoints" / "last.ckpt"
        if last.is_file():
            failure.args = (f"{failure}; last checkpoint {last}",)
        raise failure from err


def _train(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(cfg.meta.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    out = _prepare_output(cfg)
    datamodule = StereoDataModule(**to_container(cfg.data))
    module = build_module(cfg)
    logger = _logger(cfg, out)
    logger.experiment.log_artifact(logger.run_id, str(out / "config.yaml"))
    trainer, best, last = _trainer(cfg, module, logger, out)
    signals = SignalLog()
    try:
        validation = _fit(cfg, trainer, module, datamodule, logger, best, signals) if module.trains else {}
        with signals:
            results = trainer.test(module, datamodule=datamodule, ckpt_path="best" if best.best_model_path else None,
                                   verbose=False, weights_only=True)
    except BaseException as err:
        signum = interrupt_signal(trainer, signals, err)
        if trainer.is_global_zero:
            _mark_failed(logger, err, signum)
        if signum is not None:
            raise Interrupted(signum, last.path if last.path.is_file() else None) from err
        raise
    metrics = {**validation, **{k: float(v) for k, v in (results[0] if results else {}).items()}}
    if trainer.is_global_zero:
        # every clip's test metrics: what paired comparisons between runs need (lightning_m2s.stats); with
        # several eval step counts "rows" holds the first's and "by_steps" each count's
        per_clip = {"rows": module.recorder.per_clip}
        if module.recorder.per_clip_by_steps:
            per_clip["by_steps"] = {str(n): rows for n, rows in module.recorder.per_clip_by_steps.items()}
        write_json(out / PER_CLIP_FILE, per_clip)
        logger.experiment.log_artifact(logger.run_id, str(out / PER_CLIP_FILE), "metrics")
        logger.experiment.set_terminated(logger.run_id, status="FINISHED")
    return metrics


def _prepare_output(cfg: DictConfig) -> Path:
    """The run's folder with its config.yaml; refused when it holds another run's checkpoints."""
    out = output_dir(cfg)
    remove_temporaries(out / "checkpoints")  # what a save killed mid-write left
    if not cfg.checkpoint.resume and any((out / "checkpoints").glob("*.ckpt*")):
        raise M2SError(f"{out / 'checkpoints'} holds checkpoints of an earlier run: set checkpoint.resume=true to "
                       "continue it, or choose another meta.output_dir / meta.run_name")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return out


def _trainer(cfg: DictConfig, module, logger, out: Path) -> tuple[L.Trainer, ModelCheckpoint, LastCheckpoint]:
    """The Trainer with its checkpointing: best.ckpt (ModelCheckpoint) and last.ckpt (LastCheckpoint alone)."""
    best = ModelCheckpoint(dirpath=out / "checkpoints", save_last=False, monitor=cfg.checkpoint.monitor,
                           mode=cfg.checkpoint.monitor_mode, save_top_k=1, filename="best",
                           enable_version_counter=False)
    last = LastCheckpoint(out / "checkpoints" / "last.ckpt", cfg.checkpoint.every_n_steps)
    kwargs = to_container(cfg.trainer)
    callbacks = [best, last, MediaLogger()] if module.trains else [MediaLogger()]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, cfg.trainer.log_every_n_steps)))
    if "deepspeed" not in str(cfg.trainer.strategy):  # DeepSpeed writes checkpoint folders of its own
        kwargs["plugins"] = [AtomicCheckpointIO()]
    trainer = L.Trainer(logger=logger, default_root_dir=out, callbacks=callbacks,
                        enable_checkpointing=module.trains, **kwargs)
    return trainer, best, last


def _fit(cfg: DictConfig, trainer: L.Trainer, module, datamodule, logger, best: ModelCheckpoint,
         signals: SignalLog) -> dict[str, float]:
    """Fit from last.ckpt (resume) or checkpoint.init_from (fine-tune); the last validation's figures, what
    a hyperparameter search may select on (never test/)."""
    found = resumable_checkpoint(Path(best.dirpath)) if cfg.checkpoint.resume else None
    if found:
        log.info("resuming from %s", found)
    elif cfg.checkpoint.init_from:  # fine-tuning: trained weights in, optimiser and step counter fresh
        load_trained_weights(module.model, read_checkpoint(cfg.checkpoint.init_from)["state_dict"],
                             f"checkpoint.init_from {cfg.checkpoint.init_from}")
        logger.experiment.set_tag(logger.run_id, tags.INIT_FROM, str(cfg.checkpoint.init_from))
    with signals:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(found) if found else None, weights_only=True)
    if best.best_model_path:
        logger.experiment.set_tag(logger.run_id, tags.CHECKPOINT, best.best_model_path)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def _mark_failed(logger, err: BaseException, signum: int | None) -> None:
    """The run FAILED, tagged with the signal that stopped it; a store that fails too is only logged."""
    try:
        if signum is not None:
            logger.experiment.set_tag(logger.run_id, tags.INTERRUPTED, signal.Signals(signum).name)
        logger.experiment.set_terminated(logger.run_id, status="FAILED")
    except Exception:  # noqa: BLE001 - the store failed too (read-only, gone): the run's own error counts
        if tracking.store_failure(err, "") is None:
            log.warning("MLflow run %s could not be marked FAILED", logger.run_id)


def read_per_clip(out: Path) -> list[dict]:
    """The per-clip test rows a finished run wrote into its output folder."""
    return json.loads((Path(out) / PER_CLIP_FILE).read_text())["rows"]

