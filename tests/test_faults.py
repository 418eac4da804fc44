"""Fault injection with real signals to real subprocesses, truncated files and bad arguments: what
survives, what is marked failed, and which exit code the shell sees."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from lightning_m2s.config import load_config
from lightning_m2s.errors import ConfigError

M2S = [sys.executable, "-m", "lightning_m2s.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(args, root: Path, **kwargs) -> subprocess.Popen:
    log = open(root / "log.txt", "w")
    return subprocess.Popen(M2S + args, env={**ENV, "M2S_ROOT": str(root)}, stdout=log, stderr=subprocess.STDOUT,
                            cwd=root, **kwargs)


def wait_for(predicate, timeout: float = 180.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early with {proc.returncode}")
        time.sleep(0.5)
    raise AssertionError("timed out")


def runs(root: Path) -> list:
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_train_saves_last_ckpt_marks_the_run_failed_and_exits_128_plus_n(tmp_path, signum, code):
    proc = start(["train", "debug", "trainer.max_steps=100000", "trainer.checkpoint_every_n_steps=3",
                  "data.train_batches=1000"], tmp_path)
    last = tmp_path / "outputs" / "debug" / "default" / "checkpoints" / "last.ckpt"
    wait_for(last.exists, proc=proc)  # periodic last.ckpt without any validation
    time.sleep(1)
    proc.send_signal(signum)
    assert proc.wait(120) == code, (tmp_path / "log.txt").read_text()[-2000:]
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert step >= 3
    (run,) = runs(tmp_path)
    assert run.info.status == "FAILED" and run.data.tags["m2s.interrupted"] == signal.Signals(signum).name
    assert f"stopped by {signal.Signals(signum).name}" in (tmp_path / "log.txt").read_text()


def test_a_truncated_last_ckpt_is_moved_aside_and_the_run_goes_on(tmp_path):
    args = ["train", "debug", "trainer.max_steps=2"]
    assert start(args, tmp_path).wait(300) == 0
    last = tmp_path / "outputs" / "debug" / "default" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    proc = start(["train", "debug", "trainer.max_steps=4"], tmp_path)
    assert proc.wait(300) == 0, (tmp_path / "log.txt").read_text()[-2000:]
    text = (tmp_path / "log.txt").read_text()
    assert "last.ckpt is corrupt" in text and last.with_name("last.ckpt.corrupt").exists()
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4  # resumed from best.ckpt


def test_a_stale_run_id_starts_a_new_run_with_a_warning(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "mlflow_run_id").write_text("0123456789abcdef0123456789abcdef")  # from another store
    proc = start(["train", "debug", "module.variant=warp_only", f"meta.output_dir={out}"], tmp_path)
    assert proc.wait(300) == 0, (tmp_path / "log.txt").read_text()[-2000:]
    assert "does not have (another store?)" in (tmp_path / "log.txt").read_text()


def test_bad_override_types_and_names_are_errors_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.max_steps='abc': must be a number"):
        load_config("debug", ["trainer.max_steps=abc"])
    with pytest.raises(ConfigError, match="meta.run_name"):
        load_config("debug", ["meta.run_name=../../x"])
    proc = subprocess.run(M2S + ["train", "debug", "trainer.max_steps=abc"], env={**ENV, "M2S_ROOT": str(tmp_path)},
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() or not runs(tmp_path)  # no run left RUNNING


def test_a_sweep_whose_trials_fail_exits_nonzero(tmp_path):
    grid = {"study": "all_fail", "experiment": "debug", "arms": {"a": {"module.variant": "warp_only"}},
            "objective": {"metric": "test/nowhere/psnr", "direction": "maximize"}}  # never logged: the trial fails
    (tmp_path / "all_fail.yaml").write_text(yaml.safe_dump(grid))
    proc = start(["sweep", str(tmp_path / "all_fail.yaml")], tmp_path)
    assert proc.wait(300) == 1
    assert "1 trial(s) failed in this run" in (tmp_path / "log.txt").read_text()


def test_sigterm_to_a_sweep_fails_its_trial_and_a_rerun_retries_it(tmp_path):
    grid = {"study": "killed", "experiment": "debug", "arms": {"a": {}},
            "overrides": {"trainer.max_steps": 100000, "data.train_batches": 1000, "trainer.checkpoint_every_n_steps": 2},
            "objective": {"metric": "test/synthetic/psnr", "direction": "maximize"}}
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump(grid))
    proc = start(["sweep", str(tmp_path / "killed.yaml")], tmp_path)
    wait_for(lambda: any((tmp_path / "outputs" / "sweeps").glob("killed-*/a-seed0/checkpoints/last.ckpt")), proc=proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 143
    import optuna

    (trial,) = optuna.load_study(study_name="killed", storage=f"sqlite:///{tmp_path / 'optuna.db'}").get_trials()
    assert trial.state == optuna.trial.TrialState.FAIL
    assert {r.info.status for r in runs(tmp_path)} == {"FAILED"}  # the trial's run and the sweep's


def test_dashboard_sigterm_stops_the_server_group_and_a_busy_port_is_refused(tmp_path):
    from lightning_m2s.dashboard import free_port

    port = free_port()
    proc = start(["dashboard", "--port", str(port)], tmp_path, start_new_session=True)
    wait_for(lambda: "MLflow dashboard:" in (tmp_path / "log.txt").read_text(), proc=proc)
    # a second dashboard on the busy port: a clear error, not the other server's URL
    second = subprocess.run(M2S + ["dashboard", "--port", str(port)], env={**ENV, "M2S_ROOT": str(tmp_path)},
                            capture_output=True, text=True, cwd=tmp_path)
    assert second.returncode == 2 and f"port {port}" in second.stderr and "busy" in second.stderr
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nothing listens any more: no orphaned MLflow server


@pytest.fixture(scope="module")
def convert_inputs(tmp_path_factory):
    from lightning_m2s.config import load_config as load
    from lightning_m2s.data.video_io import write_video
    from lightning_m2s.train import train

    root = tmp_path_factory.mktemp("convert")
    video = root / "in.mp4"
    write_video(video, (np.random.default_rng(0).random((40, 48, 64, 3)) * 255).astype(np.uint8), 10.0)
    np.save(root / "depth.npy", np.random.default_rng(1).random((40, 48, 64)).astype(np.float32) + 0.5)
    train(load("debug", [f"meta.output_dir={root / 'run'}", f"tracking.uri=sqlite:///{root / 'm.db'}"]))
    return video, root / "depth.npy", root / "run" / "checkpoints" / "last.ckpt"


def test_convert_checks_its_output_before_the_work(tmp_path, convert_inputs):
    video, depth, ckpt = convert_inputs
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # no folder can be made under a file, whoever runs the test
    base = ["convert", str(video), "--checkpoint", str(ckpt), "--depth", str(depth)]
    cases = {
        "is not writable": ["--out", str(blocker / "o.mp4")],
        "is the depth file": ["--out", str(depth)],
        "fps must be between": ["--out", str(tmp_path / "o.mp4"), "--fps", "1e-9"],
    }
    for message, extra in cases.items():
        proc = subprocess.run(M2S + base + extra, env=ENV, capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-1000:]
    assert np.load(depth).shape == (40, 48, 64)  # never overwritten


def test_sigterm_to_convert_leaves_no_partial_file(tmp_path, convert_inputs):
    video, depth, ckpt = convert_inputs
    out = tmp_path / "out.mp4"
    proc = start(["convert", str(video), "--checkpoint", str(ckpt), "--depth", str(depth), "--out", str(out),
                  "--chunk-frames", "4", "--overlap-frames", "1"], tmp_path)
    wait_for(lambda: any(tmp_path.glob(".out.*partial*")), proc=proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 143
    assert not any(tmp_path.glob(".out.*")) and not out.exists()
