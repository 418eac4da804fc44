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
    proc = start(["train", "debug", "trainer.max_steps=100000", "checkpoint.every_n_steps=3",
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


@pytest.mark.slow
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


def test_sigterm_to_a_sweep_fails_its_trial_and_a_rerun_retries_it(tmp_path):
    grid = {"study": "killed", "experiment": "debug", "arms": {"a": {}},
            "overrides": {"trainer.max_steps": 100000, "data.train_batches": 1000, "checkpoint.every_n_steps": 2},
            "objective": {"metric": "test/synthetic/psnr", "direction": "maximize"}}
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump(grid))
    proc = start(["sweep", str(tmp_path / "killed.yaml")], tmp_path)
    wait_for(lambda: any((tmp_path / "outputs" / "sweeps").glob("killed-*/a-seed0/checkpoints/last.ckpt")), proc=proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 143
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    (study_name,) = optuna.get_all_study_names(storage)  # "killed-<digest of its settings>"
    (trial,) = optuna.load_study(study_name=study_name, storage=storage).get_trials()
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
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)  # a second one while the server stops (it takes ~2 s) must not break the stop
    assert proc.wait(60) == 143, (tmp_path / "log.txt").read_text()[-2000:]
    with socket.socket() as s:
        # SO_REUSEADDR: the server's side of a closed probe connection may sit in TIME_WAIT on the port;
        # Linux still refuses the bind while any socket listens there
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


def test_arm_and_study_names_cannot_leave_the_outputs_folder(tmp_path):
    from lightning_m2s.sweep import load_sweep

    for bad in ({"study": "../x", "arms": {"a": {}}}, {"study": "s", "arms": {"a/b": {}}}):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**bad, "objective": {"metric": "m", "direction": "minimize"}}))
        with pytest.raises(ConfigError, match="names a folder"):
            load_sweep(tmp_path / "bad.yaml")


def test_make_sweep_passes_args_trials_and_experiment_in_an_order_argparse_takes():
    from lightning_m2s.cli import build_parser

    repo = Path(__file__).resolve().parents[1]
    line = subprocess.run(["make", "-s", "-n", "-C", str(repo), "sweep", "ABLATION=left_cond", "EXP=debug", "TRIALS=2",
                           "ARGS=trainer.max_steps=3 optim.lr=1e-3"], capture_output=True, text=True, check=True)
    command = next(c for c in line.stdout.splitlines() if "m2s sweep" in c).split()
    args = build_parser().parse_args(command[command.index("sweep"):])
    assert (args.ablation, args.experiment, args.trials) == ("left_cond", "debug", 2)
    assert args.overrides == ["trainer.max_steps=3", "optim.lr=1e-3"]


def test_another_storage_never_resumes_this_studys_checkpoints(tmp_path):
    from lightning_m2s.sweep import run_sweep

    grid = {"study": "same_name", "experiment": "debug", "arms": {"w": {"module.variant": "warp_only"}},
            "overrides": {"trainer.enable_progress_bar": False},
            "objective": {"metric": "test/synthetic/psnr", "direction": "maximize"}}
    (tmp_path / "same_name.yaml").write_text(yaml.safe_dump(grid))
    folders = []
    for store in ("a", "b"):
        summary = run_sweep(tmp_path / "same_name.yaml", storage=f"sqlite:///{tmp_path / store}.db",
                            tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", output_root=tmp_path)
        folders.append({p.name for p in (tmp_path / "sweeps").iterdir()})
        assert summary.complete
    assert len(folders[1]) == 2 and folders[0] < folders[1]  # a second study folder, keyed by study identity


def test_evaluation_noise_comes_from_the_clip_seed_not_the_global_rng():
    from lightning_m2s.data.clip import collate_clips
    from lightning_m2s.data.datamodule import StereoDataModule
    from lightning_m2s.modules.end_to_end import EndToEndModule

    module = EndToEndModule(model={"pretrained": None}, loss={"lpips_weight": 0.0}).eval()
    batch = collate_clips([StereoDataModule(eval_frames=4, eval_size=32, test_clips=1).dataset("test")[0]])
    with torch.no_grad():
        first = module.predict_video(batch, seed=3)
        torch.randn(1000)  # what training or another clip would do to the global RNG
        again = module.predict_video(batch, seed=3)
    assert torch.equal(first, again)


def test_a_rerun_names_the_trials_a_live_worker_holds_and_when_they_can_be_retried(tmp_path):
    import optuna

    from lightning_m2s.sweep import held_trials, open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 'o.db'}")
    study = optuna.create_study(study_name="held", storage=storage)
    trial = study.ask({"arm": optuna.distributions.CategoricalDistribution(["with_left"]),
                       "seed": optuna.distributions.CategoricalDistribution([0])})
    storage.record_heartbeat(trial._trial_id)  # what a live worker's heartbeat thread writes
    (line,) = held_trials(study)
    assert "trial 0 (with_left, seed 0) is held by a live worker" in line and "run this sweep again after" in line
