"""Team scale on real engines: three sweep workers (`m2s sweep --workers 3`) on one PostgreSQL Optuna study,
tracked by a real `mlflow server` whose backend store is that PostgreSQL; one worker is killed mid-trial
and another retries its trial from last.ckpt. Then the dashboard as a person opens it: the compare link
`m2s dashboard` prints, rendered by headless Chromium.

The servers are Debian's PostgreSQL (a throwaway cluster on 127.0.0.1 in a temporary folder) and
Chromium; .ci/run installs them when missing. Without them these tests skip, unless
M2S_REQUIRE_SERVERS=1 (as in CI), where a missing server fails them."""

from __future__ import annotations

import glob
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml

from lightning_m2s.dashboard import free_port, stop_server, wait_ready
from lightning_m2s.tracking import sqlalchemy_url

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("M2S_TEST_ARTIFACTS", REPO / "outputs" / "test-artifacts"))
M2S = [sys.executable, "-m", "lightning_m2s.cli"]
# A grid the debug experiment runs in seconds: one arm trains (the one whose worker is killed), two are the
# training-free floors. Heartbeats every second: a dead worker's trial is retried 5 s after its last one.
GRID = {
    "study": "team", "experiment": "debug", "sampler": "grid",
    "arms": {"train": {"trainer.max_steps": 4, "data.train_batches": 4, "checkpoint.every_n_steps": 1},
             "warp": {"module.variant": "warp_only"}, "fill": {"module.variant": "classical_fill"}},
    "seeds": [0], "objective": {"metric": "test/synthetic/psnr", "direction": "maximize"},
    "overrides": {"data.val_clips": 1, "trainer.enable_progress_bar": False},
    "heartbeat": {"interval": 1, "grace": 5},
}


def need(found: bool, what: str) -> None:
    if not found:
        message = f"{what} is not installed (.ci/run installs it: apt-get install -y {what.split()[0]})"
        if os.environ.get("M2S_REQUIRE_SERVERS"):
            pytest.fail(message)
        pytest.skip(message)


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its commands as the postgres user."""
    return ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(cmd)] if os.getuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 with databases `optuna` and `mlflow`: its base URL."""
    import psycopg

    bindir = pg_bin()
    need(bindir is not None, "postgresql server")
    folder = Path(tempfile.mkdtemp(prefix="m2s-pg-"))
    if os.getuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
    data, port = folder / "data", free_port()
    subprocess.run(as_postgres([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "m2s"]), check=True,
                   capture_output=True)
    stop = as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
    try:
        subprocess.run(as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
                                    f"-k {folder} -h 127.0.0.1 -p {port}", "start"]), check=True, capture_output=True)
        with psycopg.connect(f"host=127.0.0.1 port={port} user=m2s dbname=postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE optuna")
            conn.execute("CREATE DATABASE mlflow")
        yield f"postgresql://m2s@127.0.0.1:{port}"
    finally:
        subprocess.run(stop, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """`mlflow server` over the PostgreSQL store, serving artifacts from a temporary folder: its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", sqlalchemy_url(f"{postgres}/mlflow"),
           "--artifacts-destination", str(tmp_path_factory.mktemp("artifacts")),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, timeout=120)
        yield url
    finally:
        stop_server(proc)


def pids_running(pattern: str) -> list[int]:
    """Processes whose command line contains `pattern`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and pattern in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def team_sweep(postgres, mlflow_server, tmp_path_factory):
    """`m2s sweep --workers 3` on the PostgreSQL study and the MLflow server, the worker of the training arm
    SIGKILLed once it has a last.ckpt: (root, storage, tracking URL, exit code, output, the killed pid)."""
    root = tmp_path_factory.mktemp("team")
    (root / "team.yaml").write_text(yaml.safe_dump(GRID))
    storage = f"{postgres}/optuna"
    cmd = M2S + ["sweep", str(root / "team.yaml"), "--workers", "3", "--storage", storage,
                 "--tracking-uri", mlflow_server]
    # three "GPUs" the launcher hands out one per worker (the trials run on the CPU: no driver sees them)
    env = {**os.environ, "M2S_ROOT": str(root), "CUDA_VISIBLE_DEVICES": "0,1,2"}
    log = root / "launcher.log"
    with open(log, "w") as out:
        launcher = subprocess.Popen(cmd, env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = mlflow.MlflowClient(mlflow_server)
        deadline = time.monotonic() + 300
        killed = None
        # The training arm's worker is known (its run's m2s.worker tag) before its first checkpoint; it is killed
        # as soon as last.ckpt appears, so the kill lands mid-trial however slow the tracking server is under
        # load (looking the worker up after the checkpoint could take until the trial had finished).
        while not list(root.glob("outputs/sweeps/team-*/train-seed0/checkpoints/last.ckpt")):
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            if killed is None:
                found = [r for e in client.search_experiments() for r in client.search_runs(
                    [e.experiment_id], "tags.`m2s.trial_key` = 'train-seed0'")]
                if found and "m2s.worker" in found[0].data.tags:
                    killed = int(found[0].data.tags["m2s.worker"].rsplit(":", 1)[1])
            time.sleep(0.2 if killed is None else 0.01)
        if killed is None:  # it checkpointed before the first look-up returned
            (run,) = [r for e in client.search_experiments() for r in client.search_runs(
                [e.experiment_id], "tags.`m2s.trial_key` = 'train-seed0'")]
            killed = int(run.data.tags["m2s.worker"].rsplit(":", 1)[1])
        os.kill(killed, signal.SIGKILL)  # mid-trial: no cleanup at all, as a crashed node
        launcher.wait(timeout=400)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and its workers
            launcher.wait()
    return root, storage, mlflow_server, launcher.returncode, log.read_text(), killed


def test_postgres_three_workers_run_every_trial_once_and_retry_the_killed_workers_trial(team_sweep):
    root, storage, uri, code, out, killed = team_sweep
    assert code == 0, out[-4000:]
    assert f"was killed by signal {signal.SIGKILL.value}" in out
    (study_name,) = optuna.get_all_study_names(sqlalchemy_url(storage))  # "team-<digest of its settings>"
    study = optuna.load_study(study_name=study_name, storage=sqlalchemy_url(storage))
    trials = study.get_trials()
    done = [t.params["arm"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(done) == sorted(GRID["arms"])  # every grid point exactly once
    assert not [t for t in trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)]
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert [t.params["arm"] for t in failed] == ["train"]  # the killed worker's trial, failed by its stale heartbeat
    logs = "".join(p.read_text() for p in root.glob("outputs/sweeps/workers/team-*/worker*.log"))
    assert re.search(r"resuming from \S*train-seed0/checkpoints/last\.ckpt", logs)  # the retry went on from there

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep-team")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("m2s.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("m2s.kind") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["m2s.arm"] for r in children) == sorted(GRID["arms"])  # the retry resumed its run
    assert all(r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
               for r in children)
    assert not pids_running(str(root / "team.yaml"))  # no worker outlived the launcher
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)


def test_postgres_workers_each_see_their_own_device_and_a_share_of_the_threads(team_sweep):
    root, _, uri, _, out, killed = team_sweep
    assigned = {int(pid): json.loads(env.replace("'", '"')) for pid, env in re.findall(r"\(pid (\d+), (\{.*?\})\)", out)}
    assert sorted(e["CUDA_VISIBLE_DEVICES"] for e in assigned.values()) == ["0", "1", "2"]
    threads = str(max(1, len(os.sched_getaffinity(0)) // 3))
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep-team")
    children = client.search_runs([exp.experiment_id], "tags.`m2s.kind` = 'trial'")
    workers = {r.data.tags["m2s.trial_key"]: int(r.data.tags["m2s.worker"].rsplit(":", 1)[1]) for r in children}
    assert workers["train-seed0"] != killed  # the last attempt ran in another worker
    for run in children:  # what the process that ran the trial saw
        pid = int(run.data.tags["m2s.worker"].rsplit(":", 1)[1])
        assert run.data.tags["m2s.cuda_visible_devices"] == assigned[pid]["CUDA_VISIBLE_DEVICES"]
        assert run.data.tags["m2s.torch_threads"] == threads == assigned[pid]["OMP_NUM_THREADS"]


def test_postgres_parent_run_carries_the_comparison_table_and_figure_and_the_config_once(team_sweep):
    _, _, uri, _, out, _ = team_sweep
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep-team")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs table
    (parent,) = client.search_runs([exp.experiment_id], "tags.`m2s.kind` = 'sweep'")
    files = {f.path for f in client.list_artifacts(parent.info.run_id, "comparison")}
    assert {"comparison/means.json", "comparison/differences.json", "comparison/summary.png"} <= files
    with tempfile.TemporaryDirectory() as tmp:
        table = json.loads(Path(client.download_artifacts(parent.info.run_id, "comparison/means.json", tmp)).read_text())
        diffs = json.loads(Path(client.download_artifacts(parent.info.run_id, "comparison/differences.json", tmp)).read_text())
        png = Path(client.download_artifacts(parent.info.run_id, "comparison/summary.png", tmp)).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r[table["columns"].index("arm")]: dict(zip(table["columns"], r)) for r in table["data"]}
    printed = out[out.index("study team"):]
    for arm in GRID["arms"]:  # the launcher's printed table, the same numbers
        line = next(line for line in printed.splitlines() if line.startswith(arm + " "))
        assert line.split()[1:5] == [f"{rows[arm][f'synthetic {m}']:.{d}f}" for m, d in
                                     (("PSNR", 2), ("LPIPS", 3), ("PSNR-in", 2), ("LPIPS-in", 3))]
    for cell in (r[diffs["columns"].index("printed")] for r in diffs["data"]):
        assert cell.strip() in printed
    (train,) = client.search_runs([exp.experiment_id], "tags.`m2s.trial_key` = 'train-seed0'")
    params = train.data.params
    assert params["model.left_condition"] and not [k for k in params if "/" in k]  # no `model/...` copies


@pytest.mark.slow
def test_postgres_dashboard_link_opens_the_compare_view_in_chromium(team_sweep):
    root, _, uri, _, _, _ = team_sweep
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    need(chromium is not None, "chromium browser")
    shown = subprocess.run(M2S + ["dashboard", "--tracking-uri", uri], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "M2S_ROOT": str(root)})
    assert shown.returncode == 0, shown.stderr[-2000:]
    found = re.search(r"latest sweep team-[0-9a-f]{8} \((\w+)\), its arms and floors side by side: (\S+)", shown.stdout)
    assert found, shown.stdout[-2000:]
    status, link = found.groups()
    assert status == "finished"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "dashboard_compare.png"
    with tempfile.TemporaryDirectory() as profile:
        browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   f"--user-data-dir={profile}", "--window-size=1600,1000", "--virtual-time-budget=20000"]
        dom = subprocess.run(browser + ["--dump-dom", link], capture_output=True, text=True, timeout=120).stdout
        subprocess.run(browser + [f"--screenshot={screenshot}", link], capture_output=True, timeout=120)
    for arm in GRID["arms"]:
        assert f"{arm}-seed0" in dom, f"arm {arm} not on the compare page (screenshot {screenshot})"
    assert f'>objective/{GRID["objective"]["metric"]}<' in dom, f"objective not on the compare page (screenshot {screenshot})"
    assert screenshot.stat().st_size > 10_000
