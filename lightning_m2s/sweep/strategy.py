"""How a sweep picks its trials: a grid (every arm x seed once, the paper's tables) or a search (TPE or
random over a search space, a trial budget). `strategy_for(spec)` returns the one the sweep file asks for;
run_sweep only talks to this interface.
"""

from __future__ import annotations

import datetime as dt
import logging
import time

import optuna
from optuna.trial import TrialState

from lightning_m2s.errors import ConfigError
from lightning_m2s.sweep.spec import SweepSpec, dotlist
from lightning_m2s.sweep.storage import KeepGoingGridSampler, grace_period, last_heartbeat

log = logging.getLogger("lightning_m2s.sweep")


class SearchStrategy:
    """TPE or random sampling of `search_space`; `trials` (or the file's, or 10) finished trials in all."""

    def __init__(self, spec: SweepSpec):
        self.spec = spec

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        if self.spec.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=seed)
        return optuna.samplers.RandomSampler(seed=seed)

    def suggest(self, trial) -> tuple[str, str, list[str]]:
        """(arm, run key, config overrides) of a trial."""
        overrides = {}
        for key, dist in self.spec.search_space.items():
            kind = dist.get("type", "float")
            if kind == "float":
                overrides[key] = trial.suggest_float(key, dist["low"], dist["high"], log=dist.get("log", False))
            elif kind == "int":
                overrides[key] = trial.suggest_int(key, dist["low"], dist["high"], log=dist.get("log", False))
            elif kind == "categorical":
                overrides[key] = trial.suggest_categorical(key, dist["choices"])
            else:
                raise ConfigError(f"sweep {self.spec.name}: search_space.{key}.type must be float, int or categorical")
        original = trial.system_attrs.get("failed_trial")  # a retry of a dead worker's trial resumes that trial
        arm = f"trial{trial.number if original is None else original}"
        return arm, arm, dotlist(overrides)

    def duplicate_of(self, trial, study) -> int | None:
        return None  # every sampled point is a trial of its own

    def trials_to_run(self, study, trials: int | None) -> int:
        finished = len([t for t in study.trials if t.state.is_finished()])
        return max(0, (trials if trials is not None else (self.spec.trials or 10)) - finished)

    def retry_queued(self, study, trials: int | None) -> bool:
        return False  # a search has no points to hand over between workers

    def outcome(self, study, failed_now: list) -> tuple[bool, str | None]:
        """(complete, the parent run's end status; None leaves it RUNNING)."""
        return True, "FAILED" if failed_now else "FINISHED"


class GridStrategy(SearchStrategy):
    """Every arm x seed once. Workers share the grid through the storage: a point another worker holds is
    theirs, a point whose trials all failed is queued again, a point whose worker died (stale heartbeat) is
    failed and re-queued, and a worker waits for the others before it leaves (runs their retries)."""

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return KeepGoingGridSampler(self.spec.grid, seed=seed)

    def suggest(self, trial) -> tuple[str, str, list[str]]:
        arm = trial.suggest_categorical("arm", list(self.spec.arms))
        seed = trial.suggest_categorical("seed", list(self.spec.seeds))
        return arm, f"{arm}-seed{seed}", dotlist({**self.spec.arms[arm], "meta.seed": seed})

    def duplicate_of(self, trial, study) -> int | None:
        """Another live or finished trial of the same grid point with a lower number (workers may race)."""
        for other in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE)):
            if other.number < trial.number and other.params == trial.params:
                return other.number
        return None

    def trials_to_run(self, study, trials: int | None) -> int:
        optuna.storages.fail_stale_trials(study)  # a killed worker's trial: failed (and re-queued by heartbeat)
        requeue_failed(study)
        for line in held_trials(study):
            log.warning(line)
        todo = {(a, s) for a in self.spec.arms for s in self.spec.seeds}
        todo -= done_points(study) | points(study, (TrialState.RUNNING,))
        return len(todo) if trials is None else min(trials, len(todo))

    def retry_queued(self, study, trials: int | None) -> bool:
        """A worker of the whole grid (trials None) waits while others hold points: True as soon as one is
        queued to run here (a dead worker's trial), False when nothing runs any more."""
        return trials is None and wait_for_others(study, self.spec.heartbeat["interval"])

    def outcome(self, study, failed_now: list) -> tuple[bool, str | None]:
        """Complete when every point is done or held by a live worker. FINISHED when all are done, FAILED when
        a point failed, RUNNING while others hold points, KILLED when a --trials run stopped short."""
        done = done_points(study)
        held = points(study, (TrialState.RUNNING,)) - done  # theirs to finish, not missing
        complete = all((a, s) in done | held for a in self.spec.arms for s in self.spec.seeds)
        if len(done) == self.spec.grid_size:
            return complete, "FINISHED"
        if failed_now or points(study, (TrialState.FAIL,)) - done - held:
            return complete, "FAILED"
        return complete, None if held else "KILLED"


def strategy_for(spec: SweepSpec) -> SearchStrategy:
    return GridStrategy(spec) if spec.is_grid else SearchStrategy(spec)


# --- a grid's points in the study -------------------------------------------------------------------
def points(study, states) -> set[tuple]:
    """The (arm, seed) points of the study's trials in `states`."""
    return {(t.params.get("arm"), t.params.get("seed")) for t in study.get_trials(deepcopy=False, states=states)
            if "arm" in t.params}


def done_points(study) -> set[tuple]:
    return points(study, (TrialState.COMPLETE,))


def requeue_failed(study) -> int:
    """Queue once more each grid point whose trials all failed (a re-run retries them); returns the count."""
    settled = points(study, (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))
    failed = points(study, (TrialState.FAIL,)) - settled
    for arm, seed in sorted(failed, key=str):
        study.enqueue_trial({"arm": arm, "seed": seed})
    return len(failed)


def wait_for_others(study, poll_s: float) -> bool:
    """Wait while other workers hold trials: True as soon as one is queued to run here (a trial whose
    worker died, failed and re-queued once its heartbeat is older than the grace period), False when no
    trial is running any more."""
    waited, idle = False, 0
    while True:
        optuna.storages.fail_stale_trials(study)
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return True
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if last_heartbeat(study, t) is not None]  # without a heartbeat it can never be retried
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


def held_trials(study) -> list[str]:
    """One line per RUNNING trial: held by a live worker's heartbeat, and when it can be retried if that
    worker is gone (heartbeat older than the grace period)."""
    grace = grace_period(study)
    lines = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = last_heartbeat(study, t)
        where = f"trial {t.number} ({t.params.get('arm')}, seed {t.params.get('seed')})"
        if beat is None or grace is None:
            lines.append(f"{where} is RUNNING in another worker; it is not run here")
            continue
        retry = beat + dt.timedelta(seconds=grace)
        lines.append(f"{where} is held by a live worker (last heartbeat {beat:%H:%M:%S} UTC); if that worker is "
                     f"gone, run this sweep again after {retry:%H:%M:%S} UTC to retry it")
    return lines
