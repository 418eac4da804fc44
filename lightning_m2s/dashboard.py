"""`m2s dashboard`: the MLflow UI over the project's tracking store, on 127.0.0.1.

The server runs in its own process group (MLflow may start helper processes) so stopping it stops
everything it started; MLflow's job-execution workers are switched off (they outlive a plain kill).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from lightning_m2s import tags, tracking
from lightning_m2s.errors import ConfigError, M2SError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_server(uri: str | None = None, host: str = "127.0.0.1", port: int = 5000,
                 artifact_root: str | None = None) -> subprocess.Popen:
    """Start `mlflow server` over a local sqlite store; returns the process (leader of its group)."""
    uri = tracking.resolve_uri(uri)
    if not uri.startswith("sqlite:"):
        raise ConfigError(f"tracking.uri {uri} is a server already: open it in a browser instead")
    artifacts = tracking.artifact_location(uri, artifact_root)
    Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--default-artifact-root",
           artifacts, "--host", host, "--port", str(port), "--workers", "1"]
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 60.0, stopped=lambda: False) -> None:
    """Poll the server's health endpoint until it answers (or the process dies, or `stopped()`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stopped():
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            raise M2SError(f"mlflow server exited with code {proc.returncode}: {err}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    if stopped():
        return
    stop_server(proc)
    raise M2SError(f"mlflow server at {url} did not answer within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop the server's whole process group: SIGTERM, then SIGKILL after `timeout`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def check_port_free(host: str, port: int) -> None:
    """A clear error when something already listens there (else a second dashboard would show the
    other server's pages, or MLflow would fail after start-up)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAIT is not busy
        try:
            s.bind((host, port))
        except OSError as err:
            raise M2SError(f"port {port} on {host} is busy ({err.strerror}): stop what runs there, or choose "
                           f"another with --port") from err


UI_MODE = "workflowType=machine_learning"  # the UI's own mode switch: runs and metrics, not its GenAI pages


def latest_sweep(client):
    """The newest sweep parent run in the store (tagged m2s.kind=sweep), or None."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(experiments, filter_string=tags.filter_tag(tags.KIND, tags.SWEEP),
                                 order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    return parents[0] if parents else None


def answer_links(uri: str | None, base_url: str) -> dict[str, str] | None:
    """The latest sweep's answer in the MLflow UI: {study, status, compare: its arms' finished runs and its
    floors side by side (MLflow's compare view: run names, then every test PSNR / LPIPS per test set, full
    and inside the mask), summary: the grid's summary figure}, or None without a sweep. A sweep that finished
    before floors were runs of their own gets them here (report.log_answer_runs: found, never duplicated)."""
    import json
    from urllib.parse import quote

    from lightning_m2s.report import log_answer_runs

    client = tracking.client(uri)
    parent = latest_sweep(client)
    if parent is None:
        return None
    runs = log_answer_runs(client, parent.info.run_id)
    ids = [r.info.run_id for r in runs["arms"] + runs["floors"]]
    if not ids:
        return None
    as_json = lambda items: quote(json.dumps(items, separators=(",", ":")))  # noqa: E731 - the UI's own route format
    exp = parent.info.experiment_id
    links = {"study": parent.data.tags.get(tags.STUDY, parent.info.run_name), "status": parent.info.status,
             "compare": f"{base_url}/#/compare-runs?runs={as_json(ids)}&experiments={as_json([exp])}&{UI_MODE}"}
    figures = {f.path for f in client.list_artifacts(parent.info.run_id, "comparison")}
    if "comparison/summary.png" in figures:
        links["summary"] = (f"{base_url}/#/experiments/{exp}/runs/{parent.info.run_id}/artifacts/"
                            f"comparison/summary.png?{UI_MODE}")
    return links


def print_links(uri: str | None, base_url: str) -> None:
    """The latest sweep's answer first (the link to open), then the UI's start page."""
    found = answer_links(uri, base_url)
    if found:
        print(f"latest sweep {found['study']} ({found['status'].lower()}), its arms and floors side by side: "
              f"{found['compare']}", flush=True)
        if "summary" in found:
            print(f"  its summary figure (arms, floors, intervals, qualitative grid): {found['summary']}", flush=True)
    print(f"MLflow dashboard: {base_url}/#/?{UI_MODE}  (experiments sweep-<ablation>; Ctrl-C stops it)", flush=True)


def serve(uri: str | None = None, host: str = "127.0.0.1", port: int = 5000) -> None:
    """Run the dashboard until Ctrl-C or SIGTERM; either way the server's whole process group stops. A
    tracking server serves its own UI: then only its address and the link are printed."""
    uri = tracking.resolve_uri(uri)
    if uri.startswith(("http://", "https://")):  # a tracking server serves its own UI
        print_links(uri, uri.rstrip("/"))
        return
    check_port_free(host, port)
    signals: list[int] = []

    def on_signal(signum, frame):
        # only noted: a KeyboardInterrupt raised inside Popen.wait or MLflow's client could leave a lock held
        # or escape the clean-up (a second signal while the server stops)
        signals.append(signum)

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    proc = start_server(uri, host, port)
    url = f"http://{host}:{port}"
    try:
        wait_ready(proc, url, stopped=lambda: bool(signals))
        if not signals:
            print_links(uri, url)
        while proc.poll() is None and not signals:  # until Ctrl-C, SIGTERM or the server ends by itself
            time.sleep(0.2)
    finally:
        stop_server(proc)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if signals:
        raise SystemExit(128 + signals[0])
