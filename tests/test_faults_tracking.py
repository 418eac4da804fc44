"""Tracking store faults with real processes: a tracking server that is down, a local store that becomes
read-only while a run trains. Each is one line naming the store and exit 2, never minutes of retries or
pages of tracebacks."""

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from lightning_m2s.dashboard import free_port

M2S = [sys.executable, "-m", "lightning_m2s.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def m2s(args, root: Path, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(M2S + args, env={**ENV, "M2S_ROOT": str(root)}, capture_output=True, text=True, cwd=root,
                          timeout=timeout)
    return proc, time.monotonic() - start


def test_a_tracking_server_that_is_down_is_one_line_naming_it_within_seconds(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({
        "study": "down", "experiment": "debug", "arms": {"a": {}},
        "objective": {"metric": "test/synthetic/psnr", "direction": "maximize"}}))
    for args in (["train", "debug", f"tracking.uri={uri}", f"meta.output_dir={tmp_path / 'out'}"],
                 ["sweep", str(tmp_path / "grid.yaml"), "--tracking-uri", uri]):
        proc, seconds = m2s(args, tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and seconds < 60
        last = proc.stderr.strip().splitlines()[-1]
        assert uri in last and "does not answer" in last, last
    assert not (tmp_path / "out" / "checkpoints").exists()  # nothing was built or trained


@pytest.mark.slow
def test_a_local_store_that_becomes_read_only_mid_run_is_one_line_naming_it(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(M2S + ["train", "debug", "trainer.max_steps=100000", "data.train_batches=1000",
                                       f"tracking.uri=sqlite:///{store / 'mlflow.db'}", f"meta.output_dir={tmp_path / 'out'}"],
                                env={**ENV, "M2S_ROOT": str(tmp_path)}, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    mounted = False
    try:
        client = mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
        deadline = time.monotonic() + 300
        while not (tmp_path / "out" / "mlflow_run_id").exists() or not client.get_metric_history(
                (tmp_path / "out" / "mlflow_run_id").read_text(), "train/loss"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        # read-only under the running process, for root too: a read-only bind mount of the store's folder
        done = subprocess.run(["mount", "--bind", str(store), str(store)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot bind-mount here (needs root): {done.stderr.decode().strip()}")
        mounted = True
        assert subprocess.run(["mount", "-o", "remount,ro,bind", str(store)]).returncode == 0
        assert proc.wait(300) == 2, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        if mounted:
            subprocess.run(["umount", "-l", str(store)])
    text = log.read_text()
    assert "Traceback" not in text and len(text.strip().splitlines()) <= 5, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert f"the tracking store sqlite:///{store / 'mlflow.db'} failed" in last, last
    saved = tmp_path / "out" / "checkpoints" / "last.ckpt"
    assert f"last checkpoint {saved}" in last and torch.load(saved, weights_only=True)["global_step"] >= 1  # what trained is kept


@pytest.mark.slow
def test_a_run_waits_out_a_sqlite_lock_held_longer_than_mlflows_busy_timeout(tmp_path):
    import sqlite3

    db = tmp_path / "mlflow.db"
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(M2S + ["train", "debug", "trainer.max_steps=12", "data.train_batches=1000",
                                       f"tracking.uri=sqlite:///{db}", f"meta.output_dir={tmp_path / 'out'}"],
                                env={**ENV, "M2S_ROOT": str(tmp_path)}, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        client = mlflow.MlflowClient(f"sqlite:///{db}")
        deadline = time.monotonic() + 300
        while not (tmp_path / "out" / "mlflow_run_id").exists() or not client.get_metric_history(
                (tmp_path / "out" / "mlflow_run_id").read_text(), "train/loss"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        holder = sqlite3.connect(db, isolation_level=None, timeout=60)
        holder.execute("BEGIN EXCLUSIVE")  # another process's long write: 30 s, past MLflow's 20 s
        time.sleep(30)
        holder.execute("COMMIT")
        holder.close()
        assert proc.wait(300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "the tracking store is locked by another process: waiting" in log.read_text()
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert run.info.status == "FINISHED" and len(client.get_metric_history(run.info.run_id, "train/loss")) == 12
