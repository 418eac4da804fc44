"""run_sweep: an Optuna study for a sweep file, one MLflow parent run per sweep, a child run per trial.

An interrupted sweep resumes where it stopped: a trial whose process died is failed and re-queued, finished
points are never run again, and a trial that raises is recorded as failed while the sweep goes on. At the
end (`finish`) the grid's floors are scored on its test clips and the comparison goes on the parent run.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import optuna

from lightning_m2s import tags, tracking
from lightning_m2s.config import load_config, work_root
from lightning_m2s.evaluation import floors
from lightning_m2s.sweep.spec import SweepSpec, check_sweep, load_sweep, name_of_study, sweep_overrides
from lightning_m2s.sweep.storage import elect_parent_run, open_storage
from lightning_m2s.sweep.strategy import SearchStrategy, done_points, strategy_for
from lightning_m2s.sweep.summary import SweepResult, summarize
from lightning_m2s.sweep.trial import TrialRunner, close_failed, run_rank_trial

log = logging.getLogger("lightning_m2s.sweep")


def run_sweep(
    name: str | Path,
    experiment: str | None = None,
    overrides: list[str] | None = None,
    trials: int | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    seed: int = 0,
    output_root: str | Path | None = None,
    devices_per_trial: int | None = None,
    finish: bool = True,
) -> SweepResult | None:
    """Run (or resume) a sweep; None in the extra rank processes of a multi-device trial.

    Checkpoints go under `<output_root>/sweeps/<study>-<study id>/<arm>-seed<k>` (default output_root:
    outputs/ in the working root, config.work_root). `devices_per_trial` sets every trial's
    trainer.devices without making it another study (a worker's devices are not a setting of the grid).
    finish=False only runs trials: no floors, table or parent-run summary (the launcher of several workers
    does that once, after them).

    A grid worker (trials=None) leaves when the grid is settled: while other workers hold grid points it
    waits, and runs here any of their trials that a stale heartbeat re-queues (a worker that died)."""
    if run_rank_trial():
        return None
    # 1. Check everything a trial will need before any trial trains
    spec = load_sweep(name)
    experiment = experiment or spec.experiment
    user_overrides = sweep_overrides(spec, overrides)
    tracking.check_server(tracking.resolve_uri(tracking_uri))  # a dead server would stall every trial
    cfg = check_sweep(spec, experiment, user_overrides)  # fail before any trial on a bad key or metric
    strategy = strategy_for(spec)

    # 2. The study (resumed when it exists) and the sweep's parent run
    storage_url = storage or f"sqlite:///{work_root() / 'optuna.db'}"
    study = optuna.create_study(
        study_name=name_of_study(spec, experiment, overrides, cfg),
        storage=open_storage(storage_url, spec.heartbeat["interval"], spec.heartbeat["grace"]),
        sampler=strategy.sampler(seed), direction=spec.direction, load_if_exists=True,
    )
    study.set_user_attr("sweep", spec.name)
    if "uid" not in study.user_attrs:  # this study's identity: another storage's study of the same name differs
        study.set_user_attr("uid", uuid.uuid4().hex[:8])
    study.set_user_attr("objective", spec.objective_metric)
    client = tracking.client(tracking_uri)
    exp_id = tracking.experiment_id(client, f"sweep-{spec.name}")
    parent_id = _parent_run(client, exp_id, storage_url, study.study_name, spec, experiment)
    outputs = Path(output_root or work_root() / "outputs")
    runner = TrialRunner(spec, strategy, study, experiment, user_overrides, client, exp_id, parent_id,
                         outputs / "sweeps" / f"{study.study_name}-{study.user_attrs['uid']}", tracking_uri,
                         devices_per_trial)

    # 3. The trials, then the summary (and with `finish`, the floors, the table and the parent's end)
    n_trials = strategy.trials_to_run(study, trials)
    first_new = len(study.trials)
    try:
        if n_trials > 0:
            log.info("sweep %s: %d trial(s) to run", study.study_name, n_trials)
            study.optimize(runner, n_trials=n_trials, catch=(Exception,), show_progress_bar=True)
        while strategy.retry_queued(study, trials):
            study.optimize(runner, n_trials=1, catch=(Exception,))  # a dead worker's trial, re-queued
        return _finish(study, spec, strategy, runner, outputs, first_new, finish)
    except BaseException:  # SIGTERM / SIGINT (the trial and its run are failed already), or the table failed
        close_failed(client, parent_id)
        raise


def _parent_run(client, exp_id: str, storage_url: str, study_name: str, spec: SweepSpec, experiment: str) -> str:
    """The sweep's parent run (one per study, whichever worker makes it), RUNNING again."""
    parent_id = elect_parent_run(client, exp_id, storage_url, {tags.STUDY: study_name, tags.KIND: tags.SWEEP},
                                 study_name, {
        tags.ABLATION: spec.name, tags.EXPERIMENT: experiment, tags.GIT_COMMIT: tracking.git_commit(),
        tags.OBJECTIVE: spec.objective_metric, tags.NOTE: spec.description,
    }).info.run_id
    client.set_terminated(parent_id, status="RUNNING")
    return parent_id


def _finish(study, spec: SweepSpec, strategy: SearchStrategy, runner: TrialRunner, outputs: Path, first_new: int,
            finish: bool) -> SweepResult:
    """The sweep's result; with `finish`, also the floors and the table on the parent run, and the parent
    run's end status (strategy.outcome)."""
    client, parent_id = runner.client, runner.parent_id
    floor_results = {}
    if spec.is_grid and finish:
        floor_results, floor_cfg = grid_floors(runner.experiment, runner.user_overrides, outputs)
        log_floors(client, parent_id, floor_results)
        for key, value in tracking.metric_tags(floor_cfg).items():  # the settings the floors were scored with
            client.set_tag(parent_id, key, value)
    result = summarize(study, spec, parent_id, client if finish else None, floor_results)
    done = done_points(study)  # a failed trial whose point a retry finished is no failure of this run
    result.failed_now = [t for t in result.trials
                         if t.number >= first_new and t.state == "FAIL" and (t.arm, t.seed) not in done]
    result.complete, status = strategy.outcome(study, result.failed_now)
    if not finish:  # the caller finishes the grid once (a launcher, after all its workers)
        return result
    if spec.is_grid and result.comparison["means"]:
        from lightning_m2s import report

        tracking.log_json_artifact(client, parent_id, result.comparison, "comparison", "comparison.json")
        report.log_summary(client, parent_id, result, runner.tracking_uri)
    if status is not None:
        client.set_terminated(parent_id, status=status)
    return result


def grid_floors(experiment: str, user_overrides: list[str], outputs: Path) -> tuple[dict, object]:
    """The grid's floors on exactly its test clips, cached per evaluation setup; and their config."""
    from filelock import FileLock

    cfg = load_config(experiment, user_overrides)
    (outputs / "floors").mkdir(parents=True, exist_ok=True)
    with FileLock(outputs / "floors" / ".lock"):  # workers that finish together compute them once
        return floors(cfg, outputs / "floors"), cfg


def prepare_floors(name: str | Path, experiment: str | None = None, overrides: list[str] | None = None,
                   output_root: str | Path | None = None) -> None:
    """Score a grid's floors into the cache now (a launcher does it while its workers train)."""
    spec = load_sweep(name)
    if spec.is_grid:
        grid_floors(experiment or spec.experiment, sweep_overrides(spec, overrides),
                    Path(output_root or work_root() / "outputs"))


def log_floors(client, parent_id: str, floor_results: dict[str, dict]) -> None:
    """The floors' test metrics on the sweep's parent run: floor/<variant>/test/<dataset>/<metric>."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(f"floor/{variant}/{k}", v, now, 0) for variant, r in floor_results.items()
               for k, v in r["metrics"].items() if k.startswith("test/") and v == v]
    for i in range(0, len(metrics), 500):
        client.log_batch(parent_id, metrics=metrics[i : i + 500])
