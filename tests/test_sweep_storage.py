"""The sweep's one adapter of Optuna internals (sweep/storage.py), pinned to the installed Optuna."""

import datetime as dt

import optuna
import pytest

from lightning_m2s.sweep.storage import (
    OPTUNA_VERSION, KeepGoingGridSampler, grace_period, last_heartbeat, open_storage,
)

def test_the_installed_optuna_is_the_one_the_adapter_was_written_for():
    assert optuna.__version__ == OPTUNA_VERSION, "re-check sweep/storage.py's internals against this Optuna"


@pytest.mark.parametrize("sampler, retried", [(optuna.samplers.GridSampler, 1), (KeepGoingGridSampler, 2)])
def test_only_the_keep_going_grid_sampler_runs_every_requeued_point(sampler, retried):
    grid = {"arm": ["a", "b", "c"], "seed": [0]}
    study = optuna.create_study(sampler=sampler(grid, seed=0))
    failing = {"b", "c"}

    def objective(trial):
        arm = trial.suggest_categorical("arm", grid["arm"])
        trial.suggest_categorical("seed", grid["seed"])
        if arm in failing:
            raise RuntimeError(f"{arm} fails on the first pass")
        return 0.0

    study.optimize(objective, n_trials=3, catch=(RuntimeError,))
    failing.clear()
    for arm in ("b", "c"):  # both failed points queued again, as a re-run of the sweep does
        study.enqueue_trial({"arm": arm, "seed": 0})
    study.optimize(objective, n_trials=2)
    # GridSampler stops the study after the first retry: its grid ids are all used
    assert [t.state.name for t in study.trials[3:]].count("COMPLETE") == retried


def test_a_trials_heartbeat_and_the_grace_period_are_read_from_the_storage(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=5, grace_period=50)
    study = optuna.create_study(study_name="beats", storage=storage)
    beating, silent = study.ask(), study.ask()
    before = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(seconds=5)
    storage.record_heartbeat(beating._trial_id)  # what a live worker's heartbeat thread writes
    assert last_heartbeat(study, beating) > before
    assert last_heartbeat(study, silent) is None
    assert grace_period(study) == 50
