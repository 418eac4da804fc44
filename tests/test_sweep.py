"""Sweeps: every grid file is valid; a real (fast) grid runs, resumes, records failures and skips finished
trials; two workers split one study; the MLflow dashboard serves the runs and stops cleanly."""

import json
import os
import subprocess
import sys
import urllib.request

import mlflow
import optuna
import pytest
import yaml

from lightning_m2s.config import SWEEPS_DIR, load_config
from lightning_m2s.dashboard import free_port, start_server, stop_server, wait_ready
from lightning_m2s.errors import ConfigError
from lightning_m2s.sweep import load_sweep, run_sweep

SWEEPS = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
# Baseline arms train nothing, so a grid over them exercises Optuna + MLflow + evaluation in seconds.
FAST_GRID = {
    "study": "fast_grid", "experiment": "debug", "sampler": "grid",
    "arms": {"warp_only": {"module.variant": "warp_only"}, "classical_fill": {"module.variant": "classical_fill"},
             "broken": {"module.variant": "warp_only", "data.eval_size": 12}},  # 12 is no multiple of 8: fails
    "seeds": [0], "objective": {"metric": "test/synthetic/psnr", "direction": "maximize"},
    "overrides": {"data.val_clips": 1, "trainer.enable_progress_bar": False},
}


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_file_is_valid_and_every_arm_is_a_valid_config(name):
    spec = load_sweep(name)
    overrides = [f"{k}={v}" for k, v in spec.overrides.items()]
    if spec.sampler == "grid":
        assert spec.grid_size >= 2
        for arm, arm_overrides in spec.arms.items():
            load_config(spec.experiment, overrides + [f"{k}={v}" for k, v in arm_overrides.items()])
    else:
        assert spec.search_space and spec.trials


def test_the_paper_ablations_have_their_grids():
    assert {"left_cond", "full_attention", "loss", "inference_steps", "runtime", "baselines"} <= set(SWEEPS)
    assert set(load_sweep("loss").arms) == {"A_standard_25", "B_standard_1", "C_latent", "D_end_to_end"}


def test_bad_sweep_files_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**FAST_GRID, "objectiv": {}}))
    with pytest.raises(ConfigError, match=r"bad\.yaml.*objectiv"):
        load_sweep(bad)
    bad.write_text(yaml.safe_dump({**FAST_GRID, "objective": {"metric": "x", "direction": "up"}}))
    with pytest.raises(ConfigError, match="direction"):
        load_sweep(bad)
    with pytest.raises(ConfigError, match="no sweep named"):
        load_sweep("left_cnd")


@pytest.fixture(scope="module")
def fast_sweep(tmp_path_factory):
    """The fast grid run once: (sweep file, storage URL, tracking URI, output root, summary)."""
    root = tmp_path_factory.mktemp("sweep")
    path = root / "fast_grid.yaml"
    path.write_text(yaml.safe_dump(FAST_GRID))
    storage, uri = f"sqlite:///{root / 'optuna.db'}", f"sqlite:///{root / 'mlflow.db'}"
    summary = run_sweep(path, storage=storage, tracking_uri=uri, output_root=root)
    return path, storage, uri, root, summary


def test_grid_runs_every_arm_and_records_the_failing_one(fast_sweep):
    _, _, uri, _, summary = fast_sweep
    states = {t["arm"]: t["state"] for t in summary["trials"]}
    assert states == {"warp_only": "COMPLETE", "classical_fill": "COMPLETE", "broken": "FAIL"}
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep-fast_grid")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("m2s.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("m2s.kind") == "trial"]
    assert len(parent) == 1 and len(children) == 3
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert {"m2s.ablation", "m2s.arm", "m2s.git_commit", "m2s.study", "m2s.trial"} <= set(run.data.tags)
    status = {r.data.tags["m2s.arm"]: r.info.status for r in children}
    assert status["broken"] == "FAILED" and status["warp_only"] == "FINISHED"
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert all("test/synthetic/psnr" in r.data.metrics and "data.eval_size" in r.data.params for r in finished)


def test_rerunning_a_sweep_retries_only_what_failed(fast_sweep):
    path, storage, uri, root, _ = fast_sweep
    summary = run_sweep(path, storage=storage, tracking_uri=uri, output_root=root)
    arms = [t["arm"] for t in summary["trials"]]
    assert arms.count("warp_only") == 1 and arms.count("classical_fill") == 1  # finished: not redone
    assert arms.count("broken") == 2  # the failed arm was tried once more (and fails again)


def test_dashboard_serves_the_sweep_runs_and_stops_cleanly(fast_sweep):
    _, _, uri, _, _ = fast_sweep
    port = free_port()
    proc = start_server(uri, port=port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=sweep-fast_grid")
        exp = json.load(urllib.request.urlopen(request, timeout=10))["experiment"]
        body = json.dumps({"experiment_ids": [exp["experiment_id"]], "max_results": 50}).encode()
        search = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", data=body,
                                        headers={"Content-Type": "application/json"})
        runs = json.load(urllib.request.urlopen(search, timeout=10))["runs"]
        arms = {t["value"] for r in runs for t in r["data"]["tags"] if t["key"] == "m2s.arm"}
        assert {"warp_only", "classical_fill", "broken"} <= arms
    finally:
        stop_server(proc)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no process of the server's group is left


def test_two_workers_split_one_grid_without_repeating_a_trial(tmp_path):
    grid = {**FAST_GRID, "study": "two_workers", "seeds": [0, 1]}
    grid["arms"] = {k: v for k, v in grid["arms"].items() if k != "broken"}
    path = tmp_path / "two_workers.yaml"
    path.write_text(yaml.safe_dump(grid))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = [sys.executable, "-m", "lightning_m2s.cli", "sweep", str(path), "--storage", storage,
           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=tmp_path) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs[0][-2000:] + outputs[1][-2000:]
    trials = optuna.load_study(study_name="two_workers", storage=storage).get_trials()
    done = [(t.params["arm"], t.params["seed"]) for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(done) == sorted({(a, s) for a in grid["arms"] for s in (0, 1)})  # each point exactly once
