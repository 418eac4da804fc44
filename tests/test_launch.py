"""Sweep launchers: how workers are pinned to devices, SLURM settings from flags or the sweep file, a job
preempted mid-trial through submitit's local executor (real processes, SLURM's code path) that is
requeued and resumes its trial from last.ckpt, and `make optuna-dashboard` over a study."""

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
import yaml

from lightning_m2s.errors import ConfigError
from lightning_m2s.launch import slurm_settings, submit_slurm, worker_command, worker_envs
from lightning_m2s.sweep import load_sweep

REPO = Path(__file__).resolve().parents[1]


def test_workers_get_their_own_devices_and_a_share_of_the_threads():
    envs = worker_envs(4, 2, [str(i) for i in range(8)], cpus=16)  # an 8-GPU node, 4 two-GPU trials
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "2,3", "4,5", "6,7"]
    assert {e["OMP_NUM_THREADS"] for e in envs} == {"4"}
    granted = worker_envs(2, 1, ["3", "5", "6"], cpus=2)  # a scheduler's allocation: its ids, in its order
    assert [e["CUDA_VISIBLE_DEVICES"] for e in granted] == ["3", "5"] and granted[0]["OMP_NUM_THREADS"] == "1"
    cpu = worker_envs(3, 1, [], cpus=2)  # no GPU: threads only, at least one each
    assert all("CUDA_VISIBLE_DEVICES" not in e and e["OMP_NUM_THREADS"] == "1" for e in cpu)
    with pytest.raises(ConfigError, match=r"--workers 3 x --devices-per-trial 2 needs 6 accelerators; this node has 4"):
        worker_envs(3, 2, ["0", "1", "2", "3"], cpus=8)


def test_slurm_settings_come_from_flags_else_the_sweep_file(tmp_path):
    grid = {"study": "s", "arms": {"a": {}, "b": {}}, "seeds": [0, 1], "objective": {"metric": "m", "direction": "minimize"},
            "slurm": {"partition": "gpu", "time_min": 90, "additional": {"account": "vision"}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(grid))
    spec = load_sweep(tmp_path / "s.yaml")
    assert slurm_settings(spec, None, None, None, None) == {
        "workers": 4, "devices_per_trial": 1, "partition": "gpu", "time_min": 90, "additional": {"account": "vision"}}
    flags = slurm_settings(spec, 2, 4, "a100", 30)
    assert (flags["workers"], flags["devices_per_trial"], flags["partition"], flags["time_min"]) == (2, 4, "a100", 30)
    with pytest.raises(ConfigError, match="needs a partition"):
        submit_slurm(["true"], 1, 1, tmp_path / "jobs", None, 10, "x")
    for bad, key in (({"slurm": {"partiton": "gpu"}}, "slurm"), ({"heartbeat": {"interval": 5, "grace": 2}}, "heartbeat")):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**grid, **bad}))
        with pytest.raises(ConfigError, match=rf"bad\.yaml: {key}"):
            load_sweep(tmp_path / "bad.yaml")


def task_pid(controller: int) -> int:
    """The job's task process under submitit's local controller (what SLURM's srun starts)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.2)
    raise AssertionError("the job's task never started")


@pytest.mark.slow  # two starts of the whole stack and a short training: about a minute on 2 cores
def test_a_preempted_submitit_job_is_requeued_and_its_trial_resumes_from_last_ckpt(tmp_path, monkeypatch):
    grid = {"study": "preempt", "experiment": "debug", "arms": {"train": {}},
            "overrides": {"trainer.max_steps": 4, "data.train_batches": 4, "checkpoint.every_n_steps": 1,
                          "data.val_clips": 1, "trainer.enable_progress_bar": False},
            "objective": {"metric": "test/synthetic/psnr", "direction": "maximize"}}
    (tmp_path / "preempt.yaml").write_text(yaml.safe_dump(grid))
    storage, uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("M2S_ROOT", str(tmp_path))  # the job's outputs (its environment is this one's)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # trials only: the table at the end (floors, figure) is not what this test is about
    command = worker_command(str(tmp_path / "preempt.yaml"), [], None, None, storage, uri, 1, trials_only=True)
    (job,) = submit_slurm(command, 1, 1, tmp_path / "jobs" / "%j", None, 10, "m2s-preempt", cluster="local")
    try:
        last = tmp_path / "outputs" / "sweeps"
        deadline = time.monotonic() + 300
        while not list(last.glob("preempt-*/train-seed0/checkpoints/last.ckpt")):
            assert job.state == "RUNNING" and time.monotonic() < deadline, (job.stdout() or "")[-3000:] + (job.stderr() or "")[-3000:]
            time.sleep(0.2)
        os.kill(task_pid(job._process.pid), signal.SIGUSR2)  # what SLURM sends on preemption (sbatch --signal)
        while not job.done():  # requeued, and run again to its end
            assert time.monotonic() < deadline + 300, (job.stdout() or "")[-3000:]
            time.sleep(0.5)
        assert job.result() == 0
    finally:
        if not job.done():
            job.cancel()
            job._process.wait(30)
    logs = (job.stdout() or "") + (job.stderr() or "")
    assert "Requeued job" in logs and "preempted" in logs  # submitit's own account of it
    assert re.search(r"resuming from \S*train-seed0/checkpoints/last\.ckpt", logs)
    (study_name,) = optuna.get_all_study_names(storage)  # "preempt-<digest of its settings>"
    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]  # stopped with its last.ckpt, then resumed
    (ckpt,) = last.glob("preempt-*/train-seed0/checkpoints/last.ckpt")
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 4
    client = mlflow.MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    trial_runs = [r for r in runs if r.data.tags.get("m2s.kind") == "trial"]
    assert len(trial_runs) == 1 and trial_runs[0].info.status == "FINISHED"  # one run, resumed


def test_make_optuna_dashboard_serves_the_study_storage(tmp_path):
    from lightning_m2s.dashboard import free_port

    storage, port = f"sqlite:///{tmp_path / 'optuna.db'}", free_port()
    optuna.create_study(study_name="shown", storage=storage)
    line = subprocess.run(["make", "-s", "-n", "-C", str(REPO), "optuna-dashboard", f"STORAGE={storage}",
                           f"OPTUNA_PORT={port}"], capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    assert "--host 127.0.0.1" in line
    proc = subprocess.Popen(["bash", "-c", line], cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as response:
                    studies = json.load(response)["study_summaries"]
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.3)
        assert [s["study_name"] for s in studies] == ["shown"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)

