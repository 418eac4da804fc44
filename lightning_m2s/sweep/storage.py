"""The study storage every worker of a sweep shares, and the one place that touches Optuna's internals.

The storage is an RDB (sqlite by default, a PostgreSQL URL for several machines) with heartbeats: a trial
whose worker died is failed and re-queued once. Workers coordinate through it alone; `storage_lock` is
the one exclusive section they share (creating the schema, electing the sweep's parent run).

Optuna has no public API for two things a resumable grid needs: a trial's last heartbeat (to say when a
held trial can be retried) and a grid sampler that leaves stopping to the caller. Both live below, written
against OPTUNA_VERSION; tests/test_sweep_storage.py pins them to the installed Optuna.
"""

from __future__ import annotations

import contextlib
import datetime as dt

import optuna

from lightning_m2s import tracking

OPTUNA_VERSION = "5.0.0"  # the Optuna the internals below were written and tested against (pyproject pins it)
SCHEMA_LOCK = 0x6D3273  # storage lock held while a worker creates the study schema
PARENT_LOCK = 0x6D3274  # storage lock held while a worker finds or creates the sweep's parent run


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


def open_storage(url: str, heartbeat_interval: int = 30, grace_period: int = 120) -> optuna.storages.RDBStorage:
    url = tracking.sqlalchemy_url(url)
    with storage_lock(url, SCHEMA_LOCK):  # creating the schema twice at once collides: one worker at a time
        # Heartbeats let a later run (or another worker) see that a trial's process died: it is failed
        # and re-queued once instead of staying RUNNING forever.
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
        )


def elect_parent_run(client, exp_id: str, storage_url: str, tags: dict[str, str], run_name: str,
                     extra_tags: dict[str, str]):
    """The sweep's parent run, found or created. Every worker of a sweep starts here at once: one at a time
    (the storage's lock) looks and creates, so exactly one run is made however late a create request lands
    on a busy tracking server; a storage without a lock falls back to settling on the oldest run."""
    with storage_lock(storage_url, PARENT_LOCK) as locked:
        return tracking.find_or_create_run(client, exp_id, tags, run_name, extra_tags,
                                           settle_s=0 if locked else tracking.RACE_SETTLE_S)


# --- Optuna internals (OPTUNA_VERSION) ----------------------------------------------------------------
class KeepGoingGridSampler(optuna.samplers.GridSampler):
    """A GridSampler that never stops the study itself: the sweep bounds its trials, and re-queued failed
    points (enqueued trials, which carry no grid id) would otherwise end it early."""

    def after_trial(self, study, trial, state, values) -> None:  # GridSampler's calls study.stop()
        pass


def _rdb(study) -> optuna.storages.RDBStorage:
    return getattr(study._storage, "_backend", study._storage)  # the RDBStorage behind Optuna's cache


def grace_period(study) -> int | None:
    return getattr(_rdb(study), "grace_period", None)


def last_heartbeat(study, trial) -> dt.datetime | None:
    """The trial's last heartbeat (UTC), or None when it has none."""
    from sqlalchemy import text

    engine = getattr(_rdb(study), "engine", None)
    if engine is None:
        return None
    with engine.connect() as conn:
        beat = conn.execute(text("SELECT heartbeat FROM trial_heartbeats WHERE trial_id = :i"),
                            {"i": trial._trial_id}).scalar()
    return beat if beat is None or isinstance(beat, dt.datetime) else dt.datetime.fromisoformat(str(beat))
