"""MLflow wiring: the tracking store, sweep (parent) and trial (child) runs, params, tags, artifacts.

The default store is local: a sqlite database plus an artifact folder in the working tree (MLflow 3.13+
refuses the plain ./mlruns file store). `tracking.uri` in the config points at a shared tracking server
instead (`http://host:5000`), in which case the server decides where artifacts go.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

from lightning_m2s import tags
from lightning_m2s.config import PROJECT_ROOT, flatten, work_root
from lightning_m2s.errors import ConfigError, M2SError

PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param value's length
LOCK_WAIT_S = 600.0  # how long a run waits for a locked local store before it stops
SERVER_TIMEOUT_S = 10.0  # how long a tracking server may take to answer the check before any work
RACE_SETTLE_S = 1.0  # how long a racing create_run may take to land (a tracking server under load)
# MLflow 3 opens an experiment without this tag as a GenAI one (a traces page); ours are model training
# (the runs table, metrics and comparisons).
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def resolve_uri(uri: str | None) -> str:
    """The tracking URI: the config's value, or the local sqlite store `mlflow.db` in the working root."""
    if not uri:
        return f"sqlite:///{work_root() / 'mlflow.db'}"
    if "://" not in uri:
        raise ConfigError(f"tracking.uri {uri!r} is not a URI (expected sqlite:///path.db or http://host:port)")
    return sqlalchemy_url(uri)


class TrackingError(M2SError):
    """A tracking store that cannot be used: a server that does not answer, a database that cannot be written."""


def check_server(uri: str, timeout_s: float = SERVER_TIMEOUT_S) -> None:
    """An http(s) tracking server must answer now: MLflow's client would retry a dead one for minutes
    before any error, after the model and data were already built."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)  # any answer will do: it is up
    except requests.RequestException as err:
        why = f"no answer within {timeout_s:.0f} s" if isinstance(err, requests.Timeout) else "connection refused"
        raise TrackingError(f"the MLflow tracking server {uri} does not answer ({why}): start it (mlflow server "
                            "...) or point tracking.uri / --tracking-uri at one that runs (empty: the local "
                            "sqlite store)") from err


def store_failure(err: BaseException, uri: str) -> TrackingError | None:
    """`err` as one TrackingError naming the store, when it came from MLflow's client (a database that
    cannot be written or is locked, a server that went away), else None."""
    from mlflow.exceptions import MlflowException

    seen, found = err, None
    while seen is not None and found is None:
        found = seen if isinstance(seen, MlflowException) else None
        seen = seen.__cause__ or seen.__context__
    if found is None:
        return None
    root = found
    while root.__cause__ is not None or root.__context__ is not None:  # the database's or network's own words
        root = root.__cause__ or root.__context__
    reason = (str(getattr(root, "orig", None) or root).strip().splitlines() or [type(root).__name__])[0][:200]
    return TrackingError(f"the tracking store {uri} failed: {reason}; the run stays RUNNING there until it can be "
                         "written again (run the same command then to resume into it)")


def wait_out_lock(call, wait_s: float = LOCK_WAIT_S):
    """`call()`, tried again while the store answers "database is locked" (a sqlite lock that another process
    holds longer than MLflow's 20 s busy timeout), for up to `wait_s` seconds."""
    from mlflow.exceptions import MlflowException

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return call()
        except MlflowException as err:
            if "database is locked" not in str(err) or time.monotonic() > deadline:
                raise
            logging.getLogger(__name__).warning("the tracking store is locked by another process: waiting")


def sqlalchemy_url(url: str) -> str:
    """A database URL as SQLAlchemy (MLflow's and Optuna's stores) takes it: plain postgresql:// URLs use
    psycopg 3, the `postgres` extra (SQLAlchemy's default driver would be psycopg2)."""
    return "postgresql+psycopg://" + url.removeprefix("postgresql://") if url.startswith("postgresql://") else url


def artifact_location(uri: str, artifact_root: str | None) -> str | None:
    """Where a new experiment keeps artifacts: the project's folder for a local store, else the server's."""
    if artifact_root:
        return Path(artifact_root).resolve().as_uri()
    if uri.startswith("sqlite:///"):  # beside the database: <checkout>/mlartifacts for the default store
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def client(uri: str | None = None):
    import mlflow
    from filelock import FileLock

    uri = resolve_uri(uri)
    mlflow.set_tracking_uri(uri)
    if not uri.startswith("sqlite:///"):
        check_server(uri)
        return mlflow.MlflowClient(tracking_uri=uri)
    # MLflow logs each database error with its traceback before raising it; train() and sweeps report it
    # once, as one line naming the store (store_failure)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # The first use creates and migrates the database; two sweep workers doing that at once collide.
    with FileLock(uri.removeprefix("sqlite:///") + ".lock"):
        mlflow_client = mlflow.MlflowClient(tracking_uri=uri)
        mlflow_client.search_experiments(max_results=1)
    return mlflow_client


def experiment_id(mlflow_client, name: str, artifact_root: str | None = None) -> str:
    """The MLflow experiment `name`, created on first use as a model-training experiment."""
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        if found.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:  # made before the kind was set
            mlflow_client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return found.experiment_id
    location = artifact_location(mlflow_client.tracking_uri, artifact_root)
    try:
        return mlflow_client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    except Exception:  # another worker created it in the meantime
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def find_or_create_run(mlflow_client, exp_id: str, tags: dict[str, str], run_name: str, extra_tags: dict[str, str],
                       settle_s: float = 0.0):
    """The run with `tags`, created if none exists. Workers that race to create it (pass `settle_s`,
    e.g. RACE_SETTLE_S, where they do) all settle on the oldest one and delete their own duplicates."""
    run = find_run(mlflow_client, exp_id, tags)
    if run is not None:
        return run
    mine = mlflow_client.create_run(exp_id, run_name=run_name, tags={**tags, **extra_tags})
    # A run's start time is its client's clock, so a racer's older run can still be in flight to the
    # server: wait until it has landed, or two workers would each keep a run the other deletes.
    if settle_s > 0:
        time.sleep(settle_s)
    oldest = find_run(mlflow_client, exp_id, tags, oldest=True)
    if oldest.info.run_id != mine.info.run_id:
        mlflow_client.delete_run(mine.info.run_id)
    return oldest


def git_commit() -> str:
    """The checkout's commit (with '+dirty' when the tree has changes), or 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def find_run(mlflow_client, exp_id: str, tags: dict[str, str], oldest: bool = False):
    """The newest (or oldest) run of the experiment whose tags equal `tags`, or None (used to resume)."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    order = "ASC" if oldest else "DESC"
    runs = mlflow_client.search_runs([exp_id], filter_string=query, order_by=[f"attributes.start_time {order}"], max_results=1)
    return runs[0] if runs else None


def log_config(mlflow_client, run_id: str, cfg) -> None:
    """Every key of the resolved config as a param (flattened: `model.left_condition`)."""
    from mlflow.entities import Param

    params = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in flatten(cfg).items()]
    existing = mlflow_client.get_run(run_id).data.params
    params = [p for p in params if p.key not in existing]  # params are immutable: a resumed run keeps its own
    for start in range(0, len(params), 100):  # MLflow's batch limit
        mlflow_client.log_batch(run_id, params=params[start : start + 100])


def metric_tags(cfg) -> dict[str, str]:
    """The evaluation settings a run's numbers depend on, as tags: comparing numbers of other settings
    (with each other or with the paper's) is comparing different measurements."""
    return {f"{tags.METRICS_PREFIX}lpips_net": str(cfg.module.eval.lpips_net),
            f"{tags.METRICS_PREFIX}ms_ssim": str(cfg.module.eval.ms_ssim),
            f"{tags.METRICS_PREFIX}eval_size": str(cfg.data.eval_size)}


def log_json_artifact(mlflow_client, run_id: str, data: dict, artifact_dir: str, name: str) -> None:
    """`data` as `<artifact_dir>/<name>` on the run."""
    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(data, indent=2, default=float))
        mlflow_client.log_artifact(run_id, str(path), artifact_dir)


def run_exists(mlflow_client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.get_run(run_id)
        return True
    except MlflowException:
        return False
