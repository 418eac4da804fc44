"""Ablation sweeps: Optuna studies from sweeps/*.yaml, one MLflow parent run per sweep, a child per trial.

A sweep file names its study, the experiment it starts from, and either `arms` (named sets of config
overrides, run as a GridSampler grid over arm x seed: the paper's ablation tables) or a
`search_space` (sampled by TPE or random: hyperparameter search). Each trial loads the experiment with
its overrides, trains and evaluates it through `train.train`, and returns the objective metric.

The Optuna storage is an RDB (sqlite by default, a PostgreSQL URL for several machines) with
heartbeats, so an interrupted sweep resumes where it stopped: a trial whose process died is marked
failed and re-queued, finished arms are never run again, and a trial that raises is recorded as failed
while the sweep goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lightning_m2s import tracking
from lightning_m2s.config import SWEEPS_DIR, check_name, load_config, resolve_file, to_container, work_root
from lightning_m2s.errors import ConfigError, Interrupted
from lightning_m2s.evaluation import floors
from lightning_m2s.models import embedded

TRIAL_ENV = "M2S_SWEEP_TRIAL"  # the running trial's config, for the other ranks of a multi-device trial
SWEEP_KEYS = {"study", "description", "experiment", "sampler", "arms", "seeds", "search_space", "trials",
              "objective", "overrides", "table", "heartbeat", "slurm"}
SCHEMA_LOCK = 0x6D3273  # storage lock held while a worker creates the study schema
PARENT_LOCK = 0x6D3274  # storage lock held while a worker finds or creates the sweep's parent run
HEARTBEAT_KEYS = {"interval", "grace"}  # seconds between a worker's heartbeats; silence before its trial is retried
SLURM_KEYS = {"partition", "workers", "devices_per_trial", "time_min", "additional"}  # --launcher slurm defaults
log = logging.getLogger(__name__)


@dataclass
class SweepSpec:
    """A parsed sweeps/<name>.yaml."""

    name: str
    study: str
    experiment: str
    objective_metric: str
    direction: str
    sampler: str = "grid"
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    search_space: dict[str, dict[str, Any]] = field(default_factory=dict)
    trials: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    table: str = ""
    heartbeat: dict[str, int] = field(default_factory=lambda: {"interval": 30, "grace": 120})
    slurm: dict[str, Any] = field(default_factory=dict)

    @property
    def grid(self) -> dict[str, list]:
        return {"arm": list(self.arms), "seed": list(self.seeds)}

    @property
    def grid_size(self) -> int:
        return len(self.arms) * len(self.seeds)


def load_sweep(name: str | Path) -> SweepSpec:
    path = resolve_file(name, SWEEPS_DIR, "sweep")
    try:
        raw = to_container(OmegaConf.load(path))
    except Exception as err:  # noqa: BLE001 - YAML syntax (the parser names line and column), unreadable file
        raise ConfigError(f"{path}: cannot read YAML: {' '.join(str(err).split())}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file must be a mapping of keys, got {type(raw).__name__}")
    unknown = set(raw) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(SWEEP_KEYS)}")
    for key in ("study", "objective"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key {key!r}")
    objective = raw["objective"]
    if not isinstance(objective, dict) or set(objective) != {"metric", "direction"}:
        raise ConfigError(f"{path}: objective must be {{metric: ..., direction: minimize|maximize}}")
    if objective["direction"] not in ("minimize", "maximize"):
        raise ConfigError(f"{path}: objective.direction must be minimize or maximize, got {objective['direction']!r}")
    sampler = raw.get("sampler", "grid")
    if sampler == "grid" and not raw.get("arms"):
        raise ConfigError(f"{path}: a grid sweep needs `arms` (name -> config overrides)")
    if sampler in ("tpe", "random") and not raw.get("search_space"):
        raise ConfigError(f"{path}: a {sampler} sweep needs `search_space`")
    if sampler not in ("grid", "tpe", "random"):
        raise ConfigError(f"{path}: sampler must be grid, tpe or random, got {sampler!r}")
    check_name(str(raw["study"]), f"{path}: study")
    for arm in raw.get("arms") or {}:
        check_name(str(arm), f"{path}: arm")
    heartbeat = {"interval": 30, "grace": 120, **_section(raw, "heartbeat", HEARTBEAT_KEYS, path)}
    if not all(isinstance(v, int) for v in heartbeat.values()) or not 0 < heartbeat["interval"] < heartbeat["grace"]:
        raise ConfigError(f"{path}: heartbeat needs whole seconds 0 < interval < grace, got {heartbeat}")
    return SweepSpec(
        name=path.stem,
        study=raw["study"],
        experiment=raw.get("experiment", "tiny"),
        objective_metric=objective["metric"],
        direction=objective["direction"],
        sampler=sampler,
        arms={k: dict(v or {}) for k, v in (raw.get("arms") or {}).items()},
        seeds=list(raw.get("seeds", [0])),
        search_space=raw.get("search_space") or {},
        trials=raw.get("trials"),
        overrides=raw.get("overrides") or {},
        description=raw.get("description", ""),
        table=raw.get("table", ""),
        heartbeat=heartbeat,
        slurm=_section(raw, "slurm", SLURM_KEYS, path),
    )


def _section(raw: dict, key: str, allowed: set[str], path: Path) -> dict:
    section = raw.get(key) or {}
    if not isinstance(section, dict) or set(section) - allowed:
        raise ConfigError(f"{path}: {key} takes the keys {sorted(allowed)}, got {section!r}")
    return section


@contextlib.contextmanager
def storage_lock(url: str, key: int):
    """An exclusive lock that every worker of a storage shares: a file lock beside a sqlite database, a
    PostgreSQL advisory lock (workers on any machine). Yields False where the storage has none."""
    url = tracking.sqlalchemy_url(url)
    if url.startswith("sqlite:///"):
        from filelock import FileLock

        with FileLock(url.removeprefix("sqlite:///") + f".{key:x}.lock"):
            yield True
    elif url.startswith("postgresql"):
        import sqlalchemy

        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({key})"))  # released when it closes
            yield True
    else:
        yield False


def elect_parent_run(client, exp_id: str, storage_url: str, tags: dict[str, str], run_name: str,
                     extra_tags: dict[str, str]):
    """The sweep's parent run, found or created. Every worker of a sweep starts here at once: one at a time
    (the storage's lock) looks and creates, so exactly one run is made however late a create request lands
    on a busy tracking server; a storage without a lock falls back to settling on the oldest run."""
    with storage_lock(storage_url, PARENT_LOCK) as locked:
        return tracking.find_or_create_run(client, exp_id, tags, run_name, extra_tags,
                                           settle_s=0 if locked else tracking.RACE_SETTLE_S)


def _storage(url: str, heartbeat_interval: int = 30, grace_period: int = 120):
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = tracking.sqlalchemy_url(url)
    with storage_lock(url, SCHEMA_LOCK):  # creating the schema twice at once collides: one worker at a time
        # Heartbeats let a later run (or another worker) see that a trial's process died: it is failed
        # and re-queued once instead of staying RUNNING forever.
        return RDBStorage(
            url,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
            engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
        )


def _sampler(spec: SweepSpec, seed: int):
    import optuna

    class Grid(optuna.samplers.GridSampler):
        """GridSampler that never stops the study itself: run_sweep bounds the trials, and re-queued
        failed points (enqueued trials, which carry no grid id) would otherwise end it early."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

    if spec.sampler == "grid":
        return Grid(spec.grid, seed=seed)
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def _suggest(trial, spec: SweepSpec) -> tuple[str, list[str]]:
    """The trial's arm name and its config overrides (key=value strings)."""
    if spec.sampler == "grid":
        arm = trial.suggest_categorical("arm", list(spec.arms))
        seed = trial.suggest_categorical("seed", list(spec.seeds))
        overrides = {**spec.arms[arm], "meta.seed": seed}
        return arm, [f"{k}={_yaml_value(v)}" for k, v in overrides.items()]
    overrides = {}
    for key, dist in spec.search_space.items():
        kind = dist.get("type", "float")
        if kind == "float":
            overrides[key] = trial.suggest_float(key, dist["low"], dist["high"], log=dist.get("log", False))
        elif kind == "int":
            overrides[key] = trial.suggest_int(key, dist["low"], dist["high"], log=dist.get("log", False))
        elif kind == "categorical":
            overrides[key] = trial.suggest_categorical(key, dist["choices"])
        else:
            raise ConfigError(f"sweep {spec.name}: search_space.{key}.type must be float, int or categorical")
    original = trial.system_attrs.get("failed_trial")  # a retry of a dead worker's trial resumes that trial
    return f"trial{trial.number if original is None else original}", [f"{k}={_yaml_value(v)}" for k, v in overrides.items()]


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)  # JSON is YAML flow syntax, which the dotlist parser reads
    return str(value)


def _duplicate_of(trial, study) -> int | None:
    """Another live or finished trial of the same grid point with a lower number (workers may race)."""
    from optuna.trial import TrialState

    for other in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE)):
        if other.number < trial.number and other.params == trial.params:
            return other.number
    return None


def _points(study, states) -> set[tuple]:
    return {(t.params.get("arm"), t.params.get("seed")) for t in study.get_trials(deepcopy=False, states=states)
            if "arm" in t.params}


def grid_done(study) -> set[tuple]:
    from optuna.trial import TrialState

    return _points(study, (TrialState.COMPLETE,))


def _requeue_failed(study) -> int:
    """Queue once more each grid point whose trials all failed (a re-run retries them); returns the count."""
    from optuna.trial import TrialState

    settled = _points(study, (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))
    failed = _points(study, (TrialState.FAIL,)) - settled
    for arm, seed in sorted(failed, key=str):
        study.enqueue_trial({"arm": arm, "seed": seed})
    return len(failed)


def _wait_for_others(study, poll_s: float) -> bool:
    """Wait while other workers hold trials: True as soon as one is queued to run here (a trial whose
    worker died, failed and re-queued once its heartbeat is older than the grace period), False when no
    trial is running any more."""
    import time

    import optuna
    from optuna.trial import TrialState

    waited, idle = False, 0
    while True:
        optuna.storages.fail_stale_trials(study)
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return True
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if _last_heartbeat(study, t) is not None]  # without a heartbeat it can never be retried
        if running:
            idle = 0
            if not waited:
                log.info("waiting for trial(s) %s of other workers (retried here if their worker dies)",
                         ", ".join(str(t.number) for t in running))
                waited = True
            time.sleep(poll_s)
            continue
        if idle:  # nothing held, twice: settled
            return False
        # Look once more shortly: another worker may be between failing a dead trial and queuing its
        # retry, or starting a trial whose first heartbeat is not written yet.
        idle += 1
        time.sleep(min(poll_s, 2))


def worker_tags() -> dict[str, str]:
    """What the process running a trial is: its host and pid, the accelerators it sees, its CPU threads."""
    import socket

    import torch

    return {"m2s.worker": f"{socket.gethostname()}:{os.getpid()}",
            "m2s.cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "(all)"),
            "m2s.torch_threads": str(torch.get_num_threads())}


def check_sweep(spec: SweepSpec, experiment: str, user_overrides: list[str]):
    """Resolve every arm's config (a search space's at its bounds) and check that each logs the objective
    metric, so a typo is an error before any trial trains. Returns the config without arm overrides."""
    import difflib

    from lightning_m2s.evaluation import logged_metrics

    cfg = load_config(experiment, user_overrides)
    if spec.sampler == "grid":
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in spec.seeds):
            raise ConfigError(f"sweep {spec.name}: seeds must be whole numbers, got {spec.seeds}")
        arms = {f"arm {arm!r}": [f"{k}={_yaml_value(v)}" for k, v in overrides.items()]
                for arm, overrides in spec.arms.items()}
    else:
        arms = {f"search_space bound {i}": [f"{k}={_yaml_value(v)}" for k, v in point.items()]
                for i, point in enumerate(_search_space_bounds(spec))}
    for where, overrides in arms.items():
        try:
            arm_cfg = load_config(experiment, user_overrides + overrides)
            logged = logged_metrics(arm_cfg)
        except ConfigError as err:
            raise ConfigError(f"sweep {spec.name}, {where}: {err}") from err
        if spec.objective_metric not in logged:
            close = difflib.get_close_matches(spec.objective_metric, sorted(logged), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; it logs {sorted(logged)}"
            raise ConfigError(f"sweep {spec.name}: objective.metric {spec.objective_metric!r} is not logged by "
                              f"experiment {experiment} ({where}){hint}")
    return cfg


def check_sweep_file(name: str | Path, experiment: str | None = None, overrides: list[str] | None = None,
                     tracking_uri: str | None = None) -> None:
    """What run_sweep checks before any trial, for a launcher to check before it starts workers or jobs."""
    spec = load_sweep(name)
    tracking.check_server(tracking.resolve_uri(tracking_uri))
    check_sweep(spec, experiment or spec.experiment, _sweep_overrides(spec, overrides))


def _search_space_bounds(spec: SweepSpec) -> list[dict[str, Any]]:
    """The corners a search space can reach: every key at its low, then at its high (or first / last choice)."""
    low, high = {}, {}
    for key, dist in spec.search_space.items():
        kind = dist.get("type", "float") if isinstance(dist, dict) else None
        if kind in ("float", "int") and {"low", "high"} <= set(dist):
            low[key], high[key] = dist["low"], dist["high"]
        elif kind == "categorical" and dist.get("choices"):
            low[key], high[key] = dist["choices"][0], dist["choices"][-1]
        else:
            raise ConfigError(f"sweep {spec.name}: search_space.{key} must be {{type: float|int, low, high}} or "
                              f"{{type: categorical, choices: [...]}}, got {dist!r}")
    return [low, high]


def name_of_study(spec: SweepSpec, experiment: str, overrides: list[str] | None, cfg) -> str:
    """The Optuna study of a grid: other settings (overrides, an edited experiment file, other default
    data), or other shipped weights (re-made by `make weights`), are another study, so their trials never
    mix and their checkpoints never resume."""
    from lightning_m2s.data import datamodule

    name = spec.study if experiment == spec.experiment else f"{spec.study}-{experiment}"
    identity = sorted(overrides or []) + [
        OmegaConf.to_yaml(cfg, resolve=True),
        json.dumps([datamodule.DEFAULT_TRAIN, datamodule.DEFAULT_VAL, datamodule.DEFAULT_TEST], sort_keys=True),
    ]
    if cfg.model.pretrained == embedded.EMBEDDED_NAME:
        identity.append(f"weights={embedded.manifest_digest()}")
    return name + "-" + hashlib.sha256("\n".join(identity).encode()).hexdigest()[:8]


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
) -> dict[str, Any]:
    """Run (or resume) a sweep; returns {'study', 'trials': [{arm, seed, state, value, metrics}], ...}
    ({} in the extra rank processes of a multi-device trial).

    Checkpoints go under `<output_root>/sweeps/<study>-<study id>/<arm>-seed<k>` (default output_root:
    outputs/ in the working root, config.work_root). `devices_per_trial` sets every trial's
    trainer.devices without making it another study (a worker's devices are not a setting of the grid).
    finish=False only runs trials: no floors, table or parent-run summary (the launcher of several workers
    does that once, after them).

    A grid worker (trials=None) leaves when the grid is settled: while other workers hold grid points it
    waits, and runs here any of their trials that a stale heartbeat re-queues (a worker that died)."""
    import optuna

    from lightning_m2s.train import train

    if int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0))) > 0 and TRIAL_ENV in os.environ:
        # Lightning's launcher re-runs this command for ranks > 0 of a multi-device trial: join rank 0's
        # trial with its exact config instead of starting a trial of another arm.
        trial_experiment, trial_overrides = json.loads(os.environ[TRIAL_ENV])
        train(load_config(trial_experiment, trial_overrides))
        return {}
    spec = load_sweep(name)
    experiment = experiment or spec.experiment
    user_overrides = _sweep_overrides(spec, overrides)
    tracking.check_server(tracking.resolve_uri(tracking_uri))  # a dead server would stall every trial
    cfg = check_sweep(spec, experiment, user_overrides)  # fail before any trial on a bad key or metric
    study_name = name_of_study(spec, experiment, overrides, cfg)
    storage_url = storage or f"sqlite:///{work_root() / 'optuna.db'}"
    study = optuna.create_study(
        study_name=study_name,
        storage=_storage(storage_url, spec.heartbeat["interval"], spec.heartbeat["grace"]),
        sampler=_sampler(spec, seed),
        direction=spec.direction,
        load_if_exists=True,
    )
    study.set_user_attr("sweep", spec.name)
    if "uid" not in study.user_attrs:  # this study's identity: another storage's study of the same name differs
        study.set_user_attr("uid", uuid.uuid4().hex[:8])
    study_dir = f"{study_name}-{study.user_attrs['uid']}"  # checkpoints never resume across studies
    study.set_user_attr("objective", spec.objective_metric)

    outputs = Path(output_root or work_root() / "outputs")
    client = tracking.client(tracking_uri)
    exp_id = tracking.experiment_id(client, f"sweep-{spec.name}")
    parent_tags = {"m2s.study": study_name, "m2s.kind": "sweep"}
    parent = elect_parent_run(client, exp_id, storage_url, parent_tags, study_name, {
        "m2s.ablation": spec.name, "m2s.experiment": experiment, "m2s.git_commit": tracking.git_commit(),
        "m2s.objective": spec.objective_metric, "mlflow.note.content": spec.description,
    })
    parent_id = parent.info.run_id
    client.set_terminated(parent_id, status="RUNNING")

    def objective(trial) -> float:
        arm, arm_overrides = _suggest(trial, spec)
        dup = _duplicate_of(trial, study) if spec.sampler == "grid" else None
        if dup is not None:  # another worker took this grid point first
            raise optuna.TrialPruned(f"duplicate of trial {dup}")
        trial_seed = trial.params.get("seed", 0)
        key = f"{arm}-seed{trial_seed}" if spec.sampler == "grid" else arm
        run_tags = {"m2s.study": study_name, "m2s.arm": arm, "m2s.trial_key": key, "m2s.kind": "trial"}
        run = tracking.find_or_create_run(client, exp_id, run_tags, key, {  # a retried trial resumes its run
            "mlflow.parentRunId": parent_id, "m2s.ablation": spec.name, "m2s.experiment": experiment,
            "m2s.seed": str(trial_seed), "m2s.git_commit": tracking.git_commit(),
        })
        trial_dir = outputs / "sweeps" / study_dir / key
        try:  # whatever stops the trial, its run is closed: never left RUNNING
            client.set_tag(run.info.run_id, "m2s.trial", str(trial.number))
            for tag, value in worker_tags().items():  # which worker ran it, on which devices
                client.set_tag(run.info.run_id, tag, value)
            cfg_overrides = user_overrides + arm_overrides + [
                f"tracking.run_id={run.info.run_id}",
                f"tracking.experiment=sweep-{spec.name}",
                f"meta.output_dir={trial_dir}",
            ]
            if tracking_uri:
                cfg_overrides.append(f"tracking.uri={tracking_uri}")
            if devices_per_trial:
                cfg_overrides.append(f"trainer.devices={devices_per_trial}")
            cfg = load_config(experiment, cfg_overrides)
            os.environ[TRIAL_ENV] = json.dumps([experiment, cfg_overrides])  # inherited by DDP rank processes
            metrics = train(cfg)
            if spec.objective_metric not in metrics:
                raise ConfigError(f"sweep {spec.name}: objective metric {spec.objective_metric!r} not among "
                                  f"{sorted(metrics)}")
        except Exception:
            _close_failed(client, run.info.run_id, traceback.format_exc()[-4000:])
            raise
        except BaseException:  # a signal: train() closed its run already, unless it stopped before
            _close_failed(client, run.info.run_id)
            raise
        trial.set_user_attr("metrics", {k: float(v) for k, v in metrics.items()})
        trial.set_user_attr("run_id", run.info.run_id)
        trial.set_user_attr("output_dir", str(trial_dir))
        # the number the grid ranks by, under a key that the MLflow compare view (metric keys in alphabetical
        # order, a short scrolling box) lists among the first rows
        client.log_metric(run.info.run_id, f"objective/{spec.objective_metric}", float(metrics[spec.objective_metric]))
        return float(metrics[spec.objective_metric])

    if spec.sampler == "grid":
        from optuna.trial import TrialState

        optuna.storages.fail_stale_trials(study)  # a killed worker's trial: failed (and re-queued by heartbeat)
        _requeue_failed(study)
        for line in held_trials(study):
            log.warning(line)
        running = _points(study, (TrialState.RUNNING,))
        n_trials = len({(a, s) for a in spec.arms for s in spec.seeds} - grid_done(study) - running)
        n_trials = n_trials if trials is None else min(trials, n_trials)
    else:
        finished = len([t for t in study.trials if t.state.is_finished()])
        budget = trials if trials is not None else (spec.trials or 10)
        n_trials = max(0, budget - finished)
    first_new = len(study.trials)
    if n_trials > 0:
        log.info("sweep %s: %d trial(s) to run", study_name, n_trials)
    try:
        if n_trials > 0:
            study.optimize(objective, n_trials=n_trials, catch=(Exception,), show_progress_bar=True)
        while spec.sampler == "grid" and trials is None and _wait_for_others(study, spec.heartbeat["interval"]):
            study.optimize(objective, n_trials=1, catch=(Exception,))  # a dead worker's trial, re-queued
        summary = _finish(study, spec, parent_id, client, experiment, user_overrides, outputs, tracking_uri,
                          first_new, finish)
    except BaseException:  # SIGTERM / SIGINT (the trial and its run are failed already), or the table failed
        _close_failed(client, parent_id)
        raise
    return summary


def _finish(study, spec, parent_id, client, experiment, user_overrides, outputs, tracking_uri, first_new,
            finish) -> dict[str, Any]:
    """The summary of a sweep run; with `finish`, also the floors, the table on the parent run and the
    parent run's end: FINISHED when the grid is done, FAILED when a point failed, left RUNNING only while
    other workers hold points, KILLED when a --trials run stopped short on purpose."""
    from optuna.trial import TrialState

    floor_results = {}
    if spec.sampler == "grid" and finish:
        floor_results, floor_cfg = _grid_floors(experiment, user_overrides, outputs)
        log_floors(client, parent_id, floor_results)
        for key, value in tracking.metric_tags(floor_cfg).items():  # the settings the floors were scored with
            client.set_tag(parent_id, key, value)
    summary = summarize(study, spec, parent_id, client if finish else None, floor_results)
    done = grid_done(study)  # a failed trial whose point a retry finished is no failure of this run
    summary["failed_now"] = [r for r in summary["trials"] if r["number"] >= first_new and r["state"] == "FAIL"
                             and (r["arm"], r["seed"]) not in done]
    held = _points(study, (TrialState.RUNNING,)) - done if spec.sampler == "grid" else set()
    if spec.sampler == "grid":  # points still running in other workers are theirs to finish, not missing
        summary["complete"] = all((a, s) in done | held for a in spec.arms for s in spec.seeds)
    else:
        summary["complete"] = True
    if not finish:  # the caller finishes the grid once (a launcher, after all its workers)
        return summary
    if spec.sampler == "grid" and summary["comparison"]["means"]:
        tracking.log_json_artifact(client, parent_id, summary["comparison"], "comparison", "comparison.json")
        from lightning_m2s import report

        report.log_summary(client, parent_id, summary, tracking_uri)
    if spec.sampler == "grid":
        failed = _points(study, (TrialState.FAIL,)) - done - held
        if len(done) == spec.grid_size:
            client.set_terminated(parent_id, status="FINISHED")
        elif summary["failed_now"] or failed:
            client.set_terminated(parent_id, status="FAILED")
        elif not held:
            client.set_terminated(parent_id, status="KILLED")
    else:
        client.set_terminated(parent_id, status="FAILED" if summary["failed_now"] else "FINISHED")
    return summary


def _close_failed(client, run_id: str, error: str | None = None) -> None:
    """Mark a trial's run FAILED, with the traceback as its `m2s.error` tag when there is one (a run that
    trained and then failed the sweep, e.g. on a missing metric, too); without an error, only a run that is
    still RUNNING. A store that fails as well is only logged: the trial's own error is the one reported."""
    try:
        if error is not None:
            client.set_tag(run_id, "m2s.error", error)
        if error is not None or client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="FAILED")
    except Exception as err:  # noqa: BLE001
        log.warning("could not mark run %s failed: %s", run_id, err)


def _sweep_overrides(spec: SweepSpec, overrides: list[str] | None) -> list[str]:
    return [f"{k}={_yaml_value(v)}" for k, v in spec.overrides.items()] + list(overrides or [])


def _grid_floors(experiment: str, user_overrides: list[str], outputs: Path) -> tuple[dict, Any]:
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
    if spec.sampler == "grid":
        _grid_floors(experiment or spec.experiment, _sweep_overrides(spec, overrides),
                     Path(output_root or work_root() / "outputs"))


def _rdb(study):
    return getattr(study._storage, "_backend", study._storage)  # the RDBStorage behind Optuna's cache


def _last_heartbeat(study, trial):
    """The trial's last heartbeat (UTC), or None when it has none."""
    import datetime as dt

    from sqlalchemy import text

    engine = getattr(_rdb(study), "engine", None)
    if engine is None:
        return None
    with engine.connect() as conn:
        beat = conn.execute(text("SELECT heartbeat FROM trial_heartbeats WHERE trial_id = :i"),
                            {"i": trial._trial_id}).scalar()
    return beat if beat is None or isinstance(beat, dt.datetime) else dt.datetime.fromisoformat(str(beat))


def held_trials(study) -> list[str]:
    """One line per RUNNING trial: held by a live worker's heartbeat, and when it can be retried if that
    worker is gone (heartbeat older than the grace period)."""
    import datetime as dt

    from optuna.trial import TrialState

    grace = getattr(_rdb(study), "grace_period", None)
    lines = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = _last_heartbeat(study, t)
        where = f"trial {t.number} ({t.params.get('arm')}, seed {t.params.get('seed')})"
        if beat is None or grace is None:
            lines.append(f"{where} is RUNNING in another worker; it is not run here")
            continue
        retry = beat + dt.timedelta(seconds=grace)
        lines.append(f"{where} is held by a live worker (last heartbeat {beat:%H:%M:%S} UTC); if that worker is "
                     f"gone, run this sweep again after {retry:%H:%M:%S} UTC to retry it")
    return lines


def log_floors(client, parent_id: str, floor_results: dict[str, dict]) -> None:
    """The floors' test metrics on the sweep's parent run: floor/<variant>/test/<dataset>/<metric>."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(f"floor/{variant}/{k}", v, now, 0) for variant, r in floor_results.items()
               for k, v in r["metrics"].items() if k.startswith("test/") and v == v]
    for i in range(0, len(metrics), 500):
        client.log_batch(parent_id, metrics=metrics[i : i + 500])


def _per_clip(t, client) -> list[dict]:
    """A finished trial's per-clip test rows: from its output folder, else its MLflow run's artifact."""
    from lightning_m2s.train import PER_CLIP_FILE, read_per_clip

    folder = Path(t.user_attrs.get("output_dir", ""))
    if (folder / PER_CLIP_FILE).is_file():
        return read_per_clip(folder)
    run_id = t.user_attrs.get("run_id")
    if run_id is None:
        return []
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, f"metrics/{PER_CLIP_FILE}", tmp)
        except Exception:  # noqa: BLE001 - a run from before per-clip rows were logged
            return []
        return json.loads(Path(path).read_text())["rows"]


def summarize(study, spec: SweepSpec, parent_run_id: str, client=None, floor_results: dict | None = None) -> dict[str, Any]:
    from lightning_m2s import comparison

    rows, arms = [], {}
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "arm": t.params.get("arm", f"trial{t.number}"), "seed": t.params.get("seed"),
               "state": t.state.name, "value": t.value, "metrics": t.user_attrs.get("metrics", {}),
               "run_id": t.user_attrs.get("run_id"), "output_dir": t.user_attrs.get("output_dir")}
        rows.append(row)
        if row["state"] == "COMPLETE" and spec.sampler == "grid" and client is not None:
            per_clip = _per_clip(t, client)
            if per_clip:
                arms.setdefault(row["arm"], {})[row["seed"]] = per_clip
    ordered = {a: [arms[a][s] for s in sorted(arms[a])] for a in spec.arms if a in arms}
    floor_rows = {k: v["per_clip"] for k, v in (floor_results or {}).items()}
    reference = comparison.reference_arm(spec.arms)  # differences read treatment - reference
    return {"study": study.study_name, "objective": spec.objective_metric, "direction": spec.direction,
            "parent_run_id": parent_run_id, "trials": rows, "reference": reference,
            "per_clip": {"arms": ordered, "floors": floor_rows},  # what the comparison was computed from
            "comparison": {
                "datasets": comparison.datasets_of(ordered, floor_rows),
                "means": comparison.means(ordered, floor_rows) if ordered or floor_rows else [],
                "differences": comparison.differences(ordered, floor_rows, reference) if ordered else [],
                "reference": reference,
            }}


def format_footer(summary: dict[str, Any]) -> str:
    """Under the table: each finished arm's checkpoint to use from here (best.ckpt, the lowest val/loss of
    its run; last.ckpt is the end of training, what a resume reads), with the commands that take it."""
    done = [r for r in summary["trials"] if r["state"] == "COMPLETE" and r.get("output_dir")]
    ckpts = {}
    for r in sorted(done, key=lambda r: (r["seed"] is None, r["seed"])):
        best = Path(r["output_dir"]) / "checkpoints" / "best.ckpt"
        if best.is_file():
            ckpts.setdefault(r["arm"], best)  # the lowest seed's
    if not ckpts:
        return ""
    width = max(len(a) for a in ckpts)
    lines = ["checkpoint of each arm (best.ckpt: lowest val/loss; convert or evaluate it):"]
    lines += [f"  {arm:<{width}}  {path}" for arm, path in ckpts.items()]
    first = next(iter(ckpts.values()))
    lines += [f"  m2s evaluate {first} --sources real",
              f"  m2s convert VIDEO.mp4 --checkpoint {first} --depth DEPTH.npz --out stereo.mp4"]
    return "\n".join(lines)


def format_table(summary: dict[str, Any]) -> str:
    """The grid's comparison (arms, floors, paired differences), or the trials' objective values."""
    from lightning_m2s.comparison import format_comparison

    c = summary.get("comparison") or {}
    if c.get("means"):
        return format_comparison(c["means"], c["differences"], c["datasets"])
    done = [r for r in summary["trials"] if r["state"] == "COMPLETE"]
    if not done:
        return "no completed trials"
    return "\n".join(f"{r['arm']:<24} {summary['objective']} = {r['value']:.4f}" for r in done)
