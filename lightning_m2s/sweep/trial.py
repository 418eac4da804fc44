"""One trial of a sweep: its MLflow run (a child of the sweep's parent run), its config, training and
evaluation through `train.train`, and the objective value it returns to Optuna."""

from __future__ import annotations

import json
import logging
import os
import socket
import traceback
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from lightning_m2s import tags, tracking
from lightning_m2s.config import load_config
from lightning_m2s.errors import ConfigError
from lightning_m2s.sweep.spec import SweepSpec
from lightning_m2s.sweep.strategy import SearchStrategy

TRIAL_ENV = "M2S_SWEEP_TRIAL"  # the running trial's config, for the other ranks of a multi-device trial
log = logging.getLogger("lightning_m2s.sweep")


@dataclass
class TrialRunner:
    """The objective of a sweep's study: `study.optimize(TrialRunner(...), ...)`."""

    spec: SweepSpec
    strategy: SearchStrategy
    study: optuna.Study
    experiment: str
    user_overrides: list[str]  # the sweep file's and the command line's
    client: object  # an MlflowClient
    exp_id: str
    parent_id: str
    trials_dir: Path  # <outputs>/sweeps/<study>-<uid>: checkpoints never resume across studies
    tracking_uri: str | None = None
    devices_per_trial: int | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        arm, key, arm_overrides = self.strategy.suggest(trial)
        duplicate = self.strategy.duplicate_of(trial, self.study)
        if duplicate is not None:  # another worker took this grid point first
            raise optuna.TrialPruned(f"duplicate of trial {duplicate}")
        seed = trial.params.get("seed", 0)
        run_id = self._open_run(arm, key, seed)
        output_dir = self.trials_dir / key
        try:  # whatever stops the trial, its run is closed: never left RUNNING
            for tag, value in {tags.TRIAL_NUMBER: str(trial.number), **worker_tags()}.items():  # who runs it
                self.client.set_tag(run_id, tag, value)
            metrics = self._train(run_id, arm_overrides, output_dir)
        except Exception:
            close_failed(self.client, run_id, traceback.format_exc()[-4000:])
            raise
        except BaseException:  # a signal: train() closed its run already, unless it stopped before
            close_failed(self.client, run_id)
            raise
        value = float(metrics[self.spec.objective_metric])
        trial.set_user_attr("metrics", {k: float(v) for k, v in metrics.items()})
        trial.set_user_attr("run_id", run_id)
        trial.set_user_attr("output_dir", str(output_dir))
        # the number the grid ranks by, under a key that the MLflow compare view (metric keys in alphabetical
        # order, a short scrolling box) lists among the first rows
        self.client.log_metric(run_id, f"objective/{self.spec.objective_metric}", value)
        return value

    def _open_run(self, arm: str, key: str, seed: int) -> str:
        """The trial's run, found again when a retried trial resumes it."""
        run = tracking.find_or_create_run(
            self.client, self.exp_id,
            {tags.STUDY: self.study.study_name, tags.ARM: arm, tags.TRIAL_KEY: key, tags.KIND: tags.TRIAL}, key,
            {tags.PARENT_RUN: self.parent_id, tags.ABLATION: self.spec.name, tags.EXPERIMENT: self.experiment,
             tags.SEED: str(seed), tags.GIT_COMMIT: tracking.git_commit()})
        return run.info.run_id

    def _train(self, run_id: str, arm_overrides: list[str], output_dir: Path) -> dict[str, float]:
        from lightning_m2s.train import train

        overrides = self.user_overrides + arm_overrides + [
            f"tracking.run_id={run_id}", f"tracking.experiment=sweep-{self.spec.name}", f"meta.output_dir={output_dir}"]
        if self.tracking_uri:
            overrides.append(f"tracking.uri={self.tracking_uri}")
        if self.devices_per_trial:
            overrides.append(f"trainer.devices={self.devices_per_trial}")
        os.environ[TRIAL_ENV] = json.dumps([self.experiment, overrides])  # inherited by DDP rank processes
        metrics = train(load_config(self.experiment, overrides))
        if self.spec.objective_metric not in metrics:
            raise ConfigError(f"sweep {self.spec.name}: objective metric {self.spec.objective_metric!r} not among "
                              f"{sorted(metrics)}")
        return metrics


def worker_tags() -> dict[str, str]:
    """What the process running a trial is: its host and pid, the accelerators it sees, its CPU threads."""
    return {tags.WORKER: f"{socket.gethostname()}:{os.getpid()}",
            tags.CUDA_VISIBLE_DEVICES: os.environ.get("CUDA_VISIBLE_DEVICES", "(all)"),
            tags.TORCH_THREADS: str(torch.get_num_threads())}


def close_failed(client, run_id: str, error: str | None = None) -> None:
    """Mark a run FAILED, with the traceback as its error tag when there is one (a run that trained and then
    failed the sweep, e.g. on a missing metric, too); without an error, only a run that is still RUNNING.
    A store that fails as well is only logged: the trial's own error is the one reported."""
    try:
        if error is not None:
            client.set_tag(run_id, tags.ERROR, error)
        if error is not None or client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="FAILED")
    except Exception as err:  # noqa: BLE001
        log.warning("could not mark run %s failed: %s", run_id, err)


def run_rank_trial() -> bool:
    """In an extra rank process of a multi-device trial (Lightning's launcher re-runs the sweep command for
    ranks > 0), join rank 0's trial with its exact config instead of starting a trial of another arm."""
    if int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0))) == 0 or TRIAL_ENV not in os.environ:
        return False
    from lightning_m2s.train import train

    experiment, overrides = json.loads(os.environ[TRIAL_ENV])
    train(load_config(experiment, overrides))
    return True
