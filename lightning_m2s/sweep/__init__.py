"""Ablation sweeps: Optuna studies from sweeps/*.yaml, one MLflow parent run per sweep, a child per trial.

    spec.py      the sweep file: parsed, checked against its experiment, named as a study
    storage.py   the study storage the workers share, and the one adapter of Optuna's internals
    strategy.py  how trials are picked: GridStrategy (arm x seed) or SearchStrategy (TPE / random)
    trial.py     one trial: its MLflow run, config, training and objective value
    summary.py   SweepResult, and the printed table and footer
    run.py       run_sweep, which wires them, and the grid's floors
"""

from lightning_m2s.sweep.run import log_floors, prepare_floors, run_sweep
from lightning_m2s.sweep.spec import SweepSpec, check_sweep, check_sweep_file, load_sweep, name_of_study
from lightning_m2s.sweep.storage import elect_parent_run, open_storage
from lightning_m2s.sweep.strategy import held_trials
from lightning_m2s.sweep.summary import SweepResult, TrialResult, format_footer, format_table
from lightning_m2s.sweep.trial import TRIAL_ENV

__all__ = ["SweepResult", "SweepSpec", "TRIAL_ENV", "TrialResult", "check_sweep", "check_sweep_file",
           "elect_parent_run", "format_footer", "format_table", "held_trials", "load_sweep", "log_floors",
           "name_of_study", "open_storage", "prepare_floors", "run_sweep"]
