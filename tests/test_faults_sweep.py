"""Sweep faults: a typo in an arm, the objective metric or the YAML is refused before any trial trains; a
sweep whose trial fails closes every MLflow run it opened (trials and parent) and exits 1."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from lightning_m2s.config import SWEEPS_DIR
from lightning_m2s.errors import ConfigError
from lightning_m2s.evaluation import logged_metrics
from lightning_m2s.sweep import check_sweep, load_sweep, run_sweep

M2S = [sys.executable, "-m", "lightning_m2s.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
OBJECTIVE = {"metric": "test/synthetic/lpips", "direction": "minimize"}


def write(tmp_path: Path, name: str, grid: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"study": name, "experiment": "debug", **grid}))
    return path


def all_runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_an_arm_key_typo_is_one_line_naming_the_key_before_any_trial(tmp_path):
    path = write(tmp_path, "bad_key", {"arms": {"a": {"model.left_condition": True}, "b": {"model.left_conditoin": False}},
                                        "objective": OBJECTIVE})
    proc = subprocess.run(M2S + ["sweep", str(path)], env={**ENV, "M2S_ROOT": str(tmp_path)}, capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "arm 'b'" in proc.stderr and "model.left_conditoin" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlflow.db").exists()  # nothing ran, no run opened


def test_an_objective_typo_a_bad_search_space_and_broken_yaml_are_refused_before_any_trial(tmp_path):
    bad_metric = write(tmp_path, "bad_metric", {"arms": {"a": {}}, "objective": {**OBJECTIVE, "metric": "test/synthetic/lpipz"}})
    with pytest.raises(ConfigError, match=r"'test/synthetic/lpipz' is not logged .*did you mean test/synthetic/lpips"):
        run_sweep(bad_metric, storage=f"sqlite:///{tmp_path / 'o.db'}", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    # validation metrics exist only for variants that train: a floor arm has no val/ figures
    floor_val = write(tmp_path, "floor_val", {"arms": {"w": {"module.variant": "warp_only"}},
                                              "objective": {**OBJECTIVE, "metric": "val/synthetic/lpips"}})
    with pytest.raises(ConfigError, match="arm 'w'"):
        check_sweep(load_sweep(floor_val), "debug", [])
    space = write(tmp_path, "space", {"sampler": "tpe", "search_space": {"optim.lrr": {"type": "float", "low": 1e-5, "high": 1e-3}},
                                      "objective": OBJECTIVE})
    with pytest.raises(ConfigError, match="optim.lrr"):
        check_sweep(load_sweep(space), "debug", [])
    (tmp_path / "broken.yaml").write_text("study: broken\narms:\n  a: {model.left_condition: true\nobjective: {}\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: cannot read YAML: .*line \d+"):
        load_sweep(tmp_path / "broken.yaml")
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "o.db").exists()


@pytest.mark.parametrize("sweep", sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
def test_every_shipped_sweep_resolves_every_arm_and_logs_its_objective(sweep):
    spec = load_sweep(sweep)
    for experiment in {spec.experiment, "debug"}:
        check_sweep(spec, experiment, [])


def test_a_failed_trial_leaves_no_run_running_and_the_metrics_are_those_the_check_expects(tmp_path):
    path = write(tmp_path, "one_fails", {"arms": {"floor": {"module.variant": "warp_only"}, "bad": {"optim.lr": -1.0}},
                                         "overrides": {"trainer.enable_progress_bar": False}, "objective": OBJECTIVE})
    proc = subprocess.run(M2S + ["sweep", str(path)], env={**ENV, "M2S_ROOT": str(tmp_path)}, capture_output=True,
                          text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1 trial(s) failed in this run (bad" in proc.stderr
    runs = {r.info.run_name: r for r in all_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")}
    assert not [name for name, r in runs.items() if r.info.status == "RUNNING"]
    assert {name: r.info.status for name, r in runs.items() if r.data.tags.get("m2s.kind") == "trial"} == {
        "floor-seed0": "FINISHED", "bad-seed0": "FAILED"}
    (parent,) = [r for r in runs.values() if r.data.tags.get("m2s.kind") == "sweep"]
    assert parent.info.status == "FAILED"
    assert "learning rate" in runs["bad-seed0"].data.tags["m2s.error"].lower()
    # what the pre-trial check expects an experiment to log is what a trial returned
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    (study,) = optuna.get_all_study_names(storage)
    (done,) = [t for t in optuna.load_study(study_name=study, storage=storage).trials if t.state.name == "COMPLETE"]
    from lightning_m2s.config import load_config

    assert set(done.user_attrs["metrics"]) == logged_metrics(load_config("debug", ["module.variant=warp_only"]))


ELECT = """
import random, sys, time
from lightning_m2s import tracking
from lightning_m2s.sweep import elect_parent_run
client = tracking.client(sys.argv[1])
exp = sys.argv[5]
create = client.create_run

def late_create(*args, **kwargs):  # a create request that reaches a busy server seconds after it was made:
    delay = random.Random(int(sys.argv[4])).uniform(0, 3)  # the later it lands, the older its start time
    start = int((time.time() - delay) * 1000)
    time.sleep(delay)
    return create(*args, start_time=start, **kwargs)

client.create_run = late_create
open(f"{sys.argv[3]}/{sys.argv[4]}", "w").close()  # all workers at once: each waits until all are ready
deadline = time.time() + 240
while len(__import__("os").listdir(sys.argv[3])) < 3:
    assert time.time() < deadline, "the other workers never started"
    time.sleep(0.01)
print(elect_parent_run(client, exp, sys.argv[2], {"m2s.study": "race", "m2s.kind": "sweep"}, "race", {}).info.run_id)
"""


@pytest.mark.slow
def test_workers_that_race_to_create_the_parent_run_elect_one_however_late_their_runs_land(tmp_path):
    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    from lightning_m2s import tracking

    exp = tracking.experiment_id(tracking.client(uri), "race")  # the store exists before the race, as in a sweep
    ready = tmp_path / "ready"
    ready.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", ELECT, uri, storage, str(ready), str(i), exp], env=ENV,
                              stdout=subprocess.PIPE, text=True) for i in range(3)]
    elected = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    runs = [r for r in all_runs(uri) if r.data.tags.get("m2s.kind") == "sweep"]
    assert len(elected) == 1 and [r.info.run_id for r in runs] == list(elected)


def test_a_launcher_refuses_a_typo_before_it_starts_any_worker(tmp_path):
    path = write(tmp_path, "bad_workers", {"arms": {"a": {"model.left_conditoin": False}}, "objective": OBJECTIVE})
    proc = subprocess.run(M2S + ["sweep", str(path), "--workers", "2"], env={**ENV, "M2S_ROOT": str(tmp_path)},
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "model.left_conditoin" in proc.stderr.strip().splitlines()[-1]
    assert "worker(s), logs in" not in proc.stdout and not (tmp_path / "outputs").exists()  # no worker started
